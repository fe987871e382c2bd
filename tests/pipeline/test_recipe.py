from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slimdet.errors import ConfigError
from slimdet.pipeline import load_recipe, recipe_differences
from slimdet.pipeline.builtin.measure import ProfileOptions


def _write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_unknown_top_level_key_names_file_and_suggests(tmp_path, recipe_dict):
    recipe_dict["stepz"] = recipe_dict.pop("steps")
    path = _write(tmp_path / "r.yaml", recipe_dict)
    with pytest.raises(ConfigError) as exc:
        load_recipe(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert "stepz: unknown key; did you mean 'steps'?" in msg
    assert "steps: required key is missing" in msg


def test_unknown_step_lists_known_steps_with_closest(tmp_path, recipe_dict):
    recipe_dict["steps"] = ["t-measure", "profle"]
    path = _write(tmp_path / "r.yaml", recipe_dict)
    with pytest.raises(ConfigError) as exc:
        load_recipe(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: steps[1]: unknown step 'profle'")
    assert "did you mean 'profile'?" in msg
    for known in ("evaluate", "export", "profile", "t-measure"):
        assert known in msg


def test_unknown_step_option_gives_field_path_and_suggestion(tmp_path, recipe_dict):
    recipe_dict["steps"] = ["t-measure", "t-profile", {"profile": {"batch_size": [1, 8], "runs": 3}}]
    path = _write(tmp_path / "r.yaml", recipe_dict)
    with pytest.raises(ConfigError) as exc:
        load_recipe(path)
    msg = str(exc.value)
    assert f"{path}: steps[2].profile.batch_size: unknown key; did you mean 'batch_sizes'?" in msg
    assert "Extra inputs" not in msg  # pydantic's own wording is translated


def test_wrong_option_type_and_bound_are_explained(recipe_dict):
    recipe_dict["steps"] = [{"profile": {"runs": "many", "warmup": -1}}]
    with pytest.raises(ConfigError) as exc:
        load_recipe(recipe_dict)
    msg = str(exc.value)
    assert "steps[0].profile.runs: expected an integer, got 'many'" in msg
    assert "steps[0].profile.warmup: expected a value >= 0, got -1" in msg


def test_export_rejects_other_formats_clearly(recipe_dict):
    recipe_dict["steps"] = [{"export": {"format": "tflite"}}]
    with pytest.raises(ConfigError, match=r"steps\[0\]\.export\.format: unsupported format 'tflite': only 'onnx'"):
        load_recipe(recipe_dict)


def test_step_item_must_be_name_or_one_key_mapping(recipe_dict):
    recipe_dict["steps"] = [{"t-measure": {}, "t-profile": {}}]
    with pytest.raises(ConfigError, match=r"steps\[0\]: expected a step name or a one-key mapping"):
        load_recipe(recipe_dict)


def test_model_and_checkpoint_are_exclusive(recipe_dict):
    recipe_dict["model"] = "yolo-test"
    with pytest.raises(ConfigError, match="exactly one of 'model'"):
        load_recipe(recipe_dict)


def test_unknown_model_name_suggests(recipe_dict):
    del recipe_dict["checkpoint"]
    recipe_dict["model"] = "yolo-tset"
    with pytest.raises(ConfigError, match=r"model: unknown model 'yolo-tset'.*did you mean 'yolo-test'"):
        load_recipe(recipe_dict)


def test_resolved_recipe_fills_defaults_and_round_trips(tmp_path, recipe_dict):
    recipe_dict["steps"] = ["t-measure", {"profile": {"runs": 3}}, {"evaluate": None}]
    recipe = load_recipe(recipe_dict)
    resolved = recipe.to_dict()
    assert resolved["target"] == "cpu" and resolved["seed"] == 0 and resolved["model"] is None
    assert resolved["steps"][1] == {"profile": ProfileOptions(runs=3).model_dump(mode="json")}
    assert resolved["steps"][2]["evaluate"]["split"] == "test"
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(recipe.to_yaml())
    again = load_recipe(dumped)
    assert again == recipe
    assert again.to_dict() == resolved
    assert recipe_differences(recipe, again) == []


def test_relative_checkpoint_resolves_against_recipe_folder(tmp_path, recipe_dict, tiny_checkpoint):
    sub = tmp_path / "recipes"
    sub.mkdir()
    recipe_dict["checkpoint"] = "../tiny.pt"
    recipe = load_recipe(_write(sub / "r.yaml", recipe_dict))
    assert recipe.checkpoint == str(tiny_checkpoint.resolve())
    recipe_dict["checkpoint"] = "missing.pt"
    with pytest.raises(ConfigError, match=r"checkpoint: file not found: 'missing.pt'"):
        load_recipe(_write(sub / "r2.yaml", recipe_dict))


def test_recipe_differences_name_the_field(recipe_dict):
    a = load_recipe(recipe_dict)
    recipe_dict["steps"][2] = {"t-shrink": {"factor": 0.25}}
    b = load_recipe(recipe_dict)
    assert recipe_differences(a, b) == ["steps[2].t-shrink.factor: 0.5 -> 0.25"]


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("dataset: x\nsteps: [a, b\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML \(line \d+"):
        load_recipe(path)


def test_default_recipe_is_valid():
    path = Path(__file__).resolve().parents[2] / "recipes" / "default.yaml"
    recipe = load_recipe(path, check_files=False)
    names = [s.name for s in recipe.steps]
    # measure, compress (int8 for ONNX Runtime), measure the same way again, export
    assert names == ["evaluate", "profile", "simulate", "quantize", "evaluate", "profile", "simulate", "export"]
    assert recipe.checkpoint is not None and recipe.checkpoint.endswith("yolo-s_digits-det.pt")
    assert recipe.dataset == "digits-det"


RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_shipped_recipe_validates(name):
    path = RECIPES / name
    # the checkpoint it names exists; a metainit file is made by 'slimdet metainit' first; every step's options validate
    starts_from_init = "init" in yaml.safe_load(path.read_text())
    recipe = load_recipe(path, check_files=not starts_from_init)
    if starts_from_init:
        assert recipe.model is not None and recipe.checkpoint is None and recipe.init.endswith("metainit.pt")
    else:
        assert recipe.checkpoint is not None and Path(recipe.checkpoint).is_file()
    assert recipe.dataset == "digits-det"
    assert [s.name for s in recipe.steps].count("evaluate") >= 2  # the original and the compressed model


def test_recipe_target_typo_is_refused_with_a_suggestion(tmp_path: Path, tiny_digits: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": "yolo-test", "dataset": str(tiny_digits), "target": "edge-npx",
                                    "steps": ["evaluate"]}))  # fmt: skip
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"{path}: target: unknown target 'edge-npx'")
    assert "did you mean 'edge-npu'?" in message
    for good in ("cpu", "gpu", "edge-npu"):
        path.write_text(yaml.safe_dump({"model": "yolo-test", "dataset": str(tiny_digits), "target": good,
                                        "steps": ["evaluate"]}))  # fmt: skip
        assert load_recipe(path).target == good
