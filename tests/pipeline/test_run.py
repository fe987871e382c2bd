from __future__ import annotations

import json

import pytest
import torch

from slimdet.errors import ConfigError
from slimdet.io import load_checkpoint
from slimdet.models import load_model
from slimdet.pipeline import load_recipe, run_recipe
from slimdet.pipeline.lock import run_lock

TINY = "pipeline-test-tiny"  # registered by the fakes fixture (conftest.py)


def _json(path):
    return json.loads(path.read_text())


def test_run_writes_run_directory(tmp_path, fakes, recipe_dict):
    out = tmp_path / "run"
    result = run_recipe(recipe_dict, out_dir=out, progress=False)

    assert load_recipe(out / "recipe.yaml") == load_recipe(recipe_dict)
    labels = ["00_t-measure", "01_t-profile", "02_t-shrink", "03_t-flaky", "04_t-measure", "05_t-profile"]
    assert result.ran == labels and result.skipped == []
    for label in labels:
        rec = _json(out / "steps" / label / "record.json")
        assert rec["dir"] == f"steps/{label}" and rec["time_s"] >= 0
    # only the step that changes the model writes a checkpoint; the others reference it
    assert [p.parent.name for p in sorted((out / "steps").glob("*/model.pt"))] == ["02_t-shrink"]
    assert _json(out / "steps" / "05_t-profile" / "record.json")["checkpoint"] == "steps/02_t-shrink/model.pt"
    assert load_checkpoint(out / "input_model.pt")["model"]["name"] == TINY
    final, _ = load_model(out / "steps" / "02_t-shrink" / "model.pt")
    for a, b in zip(final.state_dict().values(), result.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    metrics = _json(out / "metrics.json")
    assert metrics == result.metrics
    assert [s["name"] for s in metrics["stages"]] == ["baseline", "02_t-shrink"]
    assert set(metrics["stages"][0]["metrics"]) == {"t-measure", "t-profile"}
    assert set(metrics["stages"][1]["metrics"]) == {"t-shrink", "t-flaky", "t-measure", "t-profile"}
    assert metrics["stages"][0]["metrics"]["t-measure"]["map"] != metrics["stages"][1]["metrics"]["t-measure"]["map"]
    state = _json(out / "state.json")
    assert [e["index"] for e in state["finished"]] == list(range(6)) and state["completed"]
    html = (out / "report.html").read_text()
    assert "02_t-shrink" in html and "data:image/png;base64," in html
    assert result.report_path == out / "report.html"


def test_resume_after_crash_repeats_no_finished_step(tmp_path, fakes, recipe_dict):
    reference = run_recipe(recipe_dict, out_dir=tmp_path / "uninterrupted", progress=False)
    fakes.calls.clear()

    out = tmp_path / "run"
    fakes.flaky_failures = 1
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_recipe(recipe_dict, out_dir=out, progress=False)
    assert dict(fakes.calls) == {0: 1, 1: 1, 2: 1, 3: 1}
    assert [e["index"] for e in _json(out / "state.json")["finished"]] == [0, 1, 2]
    assert not (out / "report.html").exists()

    result = run_recipe(recipe_dict, out_dir=out, resume=True, progress=False)
    assert dict(fakes.calls) == {0: 1, 1: 1, 2: 1, 3: 2, 4: 1, 5: 1}  # only the crashed step ran twice
    assert result.skipped == ["00_t-measure", "01_t-profile", "02_t-shrink"]
    assert result.metrics == reference.metrics
    assert _json(out / "metrics.json") == _json(tmp_path / "uninterrupted" / "metrics.json")

    again = run_recipe(recipe_dict, out_dir=out, resume=True, progress=False)  # finished: nothing to do
    assert again.ran == [] and sum(fakes.calls.values()) == 7
    assert again.metrics == reference.metrics


def test_existing_run_dir_is_refused_without_resume(tmp_path, fakes, recipe_dict):
    out = tmp_path / "run"
    run_recipe(recipe_dict, out_dir=out, progress=False)
    before = sum(fakes.calls.values())
    with pytest.raises(ConfigError, match=r"not empty.*--resume.*another --out"):
        run_recipe(recipe_dict, out_dir=out, progress=False)
    assert sum(fakes.calls.values()) == before


def test_resume_with_a_different_recipe_is_refused(tmp_path, fakes, recipe_dict):
    out = tmp_path / "run"
    run_recipe(recipe_dict, out_dir=out, progress=False)
    recipe_dict["steps"][2] = {"t-shrink": {"factor": 0.25}}
    with pytest.raises(ConfigError, match=r"recipe differs.*\n  steps\[2\]\.t-shrink\.factor: 0\.5 -> 0\.25"):
        run_recipe(recipe_dict, out_dir=out, resume=True, progress=False)


def test_resume_refuses_a_folder_that_is_not_a_run(tmp_path, fakes, recipe_dict):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a slimdet run directory"):
        run_recipe(recipe_dict, out_dir=out, resume=True, progress=False)


def test_locked_run_dir_is_refused(tmp_path, fakes, recipe_dict):
    out = tmp_path / "run"
    out.mkdir()
    with run_lock(out):
        with pytest.raises(ConfigError, match="another slimdet run is writing into this run directory"):
            run_recipe(recipe_dict, out_dir=out, resume=True, progress=False)
    assert sum(fakes.calls.values()) == 0
    result = run_recipe(recipe_dict, out_dir=out, resume=True, progress=False)  # lock released: runs
    assert len(result.ran) == 6


def test_model_from_registry_name_is_seeded(tmp_path, fakes, recipe_dict):
    del recipe_dict["checkpoint"]
    recipe_dict.update(model=TINY, steps=["t-measure"])
    a = run_recipe(recipe_dict, out_dir=tmp_path / "a", progress=False)
    b = run_recipe(recipe_dict, out_dir=tmp_path / "b", progress=False)
    assert a.model.num_classes == 2  # from the dataset YAML's names
    assert a.metrics == b.metrics


def test_progress_prints_a_line_per_step(tmp_path, fakes, recipe_dict, capsys):
    run_recipe(recipe_dict, out_dir=tmp_path / "run", progress=True)
    err = capsys.readouterr().err
    assert "[3/6] t-shrink: done in" in err and "[6/6] t-profile: done in" in err


def test_builtin_train_then_measure_steps(tmp_path, fakes, recipe_dict):
    """The real train step on a tiny dataset: a new stage with a checkpoint and training metrics."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i in (1, 2, 3, 4):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(root / "images" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 32, "height": 32})
        anns.append(
            {"id": i, "image_id": i, "category_id": 1 + i % 2, "bbox": [4, 4, 12, 16], "area": 192, "iscrowd": 0}
        )
    cats = [{"id": 1, "name": "zero"}, {"id": 2, "name": "one"}]
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    splits = "".join(f"  {s}: {{images: images, annotations: ann.json}}\n" for s in ("train", "val"))
    (root / "data.yaml").write_text("format: coco\nsplits:\n" + splits)
    del recipe_dict["checkpoint"]
    recipe_dict.update(model="yolo-test", dataset=str(root / "data.yaml"), input_size=32,
                       steps=[{"train": {"epochs": 1, "batch_size": 2, "ema": False}}, "t-measure"])  # fmt: skip
    result = run_recipe(recipe_dict, out_dir=tmp_path / "run", progress=False)
    train_rec = _json(tmp_path / "run" / "steps" / "00_train" / "record.json")
    assert train_rec["metrics"]["epochs"] == 1 and train_rec["record"]["last_checkpoint"] == "steps/00_train/last.pt"
    assert train_rec["record"]["config"]["seed"] == 0  # null in the recipe: the recipe's seed
    assert [s["name"] for s in result.metrics["stages"]] == ["baseline", "00_train"]
    assert set(result.metrics["stages"][1]["metrics"]) == {"train", "t-measure"}
    assert result.checkpoint == tmp_path / "run" / "steps" / "00_train" / "model.pt"
