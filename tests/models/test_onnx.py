import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from slimdet.errors import ConfigError, ExportError
from slimdet.evaluate import evaluate
from slimdet.export.onnx import export_onnx
from slimdet.models import create_model
from slimdet.models.onnx import OrtDetector


@pytest.fixture(scope="module")
def dynamic_onnx(fitted_tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("ort") / "dynamic.onnx"
    export_onnx(fitted_tiny, path, dynamic_batch=True, atol=1e-3)
    return path


def test_map_equals_the_torch_models(fitted_tiny, dynamic_onnx, tiny_test_ds):
    ort_model = OrtDetector(dynamic_onnx, like=fitted_tiny)
    want = evaluate(fitted_tiny, tiny_test_ds, batch_size=4, progress=False)
    got = evaluate(ort_model, tiny_test_ds, batch_size=4, progress=False)
    assert 0.05 < want.map < 0.9  # a model that finds some digits, not a trivial 0 == 0
    assert got.map == pytest.approx(want.map, abs=1e-3)
    assert got.map50 == pytest.approx(want.map50, abs=1e-3)
    assert abs(got.num_detections - want.num_detections) <= 2
    assert ort_model.batch_size is None and list(ort_model.parameters()) == []


def test_raw_outputs_match_and_keep_the_structure(fitted_tiny, dynamic_onnx):
    ort_model = OrtDetector(dynamic_onnx, like=fitted_tiny)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    got = ort_model(x)
    with torch.no_grad():
        want = fitted_tiny(x)
    assert isinstance(got, tuple) and len(got) == len(want) == 3
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)
    assert (ort_model.num_classes, ort_model.input_size) == (10, 64)
    dets = ort_model.predict(x, conf_thres=0.01)
    ref = fitted_tiny.predict(x, conf_thres=0.01)
    assert [len(d["boxes"]) for d in dets] == [len(d["boxes"]) for d in ref]
    torch.testing.assert_close(dets[0]["scores"], ref[0]["scores"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("file_batch", "call_batch"), [(1, 4), (2, 5), (4, 3)], ids=["b1-call4", "b2-call5", "b4-call3"]
)
def test_fixed_batch_file_serves_any_batch(fitted_tiny, tmp_path, file_batch, call_batch):
    path = tmp_path / f"b{file_batch}.onnx"
    export_onnx(fitted_tiny, path, batch_size=file_batch, atol=1e-3)
    ort_model = OrtDetector(path, like=fitted_tiny)
    assert ort_model.batch_size == file_batch
    x = torch.rand(call_batch, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = fitted_tiny(x)
    for a, b in zip(ort_model(x), want, strict=True):
        assert a.shape == b.shape  # padded images of the last chunk are dropped
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)


def test_fixed_batch_file_gives_the_same_map(fitted_tiny, tmp_path, tiny_test_ds):
    path = tmp_path / "b1.onnx"
    export_onnx(fitted_tiny, path, batch_size=1, atol=1e-3)
    want = evaluate(fitted_tiny, tiny_test_ds, batch_size=4, progress=False)
    got = evaluate(OrtDetector(path, like=fitted_tiny), tiny_test_ds, batch_size=4, progress=False)
    assert got.map == pytest.approx(want.map, abs=1e-3)


def test_missing_or_unreadable_file_names_it(fitted_tiny, tmp_path):
    with pytest.raises(ConfigError, match="nope.onnx does not exist"):
        OrtDetector(tmp_path / "nope.onnx", like=fitted_tiny)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf")
    with pytest.raises(ExportError, match="junk.onnx: ONNX Runtime cannot load"):
        OrtDetector(junk, like=fitted_tiny)


def test_graph_that_is_not_a_detector_export(fitted_tiny, tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 64, 64])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "identity.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    with pytest.raises(ExportError, match=r"identity.onnx: expected one graph input named 'images'.*\['x'\]"):
        OrtDetector(path, like=fitted_tiny)


def test_file_of_another_detector_is_refused(fitted_tiny, dynamic_onnx):
    bigger = create_model("yolo-test", num_classes=10, input_size=96)
    with pytest.raises(ConfigError, match=r"dynamic.onnx: input 'images' has shape \['batch', 3, 64, 64\].*96"):
        OrtDetector(dynamic_onnx, like=bigger)
    fewer_classes = create_model("yolo-test", num_classes=3, input_size=64)
    with pytest.raises(ConfigError, match=r"dynamic.onnx: output 'out0' has shape.*num_classes=3"):
        OrtDetector(dynamic_onnx, like=fewer_classes)
    with pytest.raises(ConfigError, match="like= must be a slimdet Detector"):
        OrtDetector(dynamic_onnx, like=torch.nn.Conv2d(3, 3, 1))


def test_input_is_cast_to_the_files_dtype(fitted_tiny, dynamic_onnx):
    ort_model = OrtDetector(dynamic_onnx, like=fitted_tiny)
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    got = ort_model(x)
    assert all(t.dtype == torch.float32 for t in got)
    np.testing.assert_allclose(got[0].numpy(), ort_model(x.float())[0].numpy())
