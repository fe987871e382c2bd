"""Hardening (issue 9): every bad input and failure the issue lists, one test each, in its order.

Each test goes through the user-facing path (``load_dataset``, ``load_recipe``, ``run_recipe``, the
``slimdet`` command run in-process or as a subprocess) and asserts the error type and that the
message names the file, the field or record, and what was expected; or, for the failures a run must
survive, that it recovers with nothing lost (same metrics and weights as an uninterrupted run).

With ``SLIMDET_HARDENING_LOG=path.json`` the tests also write what the user saw, per case, for
``benchmarks/hardening_matrix.py`` (each test records it as its last statement, after its asserts).
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from slimdet.cli import main
from slimdet.compress import PruneConfig, prune
from slimdet.data import load_dataset
from slimdet.errors import CheckpointError, ConfigError, DatasetError, OutputError
from slimdet.io import load_checkpoint, save_checkpoint
from slimdet.models import create_model, load_model
from slimdet.pipeline import load_recipe, run_recipe

#: test name -> the case as the issue words it (the matrix's first column)
CASES = {
    "test_h01_corrupt_image": "unreadable/corrupt image",
    "test_h02_malformed_coco_json": "malformed COCO JSON",
    "test_h03_yolo_label_wrong_column_count": "YOLO label with wrong column count",
    "test_h04_box_outside_image": "box outside image",
    "test_h05_unknown_class_id": "unknown class id",
    "test_h06_unknown_model_name": "unknown model name",
    "test_h07_unknown_preset": "unknown preset",
    "test_h08_recipe_typo_suggests": "recipe typo (with suggestion)",
    "test_h09_ratio_out_of_range": "negative or >1 ratio",
    "test_h10_impossible_budget_reports_best_reachable": "impossible budget (reports the best reachable)",
    "test_h11_checkpoint_for_other_architecture": "checkpoint for a different architecture",
    "test_h12_truncated_checkpoint": "truncated checkpoint",
    "test_h13_malicious_pickle_is_not_executed": "checkpoint carrying a malicious pickle",
    "test_h14_unwritable_output_directory": "unwritable output directory",
    "test_h15_disk_full_while_writing": "disk space exhausted while writing",
    "test_h16_sigkill_mid_step_then_resume": "run killed mid-step (SIGKILL), then --resume",
    "test_h17_two_runs_in_one_run_directory": "two runs writing to the same run directory",
}
_SEEN: dict[str, dict[str, Any]] = {}
_CLI = "import sys; from slimdet.cli import main; sys.exit(main(sys.argv[1:]))"
#: finetune recipe of the SIGKILL and two-runs cases: long enough to be caught mid-step, short to test
FINETUNE_STEPS = [{"evaluate": {"split": "val"}}, {"finetune": {"epochs": 4, "batch_size": 8, "threads": 1}},
                  {"evaluate": {"split": "test"}}]  # fmt: skip
PRUNE_STEPS = [{"evaluate": {"split": "val"}}, {"prune": {"ratio": 0.3}}, {"evaluate": {"split": "test"}}]


@pytest.fixture(scope="module", autouse=True)
def _hardening_log():
    """Writes what each case showed the user to $SLIMDET_HARDENING_LOG (JSON) after the module's tests."""
    yield
    path = os.environ.get("SLIMDET_HARDENING_LOG")
    if path:
        Path(path).write_text(json.dumps(_SEEN, indent=2) + "\n")


@pytest.fixture
def seen(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., None]:
    """``seen(outcome, message, command)``: what the user saw, with this test's temporary folder as ``$TMP``."""

    def record(outcome: str, message: str, command: str) -> None:
        tmp = str(tmp_path)
        name = request.node.name
        _SEEN[CASES[name]] = {"test": name, "outcome": outcome, "message": message.replace(tmp, "$TMP"),
                              "command": command.replace(tmp, "$TMP")}  # fmt: skip

    return record


def _cli_error(capsys: pytest.CaptureFixture[str], *argv: Any) -> str:
    """Run ``slimdet ARGV`` in-process; the user-error contract: exit 2, ``error: ...`` (after any progress
    output), no traceback. Returns the message."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    start = re.search(r"^error: ", err, re.M)
    assert start and "Traceback" not in err, err
    return err[start.end() :].strip()


def _command(*argv: Any) -> str:
    return "slimdet " + " ".join(str(a) for a in argv)


def _first(text: str, lines: int = 1) -> str:
    return " / ".join(ln.strip() for ln in str(text).strip().splitlines()[:lines])


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _write_recipe(path: Path, **fields: Any) -> Path:
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------- datasets

# (file, width, height, [(category id, x, y, w, h)]) of the small COCO / YOLO datasets below
IMAGES = [("a.png", 64, 48, [(1, 4, 6, 20, 10), (2, 30, 20, 16, 24)]), ("b.png", 40, 40, [(2, 0, 0, 40, 12)]),
          ("c.jpg", 50, 70, [(1, 10, 10, 20, 30)]), ("d.png", 48, 48, [])]  # fmt: skip


def _draw(path: Path, w: int, h: int, boxes: list[tuple[int, ...]]) -> None:
    pixels = np.zeros((h, w, 3), np.uint8)
    for _, x, y, bw, bh in boxes:
        pixels[y : y + bh, x : x + bw] = 255
    Image.fromarray(pixels).save(path)


def _coco(root: Path, edit: Callable[[dict[str, Any]], None] | None = None, *, text: str | None = None) -> Path:
    """A COCO dataset of IMAGES (split 'test'), its JSON changed by ``edit`` or replaced by ``text``."""
    (root / "images").mkdir(parents=True)
    anns = []
    for image_id, (name, w, h, boxes) in enumerate(IMAGES, start=1):
        _draw(root / "images" / name, w, h, boxes)
        for c, x, y, bw, bh in boxes:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": c, "bbox": [x, y, bw, bh]})
    data = {"images": [{"id": i, "file_name": n, "width": w, "height": h} for i, (n, w, h, _) in enumerate(IMAGES, 1)],
            "annotations": anns, "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "bar"}]}  # fmt: skip
    if edit is not None:
        edit(data)
    (root / "ann.json").write_text(text if text is not None else json.dumps(data))
    (root / "data.yaml").write_text("format: coco\nsplits:\n  test: {images: images, annotations: ann.json}\n")
    return root / "data.yaml"


def _yolo(root: Path, extra_lines: tuple[str, ...] = ()) -> Path:
    """The same data as YOLO txt (split 'test'); ``extra_lines`` go to the end of a.txt."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name, w, h, boxes in IMAGES:
        _draw(root / "images" / name, w, h, boxes)
        lines = [f"{c - 1} {(x + bw / 2) / w} {(y + bh / 2) / h} {bw / w} {bh / h}" for c, x, y, bw, bh in boxes]
        lines += list(extra_lines) if name == "a.png" else []
        if lines:
            (root / "labels" / name).with_suffix(".txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text(
        "format: yolo\nnames: [square, bar]\nsplits:\n  test: {images: images, labels: labels}\n"
    )
    return root / "data.yaml"


def _boxes(ds: Any) -> dict[str, list[list[float]]]:
    """File name -> boxes (original pixels, xyxy) of every record of a dataset."""
    return {r.path.name: r.boxes.tolist() for r in ds.records}


def _expected_boxes(*names: str) -> dict[str, list[list[float]]]:
    return {n: [[x, y, x + bw, y + bh] for _, x, y, bw, bh in boxes] for n, _, _, boxes in IMAGES if n in names}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained yolo-test checkpoint (2 classes, 64 px) for the CLI cases."""
    model = create_model("yolo-test", num_classes=2, input_size=64)
    path = tmp_path_factory.mktemp("ckpt") / "yolo-test.pt"
    return save_checkpoint(path, model_config=model.model_config, state_dict=model.state_dict())


def test_h01_corrupt_image(tmp_path, ckpt, capsys, seen):
    data = _coco(tmp_path / "coco")
    (tmp_path / "coco" / "images" / "b.png").write_bytes(b"this is not an image")
    jpeg = tmp_path / "coco" / "images" / "c.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 50, 3), np.uint8)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])  # passes PIL's verify(); fails decoding
    with Image.open(jpeg) as im:
        im.verify()

    with pytest.raises(DatasetError) as info:
        load_dataset(data, "test", input_size=64)
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'coco' / 'ann.json'}: 2 invalid record(s) (corrupt_image: 2)")
    assert f"image id 2 (b.png): cannot read image {tmp_path / 'coco' / 'images' / 'b.png'}" in msg
    assert "image id 3 (c.jpg): cannot read image" in msg and "image file is truncated" in msg
    assert "skip_invalid=True" in msg  # the way out

    # recovery: the two good images load, with every one of their boxes
    ds = load_dataset(data, "test", input_size=64, skip_invalid=True)
    assert ds.skipped == {"corrupt_image": 2}
    assert _boxes(ds) == _expected_boxes("a.png", "d.png")
    assert all(ds[i][0].shape == (3, 64, 64) for i in range(len(ds)))

    err = _cli_error(capsys, "eval", ckpt, "--data", data)
    assert "ann.json: 2 invalid record(s)" in err and "b.png" in err and "c.jpg" in err
    seen("clear error; skip_invalid keeps every valid image and box", _first(err, 2),
         _command("eval", "model.pt", "--data", "data.yaml"))  # fmt: skip


def test_h02_malformed_coco_json(tmp_path, seen):
    good = json.dumps(json.loads(_coco(tmp_path / "ref").with_name("ann.json").read_text()))
    broken = _coco(tmp_path / "cut", text=good[: len(good) // 2])  # a file cut off mid-write
    with pytest.raises(DatasetError) as info:
        load_dataset(broken, "test")
    msg = str(info.value)
    assert re.fullmatch(
        re.escape(str(tmp_path / "cut" / "ann.json")) + r": malformed JSON at line 1, column \d+: .+", msg
    )

    no_cats = _coco(tmp_path / "nocats", lambda d: d.pop("categories"))
    with pytest.raises(DatasetError, match=r"nocats/ann.json: top level: missing required key 'categories' "
                                           r"\(COCO needs 'images', 'annotations', 'categories'\)"):  # fmt: skip
        load_dataset(no_cats, "test")

    def drop_bbox(d: dict[str, Any]) -> None:
        del d["annotations"][1]["bbox"]  # annotation id 2, on image id 1 (a.png)

    no_bbox = _coco(tmp_path / "nobbox", drop_bbox)
    with pytest.raises(DatasetError) as info:
        load_dataset(no_bbox, "test")
    assert "nobbox/ann.json: 1 invalid record(s) (missing_key: 1)" in str(info.value)
    assert "annotation id 2: missing required key(s) ['bbox'] (needs ['id', 'image_id', 'category_id', 'bbox'])" in str(
        info.value
    )
    ds = load_dataset(no_bbox, "test", skip_invalid=True)  # recovery: only that annotation is dropped
    expected = _expected_boxes("a.png", "b.png", "c.jpg", "d.png")
    expected["a.png"] = expected["a.png"][:1]
    assert _boxes(ds) == expected
    seen("clear error (line and column)", msg, "load_dataset('data.yaml', 'test')  # ann.json cut in half")


def test_h03_yolo_label_wrong_column_count(tmp_path, ckpt, capsys, seen):
    data = _yolo(tmp_path / "yolo", extra_lines=("0 0.5 0.5 0.2",))
    with pytest.raises(DatasetError) as info:
        load_dataset(data, "test")
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'yolo' / 'labels'}: 1 invalid record(s) (bad_line: 1)")
    assert "a.txt line 3: expected 5 columns 'cls cx cy w h', got 4: '0 0.5 0.5 0.2'" in msg

    ds = load_dataset(data, "test", skip_invalid=True)  # recovery: the line is dropped, the image and its boxes stay
    assert ds.skipped == {"bad_line": 1}
    got, expected = _boxes(ds), _expected_boxes("a.png", "b.png", "c.jpg", "d.png")
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-3)

    err = _cli_error(capsys, "eval", ckpt, "--data", data)
    assert "a.txt line 3: expected 5 columns" in err
    seen("clear error (file and line)", _first(err, 2), _command("eval", "model.pt", "--data", "data.yaml"))


def test_h04_box_outside_image(tmp_path, seen):
    def outside(d: dict[str, Any]) -> None:
        d["annotations"][0]["bbox"] = [50, 40, 30, 30]  # on the 64x48 a.png: reaches x=80, y=70
        d["annotations"][2]["bbox"] = [-0.5, 0, 40, 12.8]  # on the 40x40 b.png: 0.5 px out, within tolerance

    data = _coco(tmp_path / "coco", outside)
    with pytest.raises(DatasetError) as info:
        load_dataset(data, "test")
    msg = str(info.value)
    assert f"{tmp_path / 'coco' / 'ann.json'}: 1 invalid record(s) (box_outside: 1)" in msg
    assert (
        "annotation id 1 (image id 1): box [50, 40, 80, 70] (xyxy) lies outside the 64x48 image by more than 1 px"
        in msg
    )

    ds = load_dataset(data, "test", skip_invalid=True)
    boxes = _boxes(ds)
    assert boxes["a.png"] == [[30, 20, 46, 44]]  # only the bad box is dropped
    assert boxes["b.png"][0] == pytest.approx([0, 0, 39.5, 12.8])  # the half-pixel overhang is clipped, not dropped

    yolo = _yolo(tmp_path / "yolo", extra_lines=("1 1.4 0.5 0.5 0.5",))
    with pytest.raises(DatasetError, match=r"a.txt line 3: box \[.*\] \(xyxy\) lies outside the 64x48 image"):
        load_dataset(yolo, "test")
    seen("clear error; a box within 1 px is clipped", _first(msg, 2), "load_dataset('data.yaml', 'test')")


def test_h05_unknown_class_id(tmp_path, seen):
    yolo = _yolo(tmp_path / "yolo", extra_lines=("5 0.5 0.5 0.2 0.2",))
    with pytest.raises(DatasetError) as info:
        load_dataset(yolo, "test")
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'yolo' / 'labels'}: 1 invalid record(s) (class_out_of_range: 1)")
    assert "a.txt line 3: class id 5 is not an integer in 0..1 (2 names)" in msg

    def unknown(d: dict[str, Any]) -> None:
        d["annotations"][0]["category_id"] = 9

    coco = _coco(tmp_path / "coco", unknown)
    with pytest.raises(DatasetError, match=re.escape("annotation id 1 (image id 1): category id 9 is not in "
                                                     "'categories' (known: [1, 2])")):  # fmt: skip
        load_dataset(coco, "test")
    ds = load_dataset(coco, "test", skip_invalid=True)
    assert ds.skipped == {"unknown_category": 1} and _boxes(ds)["a.png"] == [[30, 20, 46, 44]]
    seen("clear error (file, line, valid range)", _first(msg, 2), "load_dataset('data.yaml', 'test')")


@pytest.fixture(scope="module")
def fitted_ckpt(fitted_tiny: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conftest's fitted yolo-test (10 classes, 64 px, mAP well above 0) as a checkpoint."""
    path = tmp_path_factory.mktemp("fitted") / "fitted.pt"
    return save_checkpoint(path, model_config=fitted_tiny.model_config, state_dict=fitted_tiny.state_dict())


def test_h06_unknown_model_name(tmp_path, tiny_digits, capsys, seen):
    recipe = _write_recipe(tmp_path / "r.yaml", model="yolo-ss", dataset=str(tiny_digits), steps=["evaluate"])
    with pytest.raises(ConfigError) as info:
        load_recipe(recipe)
    msg = str(info.value)
    assert msg.startswith(f"{recipe}: model: unknown model 'yolo-ss'; known: ")
    assert "yolo-n, yolo-s, yolo-test" in msg and msg.endswith("(did you mean 'yolo-s'?)")

    err = _cli_error(capsys, "compress", recipe, "--out", tmp_path / "run")
    assert err == msg
    assert not (tmp_path / "run").exists()  # refused before anything is written
    seen("clear error with suggestion", err, _command("compress", "r.yaml", "--out", "run"))


def test_h07_unknown_preset(tmp_path, tiny_digits, capsys, seen):
    err = _cli_error(capsys, "simulate", "yolo-test", "--target", "edge-npx", "--input-size", 64)
    assert err.startswith("--target: unknown hardware preset 'edge-npx'; known: cpu-zen5-2c, edge-npu, ")
    assert "(did you mean 'edge-npu'?)" in err

    # in a recipe both places a preset goes are checked when it loads, not when its step runs
    presets = [({"simulate": {"devices": ["edge-npx"]}}, "steps[1].simulate.devices"),
               ({"prune": {"target": {"ms": 1.0, "device": "edge-npx"}}}, "steps[1].prune.target.device")]  # fmt: skip
    for step, field in presets:
        recipe = _write_recipe(tmp_path / "r.yaml", model="yolo-test", dataset=str(tiny_digits), input_size=64,
                               steps=["evaluate", step])  # fmt: skip
        with pytest.raises(ConfigError) as info:
            load_recipe(recipe)
        assert str(info.value).startswith(f"{recipe}: {field}: unknown hardware preset 'edge-npx'")
        assert "(did you mean 'edge-npu'?)" in str(info.value)
    seen("clear error with suggestion", err, _command("simulate", "yolo-test", "--target", "edge-npx"))


def test_h08_recipe_typo_suggests(tmp_path, tiny_digits, capsys, seen):
    base = {"model": "yolo-test", "dataset": str(tiny_digits)}
    typos = [
        ({**base, "steps": ["evalute"]}, "steps[0]: unknown step 'evalute'; known: ", "(did you mean 'evaluate'?)"),
        ({**base, "steps": [{"profile": {"batch_size": [1]}}]}, "steps[0].profile.batch_size: unknown key; ",
         "did you mean 'batch_sizes'?"),
        ({"model": "yolo-test", "datset": str(tiny_digits), "steps": ["evaluate"]}, "datset: unknown key; ",
         "did you mean 'dataset'?"),
        ({**base, "steps": [{"finetune": {"epoch": 2}}]}, "steps[0].finetune.epoch: unknown key; ",
         "did you mean 'epochs'?"),
    ]  # fmt: skip
    for raw, where, hint in typos:
        recipe = _write_recipe(tmp_path / "r.yaml", **raw)
        with pytest.raises(ConfigError) as info:
            load_recipe(recipe)
        assert str(info.value).startswith(f"{recipe}: ") and where in str(info.value), str(info.value)
        assert hint in str(info.value)
    err = _cli_error(capsys, "compress", _write_recipe(tmp_path / "r.yaml", **typos[0][0]), "--out", tmp_path / "run")
    assert "did you mean 'evaluate'?" in err
    seen("clear error with suggestion", err, _command("compress", "r.yaml", "--out", "run"))


def test_h09_ratio_out_of_range(tmp_path, tiny_digits, capsys, seen):
    cases = [
        ({"prune": {"ratio": -0.2}}, "steps[0].prune.ratio: expected a value > 0.0, got -0.2"),
        ({"prune": {"macs_ratio": 1.5}}, "steps[0].prune.macs_ratio: expected a value < 1.0, got 1.5"),
        ({"prune": {"ratio": 0.3, "overrides": {"stem": 1.2}}},
         "steps[0].prune.overrides: override ratios must be in [0, 1), got {'stem': 1.2}"),
        ({"sparsify": {"sparsity": 1.5}}, "steps[0].sparsify.sparsity: expected a value < 1.0, got 1.5"),
        ({"lowrank": {"macs_reduction": -0.5}}, "steps[0].lowrank.macs_reduction: expected a value > 0.0, got -0.5"),
        ({"finetune": {"min_lr_ratio": 2}}, "steps[0].finetune.min_lr_ratio: expected a value <= 1.0, got 2"),
    ]  # fmt: skip
    for step, expected in cases:
        recipe = _write_recipe(tmp_path / "r.yaml", model="yolo-test", dataset=str(tiny_digits), steps=[step])
        with pytest.raises(ConfigError) as info:
            load_recipe(recipe)
        assert str(info.value) == f"{recipe}: {expected}"
    recipe = _write_recipe(tmp_path / "r.yaml", model="yolo-test", dataset=str(tiny_digits), steps=[cases[0][0]])
    err = _cli_error(capsys, "compress", recipe, "--out", tmp_path / "run")
    assert err == f"{recipe}: {cases[0][1]}"
    seen("clear error (field, bound, value)", err, _command("compress", "r.yaml", "--out", "run"))


def test_h10_impossible_budget_reports_best_reachable(tmp_path, tiny_digits, fitted_ckpt, seen):
    recipe = _write_recipe(tmp_path / "r.yaml", checkpoint=str(fitted_ckpt), dataset=str(tiny_digits), input_size=64,
                           steps=[{"prune": {"macs_ratio": 0.001}}])  # fmt: skip
    with pytest.raises(ConfigError) as info:
        run_recipe(recipe, out_dir=tmp_path / "run", progress=False)
    msg = str(info.value)
    assert msg.startswith(f"{recipe}: steps[0].prune: PruneConfig.macs_ratio=0.001: unreachable for YoloDetector; ")
    best = re.search(r"the best reachable is [\d,]+ MACs \(macs_ratio=([\d.]+) of [\d,]+\)", msg)
    assert best, msg
    assert _json(tmp_path / "run" / "state.json")["finished"] == []  # nothing recorded as done
    # the value it reports is indeed reachable
    reachable = round(float(best.group(1)) + 0.01, 3)
    result = prune(load_model(fitted_ckpt)[0], PruneConfig(macs_ratio=reachable), progress=False)
    assert result.macs_kept <= reachable

    latency = _write_recipe(tmp_path / "lat.yaml", checkpoint=str(fitted_ckpt), dataset=str(tiny_digits),
                            input_size=64, steps=[{"prune": {"target": {"ms": 1e-6, "device": "edge-npu"},
                                                             "allocation": "uniform"}}])  # fmt: skip
    with pytest.raises(ConfigError, match=r"steps\[0\]\.prune: PruneConfig\.target: 1e-06 ms is out of reach on "
                                          r"edge-npu .*gives [\d.]+ ms \(from [\d.]+ ms\)"):  # fmt: skip
        run_recipe(latency, out_dir=tmp_path / "run-latency", progress=False)
    seen("clear error naming the best reachable value", msg, _command("compress", "r.yaml", "--out", "run"))


def test_h11_checkpoint_for_other_architecture(tmp_path, tiny_digits, ckpt, capsys, seen):
    payload = load_checkpoint(ckpt)
    as_yolo_n = tmp_path / "as-yolo-n.pt"
    save_checkpoint(as_yolo_n, model_config={**payload["model"], "name": "yolo-n"}, state_dict=payload["state_dict"])
    err = _cli_error(capsys, "eval", as_yolo_n, "--data", tiny_digits)
    assert err.startswith(f"{as_yolo_n}: checkpoint does not match model 'yolo-n': ")
    assert "size mismatch for" in err or "missing and" in err

    more_classes = tmp_path / "ten-classes.pt"  # the same architecture with another head
    save_checkpoint(
        more_classes, model_config={**payload["model"], "num_classes": 10}, state_dict=payload["state_dict"]
    )
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(more_classes))}: checkpoint does not match model "
                                              r"'yolo-test': size mismatch for .*torch.Size"):  # fmt: skip
        load_model(more_classes)

    recipe = _write_recipe(tmp_path / "r.yaml", checkpoint=str(as_yolo_n), dataset=str(tiny_digits), input_size=64,
                           steps=["evaluate"])  # fmt: skip
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(as_yolo_n))}: checkpoint does not match"):
        run_recipe(recipe, out_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "state.json").exists()
    seen(
        "clear error (file, model, first mismatching tensor)", err, _command("eval", "model.pt", "--data", "data.yaml")
    )


def test_h12_truncated_checkpoint(tmp_path, tiny_digits, ckpt, capsys, seen):
    data = ckpt.read_bytes()
    for fraction in (0.0, 0.01, 0.5, 0.99):
        cut = tmp_path / f"cut{fraction}.pt"
        cut.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(cut)
        assert str(info.value).startswith(f"{cut}: not a loadable slimdet checkpoint (truncated, corrupt, or ")
    err = _cli_error(capsys, "eval", tmp_path / "cut0.5.pt", "--data", tiny_digits)
    assert err.startswith(f"{tmp_path / 'cut0.5.pt'}: not a loadable slimdet checkpoint (truncated")
    seen("clear error", err, _command("eval", "model.pt", "--data", "data.yaml"))


class _Exploit:
    """Unpickling it runs ``code`` (with the plain pickle, or torch.load(weights_only=False))."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (self.code,))


def test_h13_malicious_pickle_is_not_executed(tmp_path, tiny_digits, capsys, seen):
    marker = tmp_path / "pwned"
    code = f"open({str(marker)!r}, 'w').write('code from the checkpoint ran')"
    zipped = tmp_path / "evil.pt"  # torch.save's format, with the slimdet fields a loader looks for
    torch.save({"format": "slimdet-checkpoint", "version": 1, "model": {"name": "yolo-test"}, "state_dict": {},
                "extra": _Exploit(code)}, zipped)  # fmt: skip
    raw = tmp_path / "evil-raw.pt"  # a bare pickle, protocol 2 (torch.load's legacy format)
    raw.write_bytes(pickle.dumps({"format": "slimdet-checkpoint", "x": _Exploit(code)}, protocol=2))

    torch.load(zipped, weights_only=False)  # the files are live: an unsafe load runs the code
    assert marker.read_text() == "code from the checkpoint ran"
    marker.unlink()

    for path in (zipped, raw):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert str(info.value).startswith(f"{path}: not a loadable slimdet checkpoint")
        assert "it refers to the Python object" in str(info.value) and "nothing from it was run" in str(info.value)
    err = _cli_error(capsys, "eval", zipped, "--data", tiny_digits)
    recipe = _write_recipe(tmp_path / "r.yaml", checkpoint=str(zipped), dataset=str(tiny_digits), steps=["evaluate"])
    err_run = _cli_error(capsys, "compress", recipe, "--out", tmp_path / "run")
    assert "exec" in err and f"{zipped}: not a loadable" in err_run
    assert not marker.exists()
    seen("refused, code not run", err, _command("eval", "evil.pt", "--data", "data.yaml"))


# ------------------------------------------------------------------------------------- writing outputs


def _in_private_tmpfs(mount: Path, options: str, script: str) -> subprocess.CompletedProcess[str] | None:
    """Run ``sh -c script`` with a tmpfs mounted (``-o options``) on ``mount``, in a private mount
    namespace (``unshare -rm``, root or not), so it vanishes with the process; None where that is not allowed."""
    if shutil.which("unshare") is None or not sys.platform.startswith("linux"):
        return None
    mount.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=4k tmpfs {shlex.quote(str(mount))}"],
                           capture_output=True)  # fmt: skip
    if probe.returncode != 0:
        return None
    line = f"mount -t tmpfs -o {options} tmpfs {shlex.quote(str(mount))} && {script}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["unshare", "-rm", "sh", "-c", line], capture_output=True, text=True, env=env, timeout=300)


def test_h14_unwritable_output_directory(tmp_path, tiny_digits, fitted_ckpt, capsys, seen):
    """A file where the output folder should be stops root too (chmod does not)."""
    recipe = _write_recipe(tmp_path / "r.yaml", checkpoint=str(fitted_ckpt), dataset=str(tiny_digits), input_size=64,
                           steps=["evaluate"])  # fmt: skip
    blocker = tmp_path / "results"
    blocker.write_text("a file, not a folder")
    err = _cli_error(capsys, "compress", recipe, "--out", blocker / "run")
    assert err == (f"{blocker / 'run'}: cannot create the run directory: Not a directory "
                   f"({blocker} is a file, not a folder)")  # fmt: skip
    err_json = _cli_error(capsys, "eval", fitted_ckpt, "--data", tiny_digits, "--max-images", 2,
                          "--json", blocker / "eval.json")  # fmt: skip
    assert (
        err_json.startswith(f"{blocker}: cannot create the output folder: ") and "is a file, not a folder" in err_json
    )
    with pytest.raises(OutputError) as info:  # the same from the API, as an OSError too
        run_recipe(recipe, out_dir=blocker / "deeper" / "run", progress=False)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOTDIR
    assert str(info.value).startswith(f"{blocker / 'deeper' / 'run'}: cannot create the run directory")
    assert blocker.read_text() == "a file, not a folder"  # left as it was

    # a read-only file system, where one can be mounted: the same clear message, for root as well
    ro = _in_private_tmpfs(tmp_path / "ro", "ro,size=64k", f"{shlex.quote(sys.executable)} -c {shlex.quote(_CLI)} "
                           f"compress {recipe} --out {tmp_path / 'ro' / 'run'} --quiet")  # fmt: skip
    if ro is not None:
        assert ro.returncode == 2, ro.stderr
        assert (
            ro.stderr.strip()
            == f"error: {tmp_path / 'ro' / 'run'}: cannot create the run directory: Read-only file system"
        )
    seen(
        "clear error (path, reason)",
        err,
        _command("compress", "r.yaml", "--out", "results/run") + "  # results is a file",
    )


class _FullDisk:
    """A disk with ``free`` bytes left for the files written under ``folder`` through slimdet.io's atomic
    writes: like the kernel's, a write gets what space is left, and the next one fails with ENOSPC."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, folder: Path, free: int) -> None:
        self.folder, self.free, self.files = folder.resolve(), free, []
        paths: dict[int, Path] = {}
        real_mkstemp, real_fdopen = tempfile.mkstemp, os.fdopen

        def mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
            fd, name = real_mkstemp(*args, **kwargs)
            paths[fd] = Path(name).resolve()
            return fd, name

        def fdopen(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            path = paths.pop(fd, None)
            if path is None or "w" not in mode or not path.is_relative_to(self.folder):
                return real_fdopen(fd, mode, *args, **kwargs)
            self.files.append(path)
            return io.BufferedWriter(_DiskFile(fd, self))

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        monkeypatch.setattr(os, "fdopen", fdopen)


class _DiskFile(io.RawIOBase):
    """The raw file of a :class:`_FullDisk`: short writes, then OSError(ENOSPC); Python's buffered writer
    on top handles them as it does a real file's."""

    def __init__(self, fd: int, disk: _FullDisk) -> None:
        self.fd, self.disk = fd, disk

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def write(self, data: Any) -> int:
        if self.disk.free <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = os.write(self.fd, bytes(memoryview(data)[: self.disk.free]))
        self.disk.free -= n
        return n

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


#: in a private mount namespace with a full tmpfs on MNT: run RECIPE there, note what the user saw in SEEN,
#: make the tmpfs bigger (space freed), resume, copy metrics.json out
_FULL_TMPFS_RUN = """
import contextlib, subprocess, sys
from pathlib import Path
from slimdet.cli import main
recipe, mnt, seen = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
argv = ["compress", recipe, "--out", str(mnt / "run"), "--quiet"]
with open(seen / "err", "w") as err, contextlib.redirect_stderr(err):
    (seen / "rc").write_text(str(main(argv)))
(seen / "tmp_files").write_text("".join(f"{p}\\n" for p in (mnt / "run").rglob("*.tmp")))
(seen / "state.json").write_bytes((mnt / "run" / "state.json").read_bytes())
subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)], check=True)
code = main([*argv, "--resume"])
(seen / "metrics.json").write_bytes((mnt / "run" / "metrics.json").read_bytes())
sys.exit(code)
"""


def _pages(path: Path) -> int:
    return -(-path.stat().st_size // 4096)


def test_h15_disk_full_while_writing(tmp_path, tiny_digits, fitted_ckpt, monkeypatch, capsys, seen):
    # a checkpoint overwritten on a disk that fills up halfway: the old file stays, no temporary file is left
    model = create_model("yolo-test", num_classes=10, input_size=64)
    target = save_checkpoint(tmp_path / "ckpt" / "model.pt", model_config=model.model_config,
                             state_dict=model.state_dict(), note="old")  # fmt: skip
    before = target.read_bytes()
    with monkeypatch.context() as patch:
        disk = _FullDisk(patch, tmp_path / "ckpt", free=len(before) // 2)
        with pytest.raises(OutputError) as info:
            save_checkpoint(target, model_config=model.model_config, state_dict=model.state_dict(), note="new")
    assert disk.free == 0 and len(disk.files) == 1  # it really failed part-way, in our file
    assert info.value.errno == errno.ENOSPC
    assert str(info.value) == (f"{target}: cannot write: No space left on device; nothing was written (any earlier "
                               "model.pt is unchanged)")  # fmt: skip
    assert target.read_bytes() == before and load_checkpoint(target)["note"] == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.pt"]

    # inside a run: the disk fills while the prune step's checkpoint is written
    recipe = _write_recipe(tmp_path / "r.yaml", checkpoint=str(fitted_ckpt), dataset=str(tiny_digits), input_size=64,
                           steps=PRUNE_STEPS)  # fmt: skip
    reference = run_recipe(recipe, out_dir=tmp_path / "reference", progress=False)
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _FullDisk(patch, out / "steps" / "01_prune", free=20_000)
        err = _cli_error(capsys, "compress", recipe, "--out", out, "--quiet")
    assert err.startswith(f"{out / 'steps' / '01_prune' / 'model.pt'}: cannot write: No space left on device")
    state = _json(out / "state.json")
    assert [e["index"] for e in state["finished"]] == [0] and not state["completed"]  # not advanced
    assert not list(out.rglob("*.tmp")) and not (out / "steps" / "01_prune" / "model.pt").exists()
    assert main(["compress", str(recipe), "--out", str(out), "--resume", "--quiet"]) == 0  # space freed: resume
    assert _json(out / "metrics.json") == _json(tmp_path / "reference" / "metrics.json") == reference.metrics

    # the same on a real, full file system (a small tmpfs), where one can be mounted
    mnt, seen_dir = tmp_path / "tmpfs", tmp_path / "seen"
    seen_dir.mkdir()
    size_pages = (
        _pages(tmp_path / "reference" / "input_model.pt")
        + 10
        + _pages(tmp_path / "reference" / "steps" / "01_prune" / "model.pt") // 2
    )  # the prune checkpoint fits half-way
    script = " ".join(shlex.quote(str(a)) for a in (sys.executable, "-c", _FULL_TMPFS_RUN, recipe, mnt, seen_dir))
    real = _in_private_tmpfs(mnt, f"size={size_pages * 4}k", script)
    if real is not None:
        assert real.returncode == 0, real.stderr  # the resumed run
        assert (seen_dir / "rc").read_text() == "2"
        full = f"error: {mnt / 'run' / 'steps' / '01_prune' / 'model.pt'}: cannot write: No space left on device"
        assert (seen_dir / "err").read_text().startswith(full)
        assert (seen_dir / "tmp_files").read_text() == ""  # no temporary file left behind
        assert [e["index"] for e in _json(seen_dir / "state.json")["finished"]] == [0]
        assert _json(seen_dir / "metrics.json") == reference.metrics
    tmpfs = "; also on a real full tmpfs" if real is not None else ""
    seen(
        f"clear error; nothing half-written; --resume finishes with the same metrics{tmpfs}",
        err,
        _command("compress", "r.yaml", "--out", "run") + "  # disk fills while steps/01_prune/model.pt is written",
    )


# ------------------------------------------------------------------------------- interrupted and concurrent


@pytest.fixture(scope="module")
def finetune_recipe(tiny_digits: Path, fitted_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("finetune")
    return _write_recipe(folder / "finetune.yaml", checkpoint=str(fitted_ckpt), dataset=str(tiny_digits),
                         input_size=64, steps=FINETUNE_STEPS)  # fmt: skip


@pytest.fixture(scope="module")
def finetune_reference(finetune_recipe: Path) -> Path:
    """The finetune recipe run uninterrupted, in-process, single-threaded (as the subprocesses are)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = finetune_recipe.parent / "reference"
        run_recipe(finetune_recipe, out_dir=out, progress=False)
    finally:
        torch.set_num_threads(before)
    return out


def _spawn(recipe: Path, out: Path, log: Path) -> subprocess.Popen[bytes]:
    """``slimdet compress RECIPE --out OUT`` as a separate process (1 thread), its output to ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-c", _CLI, "compress", str(recipe), "--out", str(out)], stdout=f,
                                stderr=subprocess.STDOUT, env=env)  # fmt: skip


def _wait_for(ready: Callable[[], bool], proc: subprocess.Popen[bytes], timeout_s: float = 120) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            return True
        time.sleep(0.005)
    return ready()


def _same_weights(a: Path, b: Path) -> bool:
    sa, sb = load_checkpoint(a)["state_dict"], load_checkpoint(b)["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_h16_sigkill_mid_step_then_resume(tmp_path, finetune_recipe, finetune_reference, capsys, seen):
    out, log = tmp_path / "run", tmp_path / "killed.log"
    last = out / "steps" / "01_finetune" / "last.pt"
    proc = _spawn(finetune_recipe, out, log)
    try:
        caught = _wait_for(last.is_file, proc)  # the finetune step has finished an epoch
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert caught and proc.returncode == -signal.SIGKILL, log.read_text()
    state = _json(out / "state.json")
    assert [e["index"] for e in state["finished"]] == [0] and not state["completed"]  # killed inside step 1
    done_epochs = load_checkpoint(last)["epoch"] + 1
    assert 1 <= done_epochs < 4

    assert main(["compress", str(finetune_recipe), "--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr()
    assert "[1/3] evaluate: finished earlier, skipped" in printed.err
    epochs = [int(e) for e in re.findall(r"^epoch (\d+)/4  loss", printed.out + printed.err, re.M)]
    assert epochs == list(range(done_epochs + 1, 5))  # training went on from its last epoch, repeating none
    assert _json(out / "metrics.json") == _json(finetune_reference / "metrics.json")
    assert _same_weights(
        out / "steps" / "01_finetune" / "model.pt", finetune_reference / "steps" / "01_finetune" / "model.pt"
    )
    histories = [_json(run / "steps" / "01_finetune" / "history.json") for run in (out, finetune_reference)]
    untimed = [[{k: v for k, v in e.items() if k != "time_s"} for e in h] for h in histories]
    assert untimed[0] == untimed[1] and len(untimed[0]) == 4  # every epoch's losses and mAP, as uninterrupted
    resumed = [ln.strip() for ln in printed.err.splitlines() if ln.startswith(("resuming", "[1/3]"))]
    seen(f"recovered: killed after epoch {done_epochs} of 4, --resume ran epochs {epochs}; metrics.json and weights "
         "identical to an uninterrupted run", " / ".join(resumed),
         _command("compress", "finetune.yaml", "--out", "run") + "; kill -9; " +
         _command("compress", "finetune.yaml", "--out", "run", "--resume"))  # fmt: skip


def test_h17_two_runs_in_one_run_directory(tmp_path, finetune_recipe, finetune_reference, capsys, seen):
    out, log = tmp_path / "run", tmp_path / "first.log"
    first = _spawn(finetune_recipe, out, log)
    try:
        assert _wait_for((out / "state.json").is_file, first), log.read_text()  # the first run holds the directory
        errors = [_cli_error(capsys, "compress", finetune_recipe, "--out", out, *extra) for extra in ([], ["--resume"])]
        still_running = first.poll() is None
    finally:
        assert first.wait(timeout=300) == 0, log.read_text()
    lock = out / "run.lock"
    for err in errors:
        assert err == (f"{out}: another slimdet run is writing into this run directory (pid {first.pid} holds {lock}); "
                       "wait for it to finish or choose another --out")  # fmt: skip
    assert still_running  # refused while the first one was writing, not after
    assert lock.read_text() == f"pid {first.pid}\n"  # the refused runs wrote nothing, not even the lock file
    assert _json(out / "metrics.json") == _json(finetune_reference / "metrics.json")  # the first run finished right
    assert _json(out / "state.json")["completed"]
    seen(
        "clear error; the first run finishes unharmed",
        errors[0].replace(str(first.pid), "PID"),
        _command("compress", "finetune.yaml", "--out", "run") + " (twice at once)",
    )
