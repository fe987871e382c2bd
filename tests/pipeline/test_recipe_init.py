"""The recipe's ``init:`` key: a registry model started from a metainit checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from slimdet.errors import ConfigError
from slimdet.io import load_checkpoint, save_checkpoint
from slimdet.models import create_model
from slimdet.pipeline import load_recipe, run_recipe
from slimdet.pipeline.run import _input_model


@pytest.fixture
def metainit_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A metainit checkpoint of yolo-test (3 class rows, 64 px) with weights unlike a fresh model's."""
    torch.manual_seed(5)
    model = create_model("yolo-test", num_classes=3, input_size=64)
    state = {k: v + torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = save_checkpoint(tmp_path / "init" / "metainit.pt", model_config=model.model_config, state_dict=state,
                           metainit={"kind": "reptile"})  # fmt: skip
    return path, state


def _recipe(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "recipes" / "r.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def test_init_resolves_against_the_recipe_and_round_trips(tmp_path, tiny_digits, metainit_file):
    path = _recipe(tmp_path, {"model": "yolo-test", "init": "../init/metainit.pt", "dataset": str(tiny_digits),
                              "input_size": 64, "steps": ["evaluate"]})  # fmt: skip
    recipe = load_recipe(path)
    assert recipe.init == str(metainit_file[0].resolve()) and recipe.checkpoint is None
    assert recipe.to_dict()["init"] == recipe.init
    assert load_recipe(recipe.to_dict()) == recipe  # what a run directory stores loads back equal


def test_input_model_is_built_for_the_dataset_and_loads_the_init(tmp_path, tiny_digits, metainit_file):
    path, meta = metainit_file
    recipe = load_recipe({"model": "yolo-test", "init": str(path), "dataset": str(tiny_digits), "input_size": 64,
                          "steps": ["evaluate"]})  # fmt: skip
    model, source = _input_model(recipe)
    assert model.num_classes == 10 and source["init"] == str(path.resolve())
    own = model.state_dict()
    for k, v in own.items():
        if ".cls_pred." in k:
            torch.testing.assert_close(v, meta[k].mean(0, keepdim=True).expand_as(v))
        else:
            assert torch.equal(v, meta[k])


def test_run_recipe_starts_from_the_init(tmp_path, tiny_digits, metainit_file):
    path, meta = metainit_file
    recipe = {"model": "yolo-test", "init": str(path), "dataset": str(tiny_digits), "input_size": 64,
              "steps": [{"evaluate": {"split": "test"}}]}  # fmt: skip
    result = run_recipe(recipe, out_dir=tmp_path / "run", progress=False)
    stored = load_checkpoint(tmp_path / "run" / "input_model.pt")
    assert stored["model"] == {"name": "yolo-test", "num_classes": 10, "input_size": 64}
    assert torch.equal(stored["state_dict"]["backbone.stem.0.weight"], meta["backbone.stem.0.weight"])
    assert result.metrics["stages"][0]["metrics"]["evaluate"]["num_images"] == 6


def test_init_without_model_is_refused(tmp_path, tiny_digits, metainit_file):
    path, _ = metainit_file
    model = create_model("yolo-test", num_classes=10, input_size=64)
    ckpt = save_checkpoint(tmp_path / "c.pt", model_config=model.model_config, state_dict=model.state_dict())
    with pytest.raises(ConfigError, match=r"<recipe>: init: only used with 'model'"):
        load_recipe({"checkpoint": str(ckpt), "init": str(path), "dataset": str(tiny_digits), "steps": ["evaluate"]})
    with pytest.raises(ConfigError, match=r"r.yaml: init: file not found: 'missing.pt'"):
        load_recipe(_recipe(tmp_path, {"model": "yolo-test", "init": "missing.pt", "dataset": str(tiny_digits),
                                       "steps": ["evaluate"]}))  # fmt: skip
