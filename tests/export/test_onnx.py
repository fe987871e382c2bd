import numpy as np
import onnx
import pytest
import torch
from torch import nn

from slimdet.errors import ConfigError
from slimdet.export import ExportError, export_onnx, onnx_session
from slimdet.export import onnx as onnx_export
from slimdet.models.base import Detector


class TinyConvDetector(Detector):
    """Two raw outputs (a feature map and a flattened head), as a one-stage detector returns."""

    def __init__(self, num_classes: int = 3, input_size: int = 32):
        super().__init__(num_classes=num_classes, input_size=input_size)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.SiLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 1), nn.ReLU(),
        )
        self.head = nn.Conv2d(16, 4 + num_classes, 1)

    def forward(self, images):
        feat = self.body(images)
        out = self.head(feat)
        return out, out.flatten(2).transpose(1, 2).sigmoid()


def _model() -> TinyConvDetector:
    torch.manual_seed(0)
    model = TinyConvDetector()
    model.train()
    with torch.no_grad():  # non-trivial BN statistics so eval mode matters
        model(torch.rand(4, 3, 32, 32))
    return model


def test_export_matches_pytorch_within_atol(tmp_path):
    model = _model()
    path = tmp_path / "sub" / "tiny.onnx"
    result = export_onnx(model, path)
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    assert result.exporter == "torchscript" and result.opset == 17
    assert result.output_names == ("out0", "out1")
    assert result.input_name == "images" and result.input_shape == (1, 3, 32, 32)
    assert result.size_bytes == path.stat().st_size > 0
    assert result.op_counts["Conv"] == 4  # the BatchNorm is folded into the first conv
    assert result.num_nodes == sum(result.op_counts.values())
    assert model.training  # restored
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["tiny.onnx"]  # no temp files left

    # The file itself, independently of the check: same outputs as eval-mode PyTorch.
    x = torch.rand(1, 3, 32, 32)
    got = onnx_session(path, threads=1).run(None, {"images": x.numpy()})
    with torch.no_grad():
        want = model.eval()(x)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-4)
    assert result.to_dict()["output_names"] == ["out0", "out1"]


def test_dynamic_batch(tmp_path):
    result = export_onnx(_model(), tmp_path / "dyn.onnx", batch_size=2, dynamic_batch=True)
    assert result.input_shape == ("batch", 3, 32, 32)
    outs = onnx_session(result.path, threads=1).run(None, {"images": np.random.rand(5, 3, 32, 32).astype(np.float32)})
    assert [o.shape for o in outs] == [(5, 7, 16, 16), (5, 256, 7)]


def test_auto_falls_back_to_the_dynamo_exporter(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("TorchScript exporter removed")

    monkeypatch.setattr(onnx_export, "_export_torchscript", broken)
    result = export_onnx(_model(), tmp_path / "d.onnx", dynamic_batch=True)
    assert result.exporter == "dynamo" and result.opset >= 18
    assert result.max_abs_diff <= 1e-4  # checked at batch 1 and batch 2
    assert result.input_shape == ("batch", 3, 32, 32)
    assert onnx.load(result.path).graph.output[0].name == "out0"


def test_no_working_exporter_names_both_failures(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported op")

    monkeypatch.setattr(onnx_export, "_export_torchscript", broken)
    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    with pytest.raises(ExportError, match="torchscript exporter: RuntimeError: unsupported op; dynamo exporter"):
        export_onnx(_model(), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="torchscript exporter") as info:
        export_onnx(_model(), tmp_path / "m.onnx", exporter="torchscript")
    assert "dynamo" not in str(info.value)  # an explicit choice does not fall back
    assert list(tmp_path.iterdir()) == []


class CountingDetector(TinyConvDetector):
    """Its output depends on how often forward ran: the traced graph freezes a different count."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        out, _ = super().forward(images)
        return out * self.calls


def test_failed_check_raises_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_onnx(CountingDetector(), path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_export_leaves_global_rng_alone(tmp_path):
    model = _model()
    state = torch.random.get_rng_state()
    export_onnx(model, tmp_path / "m.onnx", check=True)
    assert torch.equal(state, torch.random.get_rng_state())


def test_bad_options_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown exporter 'tvm'"):
        export_onnx(_model(), tmp_path / "m.onnx", exporter="tvm")
    with pytest.raises(ConfigError, match="batch_size"):
        export_onnx(_model(), tmp_path / "m.onnx", batch_size=0)


def test_onnx_session_uses_requested_threads(tmp_path):
    path = export_onnx(_model(), tmp_path / "m.onnx", check=False).path
    opts = onnx_session(path, threads=2).get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (2, 1)
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    spinning = onnx_session(path, threads=1, spinning=True).get_session_options()
    assert spinning.get_session_config_entry("session.intra_op.allow_spinning") == "1"


def test_yolo_test_exports(tmp_path):
    from slimdet.models import create_model

    model = create_model("yolo-test", num_classes=3)
    result = export_onnx(model, tmp_path / "yolo.onnx")
    assert result.max_abs_diff <= 1e-4
    assert result.input_shape == (1, 3, model.input_size, model.input_size)
