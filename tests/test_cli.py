from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from slimdet.cli import main
from slimdet.io import load_checkpoint, save_checkpoint
from slimdet.models import create_model, load_model
from slimdet.pipeline import STEPS, RunContext, StepOptions, StepOutput, register_step


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    model = create_model("yolo-test", num_classes=2, input_size=64)
    return save_checkpoint(tmp_path / "yolo-test.pt", model_config=model.model_config, state_dict=model.state_dict())


@pytest.fixture
def coco_yaml(tmp_path: Path) -> Path:
    """Two 64x64 images with one box each, as a COCO dataset YAML."""
    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in (1, 2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 64, "height": 64})
        anns.append({"id": i, "image_id": i, "category_id": i, "bbox": [8, 8, 20, 24], "area": 480, "iscrowd": 0})
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    (root / "test.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    splits = "".join(f"  {s}: {{images: images, annotations: test.json}}\n" for s in ("train", "val", "test"))
    (root / "data.yaml").write_text("format: coco\nsplits:\n" + splits)
    return root / "data.yaml"


@pytest.fixture
def noop_step():
    @register_step("cli-test-noop", changes_model=False)
    def noop(ctx: RunContext, model, opts: StepOptions) -> StepOutput:
        return StepOutput(model, metrics={"map": 0.25, "map50": 0.5, "per_class_ap": {"a": 0.25}})

    yield "cli-test-noop"
    STEPS.unregister("cli-test-noop")


def test_models_lists_registry(capsys):
    assert main(["models"]) == 0
    names = capsys.readouterr().out.split()
    assert {"yolo-test", "yolo-n", "yolo-s"} <= set(names)


def test_user_error_prints_message_and_returns_2_without_traceback(tmp_path, capsys):
    code = main(["compress", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "missing.yaml: recipe file not found" in err
    assert "Traceback" not in err


def test_recipe_errors_reach_the_terminal(tmp_path, checkpoint, coco_yaml, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"checkpoint": str(checkpoint), "dataset": str(coco_yaml), "steps": ["evalute"]}))
    assert main(["compress", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "steps[0]: unknown step 'evalute'" in err and "did you mean 'evaluate'?" in err


def test_usage_error_returns_argparse_code(capsys):
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_export_rejects_unknown_format(tmp_path, checkpoint, capsys):
    assert main(["export", str(checkpoint), "--format", "tflite", "--out", str(tmp_path / "m.tflite")]) == 2
    assert "unsupported export format 'tflite'; available: onnx" in capsys.readouterr().err


def test_export_writes_onnx(tmp_path, checkpoint, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000 and f"wrote {out}" in capsys.readouterr().out


def test_profile_by_registry_name(capsys):
    argv = ["profile", "yolo-test", "--batch-sizes", "1", "--runs", "2", "--warmup", "0", "--no-onnx",
            "--input-size", "64"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "torch-eager" in out and "onnxruntime" not in out


def test_eval_checkpoint(tmp_path, checkpoint, coco_yaml, capsys):
    result = tmp_path / "eval.json"
    assert main(["eval", str(checkpoint), "--data", str(coco_yaml), "--json", str(result)]) == 0
    assert "2 images" in capsys.readouterr().out
    assert json.loads(result.read_text())["num_images"] == 2


def test_train_writes_checkpoint(tmp_path, coco_yaml, capsys):
    out = tmp_path / "train"
    argv = ["train", "--model", "yolo-test", "--data", str(coco_yaml), "--input-size", "64", "--epochs", "1",
            "--batch-size", "2", "--no-ema", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert f"checkpoint: {out / 'model.pt'}" in capsys.readouterr().out
    model, _ = load_model(out / "model.pt")
    assert model.num_classes == 2 and model.input_size == 64
    assert (out / "last.pt").is_file()


def test_train_with_a_teacher_distills_and_logs_the_terms(tmp_path, coco_yaml, capsys):
    base = ["train", "--data", str(coco_yaml), "--epochs", "1", "--batch-size", "2", "--no-ema"]
    teacher = tmp_path / "teacher"
    assert main([*base, "--model", "yolo-test", "--input-size", "64", "--out", str(teacher)]) == 0
    student = tmp_path / "student"
    argv = [*base, "--model", "yolo-test", "--input-size", "64", "--teacher", str(teacher / "model.pt"),
            "--out", str(student)]  # fmt: skip
    assert main(argv) == 0
    history = json.loads((student / "history.json").read_text())
    assert {"train_kd_cls", "train_kd_box", "train_kd_feat", "train_det"} <= set(history[0])
    argv[argv.index("--teacher") + 1] = str(tmp_path / "missing.pt")
    assert main([*argv[:-1], str(tmp_path / "s2")]) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_train_rejects_invalid_option(tmp_path, coco_yaml, capsys):
    argv = ["train", "--model", "yolo-test", "--data", str(coco_yaml), "--epochs", "0", "--out", str(tmp_path / "t")]
    assert main(argv) == 2
    assert "error: train options: epochs: expected a value >= 1, got 0" in capsys.readouterr().err


def test_data_build_unknown_name_suggests(capsys):
    assert main(["data", "build", "digit-det"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown built-in dataset 'digit-det'")


def test_compress_runs_and_resumes(tmp_path, checkpoint, coco_yaml, noop_step, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"checkpoint": str(checkpoint), "dataset": str(coco_yaml), "input_size": 64,
                                      "steps": [noop_step]}))  # fmt: skip
    out = tmp_path / "run"
    assert main(["compress", str(recipe), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "baseline" in printed and f"report: {out / 'report.html'}" in printed
    assert (out / "report.html").is_file()
    assert main(["compress", str(recipe), "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["compress", str(recipe), "--out", str(out), "--resume", "--quiet"]) == 0


def test_metainit_writes_a_checkpoint_and_rejects_bad_options(tmp_path, tiny_digits, capsys):
    common = ["--model", "yolo-test", "--data", str(tiny_digits), "--input-size", "64", "--meta-iters", "2",
              "--inner-steps", "1", "--batch-size", "4", "--ways", "2", "--held-out", "8", "9", "--quiet"]  # fmt: skip
    assert main(["metainit", *common, "--out", str(tmp_path / "reptile")]) == 0
    assert f"checkpoint: {tmp_path / 'reptile' / 'metainit.pt'} (reptile, 2 gradient steps" in capsys.readouterr().out
    assert main(["metainit", *common, "--union", "--out", str(tmp_path / "union")]) == 0
    assert "(union, 2 gradient steps" in capsys.readouterr().out
    payload = load_checkpoint(tmp_path / "reptile" / "metainit.pt")
    assert payload["model"]["num_classes"] == 2 and payload["metainit"]["config"]["family"]["held_out"] == [8, 9]
    assert main(["metainit", *common, "--meta-iters", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "metainit options: meta_iters: expected a value >= 1, got 0" in capsys.readouterr().err
    assert main(["metainit", *common, "--ways", "9", "--out", str(tmp_path / "bad")]) == 2
    assert "TaskFamily.ways: 9 classes per task but only 8 meta-training classes" in capsys.readouterr().err
