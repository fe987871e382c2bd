"""slim_onnx: onnxslim on an exported detector (op counts, checked outputs); the export step's slim option."""

import copy
import json

import numpy as np
import onnx
import pytest
import torch

from slimdet.errors import ConfigError, ExportError
from slimdet.export.onnx import export_onnx, onnx_session
from slimdet.export.slim import op_counts, slim_onnx


@pytest.fixture(scope="module")
def exported(fitted_tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("slim") / "model.onnx"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run outside the one-thread fixture of conftest
    try:
        export_onnx(copy.deepcopy(fitted_tiny), path, check=False)
    finally:
        torch.set_num_threads(before)
    return path


def test_slim_removes_constant_nodes_and_keeps_the_outputs(exported, tmp_path):
    dst = tmp_path / "slim.onnx"
    result = slim_onnx(exported, dst)
    before, after = result.op_counts_before, result.op_counts_after
    assert before == op_counts(onnx.load(str(exported))) and after == op_counts(onnx.load(str(dst)))
    assert before.get("Constant", 0) > 0 and "Constant" not in after  # folded into initializers
    assert result.nodes_after == sum(after.values()) < result.nodes_before
    assert after["Conv"] == before["Conv"]
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    x = np.random.default_rng(3).random((1, 3, 64, 64), dtype=np.float32)
    a = onnx_session(exported, 1).run(None, {"images": x})
    b = onnx_session(dst, 1).run(None, {"images": x})
    assert all(np.allclose(u, v, atol=1e-5) for u, v in zip(a, b, strict=True))
    assert json.loads(json.dumps(result.to_dict()))["nodes_after"] == result.nodes_after


def test_slim_in_place_and_bad_files(exported, tmp_path):
    copy_path = tmp_path / "m.onnx"
    copy_path.write_bytes(exported.read_bytes())
    result = slim_onnx(copy_path, copy_path, check=False)
    assert result.max_abs_diff is None and op_counts(onnx.load(str(copy_path))) == result.op_counts_after
    with pytest.raises(ConfigError, match="does not exist"):
        slim_onnx(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(ExportError, match="bad.onnx"):
        slim_onnx(tmp_path / "bad.onnx", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_export_step_slim_option_reports_op_counts(tiny_digits, tmp_path):
    from slimdet.pipeline import run_recipe

    steps = [{"graph": {"check_images": 2}}, {"export": {"slim": True}}]
    recipe = {"model": "yolo-test", "dataset": str(tiny_digits), "input_size": 64, "steps": steps}
    run_recipe(recipe, out_dir=tmp_path / "run", progress=False)
    rec = json.loads((tmp_path / "run" / "steps" / "01_export" / "record.json").read_text())
    metrics = rec["metrics"]
    assert metrics["nodes_after"] < metrics["nodes_before"]
    assert "Constant" in metrics["op_counts_before"] and "Constant" not in metrics["op_counts_after"]
    assert "BatchNormalization" not in metrics["op_counts_after"]
    assert metrics["size_bytes"] == (tmp_path / "run" / "steps" / "01_export" / "model.onnx").stat().st_size
