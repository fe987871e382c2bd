import json

import onnx
import pytest
import torch

from slimdet.compress.quant.graph import quantizers
from slimdet.errors import ConfigError
from slimdet.models import load_model
from slimdet.pipeline import run_recipe
from slimdet.pipeline.recipe import load_recipe


def _recipe(tiny_digits, steps):
    return {"model": "yolo-test", "dataset": str(tiny_digits), "input_size": 64, "steps": steps}


def test_quantize_step_writes_int8_onnx_checks_it_and_checkpoints_round_trip(tiny_digits, tmp_path):
    quant = {"calib_images": 8, "calib_batches": 2, "check_split": "test", "adaround": False, "runtime_aware": False,
             "overrides": {"heads\\..*": {"weight_bits": 4}}}  # fmt: skip
    steps = [{"quantize": quant}, {"export": {"filename": "final.onnx"}}]
    result = run_recipe(_recipe(tiny_digits, steps), out_dir=tmp_path / "run", progress=False)

    step = tmp_path / "run" / "steps" / "00_quantize"
    rec = json.loads((step / "record.json").read_text())
    metrics = rec["metrics"]
    assert metrics["consistency_gap_points"] <= 0.5
    assert metrics["weight_bytes_ratio_fp32"] < 0.25  # int8 everywhere, 4-bit heads
    assert 4 <= metrics["mean_weight_bits"] < 8
    assert (step / "model_int8.onnx").is_file() and (step / "weight_bits.png").stat().st_size > 1000
    assert rec["record"]["weight_bits"]["heads.0.box_pred"] in (4, 32)
    assert {row["layer"] for row in rec["record"]["layers"]} == set(rec["record"]["weight_bits"])
    html = (tmp_path / "run" / "report.html").read_text()
    assert html.count("data:image/png;base64") >= 1 and "weight bits" in html  # the per-layer bits plot

    model, _ = load_model(step / "model.pt")
    assert len(quantizers(model)) == len(quantizers(result.model)) > 100
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model.eval()
    result.model.eval()
    with torch.no_grad():
        for a, b in zip(model(x), result.model(x), strict=True):
            assert torch.equal(a, b)
    exported = onnx.load(str(tmp_path / "run" / "steps" / "01_export" / "final.onnx"))
    assert sum(i.data_type == onnx.TensorProto.INT8 for i in exported.graph.initializer) > 10

    resumed = run_recipe(_recipe(tiny_digits, steps), out_dir=tmp_path / "run", resume=True, progress=False)
    assert resumed.skipped == ["00_quantize", "01_export"]


def test_quantize_step_options_are_validated(tiny_digits):
    with pytest.raises(ConfigError, match="weight_bits"):
        load_recipe(_recipe(tiny_digits, [{"quantize": {"weight_bits": 9}}]))
    with pytest.raises(ConfigError, match="calib_image"):
        load_recipe(_recipe(tiny_digits, [{"quantize": {"calib_image": 3}}]))


def test_qat_recipe_trains_step_sizes_through_finetune(tiny_digits, tmp_path):
    quant = {"calib_images": 8, "calib_batches": 2, "weight_bits": 4, "qat": True, "adaround": False,
             "runtime_aware": False, "auto_keep": False, "check": False}  # fmt: skip
    finetune = {"epochs": 1, "batch_size": 4, "max_steps_per_epoch": 2, "val_split": None, "threads": 1}
    steps = [{"quantize": quant}, {"finetune": finetune}]
    run_recipe(_recipe(tiny_digits, steps), out_dir=tmp_path / "run", progress=False)
    before, _ = load_model(tmp_path / "run" / "steps" / "00_quantize" / "model.pt")
    after, _ = load_model(tmp_path / "run" / "steps" / "01_finetune" / "model.pt")
    scales = [(a.scale, b.scale) for a, b in zip(quantizers(before).values(), quantizers(after).values(), strict=True)
              if b.scale.requires_grad]  # fmt: skip
    assert scales and any(not torch.equal(a, b) for a, b in scales)  # LSQ step sizes learned
    zeros = [(a.zero_point, b.zero_point) for a, b in zip(quantizers(before).values(), quantizers(after).values(),
                                                          strict=True)]  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zeros)  # integer zero points untouched by the EMA


def test_hw_package_needs_every_layer_integer(tiny_digits, tmp_path):
    quant = {"calib_images": 8, "calib_batches": 2, "adaround": False, "runtime_aware": False, "check": False,
             "keep_float": ["heads.0.cls_pred"], "hw_package": True}  # fmt: skip
    with pytest.raises(ConfigError, match="every layer in integers"):
        run_recipe(_recipe(tiny_digits, [{"quantize": quant}]), out_dir=tmp_path / "a", progress=False)
    quant.update(keep_float=[], auto_keep=False, float_outputs=True)
    with pytest.raises(ConfigError, match="float_outputs: false"):  # raw predictions in float are not integer
        run_recipe(_recipe(tiny_digits, [{"quantize": quant}]), out_dir=tmp_path / "c", progress=False)
    quant.update(float_outputs=False)
    run_recipe(_recipe(tiny_digits, [{"quantize": quant}]), out_dir=tmp_path / "b", progress=False)
    assert (tmp_path / "b" / "steps" / "00_quantize" / "hw_package" / "manifest.json").is_file()
