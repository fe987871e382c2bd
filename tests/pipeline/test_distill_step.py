"""The finetune step distills from the original model by default, and plots every loss term."""

from __future__ import annotations

import json

import pytest

from slimdet.errors import ConfigError
from slimdet.pipeline import run_recipe

FINETUNE = {"epochs": 1, "batch_size": 4, "max_steps_per_epoch": 2, "val_split": None, "threads": 1}
PRUNE = {"prune": {"ratio": 0.5, "importance": "l1", "calib_images": 4, "calib_batches": 1}}


def _recipe(tiny_digits, steps, **top):
    return {"model": "yolo-test", "dataset": str(tiny_digits), "input_size": 64, "steps": steps, **top}


def _record(run, label):
    return json.loads((run / "steps" / label / "record.json").read_text())


def test_finetune_after_pruning_distills_from_the_input_model_and_plots_the_terms(tiny_digits, tmp_path):
    run = tmp_path / "run"
    run_recipe(_recipe(tiny_digits, [PRUNE, {"finetune": FINETUNE}]), out_dir=run, progress=False)
    rec = _record(run, "01_finetune")
    distill = rec["record"]["distill"]
    assert distill["teacher"] == "input_model.pt" and distill["config"]["temperature"] == 2.0
    assert distill["adapters"]  # pruning narrowed the neck: adapters map the student's features to the teacher's
    epoch = rec["record"]["history"][0]
    assert {"train_det", "train_kd_cls", "train_kd_box", "train_kd_feat"} <= set(epoch)
    assert epoch["train_kd_feat"] > 0 and epoch["train_kd_cls"] > 0
    assert rec["record"]["loss_terms_plot"] == "steps/01_finetune/loss_terms.png"
    assert (run / "steps" / "01_finetune" / "loss_terms.png").stat().st_size > 5000
    assert "loss terms" in (run / "report.html").read_text()
    assert distill["adapter_fit_residual"] == {}  # random adapter start by default


def test_adapters_fitted_by_least_squares_when_asked(tiny_digits, tmp_path):
    steps = [PRUNE, {"finetune": {**FINETUNE, "distill": {"adapter_fit_batches": 2}}}]
    run_recipe(_recipe(tiny_digits, steps), out_dir=tmp_path / "run", progress=False)
    distill = _record(tmp_path / "run", "01_finetune")["record"]["distill"]
    assert set(distill["adapter_fit_residual"]) == set(distill["adapters"]) and distill["adapters"]
    assert all(0 <= r < 1 for r in distill["adapter_fit_residual"].values())


def test_original_teacher_is_the_last_trained_model_and_null_turns_distillation_off(tiny_digits, tmp_path):
    train = {**FINETUNE, "lr": 1e-3}
    steps = [{"train": train}, PRUNE, {"finetune": FINETUNE}, {"finetune": {**FINETUNE, "distill": None}}]
    run = tmp_path / "run"
    run_recipe(_recipe(tiny_digits, steps), out_dir=run, progress=False)
    assert _record(run, "02_finetune")["record"]["distill"]["teacher"] == "steps/00_train/model.pt"
    plain = _record(run, "03_finetune")["record"]
    assert "distill" not in plain and "train_kd_cls" not in plain["history"][0]
    assert "train_kd_cls" not in _record(run, "00_train")["record"]["history"][0]  # train never distills


def test_teacher_checkpoint_path_and_a_missing_one(tiny_digits, tmp_path):
    first = tmp_path / "first"
    run_recipe(_recipe(tiny_digits, [{"train": FINETUNE}]), out_dir=first, progress=False)
    teacher = first / "steps" / "00_train" / "model.pt"
    steps = [PRUNE, {"finetune": {**FINETUNE, "distill": {"teacher": str(teacher), "feat": 0.0}}}]
    run_recipe(_recipe(tiny_digits, steps), out_dir=tmp_path / "second", progress=False)
    distill = _record(tmp_path / "second", "01_finetune")["record"]["distill"]
    assert distill["teacher"] == str(teacher) and distill["adapters"] == []

    steps = [{"finetune": {**FINETUNE, "distill": {"teacher": "nowhere.pt"}}}]
    with pytest.raises(ConfigError, match=r"steps\[0\]\.finetune\.distill\.teacher: teacher checkpoint 'nowhere.pt'"):
        run_recipe(_recipe(tiny_digits, steps), out_dir=tmp_path / "third", progress=False)


def test_unknown_distill_option_is_rejected_with_its_path(tiny_digits, tmp_path):
    steps = [{"finetune": {**FINETUNE, "distill": {"temprature": 3}}}]
    with pytest.raises(ConfigError, match="temprature"):
        run_recipe(_recipe(tiny_digits, steps), out_dir=tmp_path / "run", progress=False)


def test_default_distillation_is_skipped_with_a_note_for_models_it_cannot_distill(tiny_digits, tmp_path):
    recipe = _recipe(tiny_digits, [{"finetune": {**FINETUNE, "max_steps_per_epoch": 1}}])
    recipe["model"] = "ssdlite320_mobilenet_v3_large"
    run_recipe(recipe, out_dir=tmp_path / "run", progress=False)
    rec = _record(tmp_path / "run", "00_finetune")["record"]
    assert "supports the yolo-* models" in rec["distill"]["skipped"]
    assert "train_kd_cls" not in rec["history"][0]
    # asked for explicitly: an error that names the option
    recipe["steps"] = [{"finetune": {**FINETUNE, "distill": {"teacher": "original"}}}]
    with pytest.raises(ConfigError, match=r"steps\[0\]\.finetune\.distill: distillation: the student"):
        run_recipe(recipe, out_dir=tmp_path / "run2", progress=False)
