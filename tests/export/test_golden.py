"""The integer golden model against ONNX Runtime's simulated quantization of the same QDQ graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
from torch import nn

from slimdet.errors import ExportError
from slimdet.export import export_onnx, onnx_session
from slimdet.export.golden import GoldenModel, compare_layers, qdq_reference, quantize_multiplier
from slimdet.export.golden_ops import run_layer


class TinyNet(nn.Module):
    """Conv+SiLU (Sigmoid, Mul), Slice, Add, Concat, MaxPool, Resize, depthwise conv, two outputs."""

    input_size = 32

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(4, 4, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.head = nn.Conv2d(16, 6, 1)

    def forward(self, x):
        x = F.silu(self.stem(x))
        a, b = x[:, :4], x[:, 4:]
        b = b + F.silu(self.mid(b))
        y = torch.cat([a, b], 1)
        up = F.interpolate(F.max_pool2d(self.dw(y), 2), scale_factor=2.0, mode="nearest")
        z = torch.cat([self.pool(y), up], 1)
        return self.head(z), torch.sigmoid(z)


class TinyClassifier(nn.Module):
    """HardSwish, Add of a constant, GlobalAveragePool, Flatten and Gemm (ORT folds the Relu into a Q)."""

    input_size = 16

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.conv2(F.hardswish(self.conv(x))) + 0.5)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _Reader(CalibrationDataReader):
    def __init__(self, size: int) -> None:
        rng = np.random.default_rng(0)
        self.batches = iter([{"images": rng.random((1, 3, size, size), dtype=np.float32)} for _ in range(4)])

    def get_next(self):
        return next(self.batches, None)


def _quantize(model: nn.Module, tmp: Path, name: str, **kw) -> Path:
    torch.manual_seed(0)
    for p in model.parameters():  # wider than the default init, so requantization really rounds
        nn.init.normal_(p, std=0.3)
    fp32, int8 = tmp / f"{name}_fp32.onnx", tmp / f"{name}_int8.onnx"
    export_onnx(model.eval(), fp32)
    quantize_static(
        str(fp32),
        str(int8),
        _Reader(model.input_size),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        **kw,
    )
    return int8


@pytest.fixture(scope="module")
def tiny_qdq(tmp_path_factory) -> Path:
    return _quantize(TinyNet(), tmp_path_factory.mktemp("golden"), "tiny")


def _image(size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((1, 3, size, size), dtype=np.float32)


def test_every_layer_within_one_lsb_teacher_forced(tiny_qdq):
    golden = GoldenModel.from_onnx(tiny_qdq)
    ops = {layer.op for layer in golden.layers()}
    assert {"QuantizeLinear", "Conv", "Sigmoid", "Mul", "Slice", "Add", "Concat", "MaxPool", "Resize"} <= ops
    conv = next(layer for layer in golden.layers() if layer.op == "Conv")
    assert conv.weight.dtype == np.int8 and conv.bias.dtype == np.int32
    assert conv.requant["out"].multiplier.shape == (8,)  # per output channel
    assert len(set(conv.weight_scale.tolist())) == 8  # per-channel weight scales
    assert conv.input_q[0].dtype == "uint8" and conv.output_q.dtype == "uint8"

    for seed in (1, 2):
        match = compare_layers(golden, tiny_qdq, _image(32, seed))
        assert len(match.layers) == len(golden.layers())
        assert match.ok and match.max_lsb <= 1, match.worst()
        assert all(d.frac_differ < 0.01 for d in match.layers)
        assert set(match.end_to_end_max_lsb) == {"out0", "out1"}
        assert max(match.end_to_end_max_lsb.values()) <= 2


def test_graph_outputs_close_to_onnxruntime_integer_execution(tiny_qdq):
    golden = GoldenModel.from_onnx(tiny_qdq)
    x = _image(32, 3)
    got = golden.run(x)
    want = dict(zip(["out0", "out1"], onnx_session(tiny_qdq, threads=1).run(None, {"images": x}), strict=True))
    for o in golden.outputs:
        scale = golden.tensors[o.tensor].scale
        assert got[o.name].dtype == np.float32 and got[o.name].shape == want[o.name].shape
        # ONNX Runtime's fused QLinear kernels round differently: a few LSB at most, free-running
        assert np.abs(got[o.name] - want[o.name]).max() <= 3 * scale + 1e-6
        assert np.mean(np.abs(got[o.name] - want[o.name]) > scale / 2) < 0.05

    kept = golden.run(x, keep=True)
    assert all(kept[layer.output].dtype == layer.output_q.dtype for layer in golden.layers())


def test_hardswish_gap_gemm_and_a_constant_operand(tmp_path):
    types = sorted({*QLinearOpsRegistry, *QDQRegistry, "HardSwish"})  # ORT's defaults plus HardSwish
    path = _quantize(TinyClassifier(), tmp_path, "cls", op_types_to_quantize=types)
    golden = GoldenModel.from_onnx(path)
    ops = [layer.op for layer in golden.layers()]
    assert ops == ["QuantizeLinear", "Conv", "HardSwish", "Conv", "Add", "GlobalAveragePool", "Flatten", "Gemm"]
    hswish, add, gemm = (golden.layers()[ops.index(op)] for op in ("HardSwish", "Add", "Gemm"))
    assert hswish.lut.shape == (256,) and hswish.lut.dtype == np.uint8
    assert gemm.weight.shape == (5, 8) and gemm.requant["out"].multiplier.shape == (5,)
    (const,) = golden.constants  # the "+ 0.5" is a quantized constant operand of the Add
    assert const in add.inputs and golden.constants[const].dtype == np.uint8
    match = compare_layers(golden, path, _image(16))
    assert match.ok, match.worst()
    assert match.end_to_end_max_lsb["out0"] <= 2


def _int8_graph(
    path: Path, middle: list[onnx.NodeProto], extra_init: list[onnx.TensorProto] = (), *, zp_out: str = "z"
) -> Path:
    """images -> Q(int8, symmetric) -> DQ -> <middle: x_dq -> y> -> Q -> DQ -> out."""
    init = [
        numpy_helper.from_array(np.array(0.02, np.float32), "s_in"),
        numpy_helper.from_array(np.array(0, np.int8), "z"),
        numpy_helper.from_array(np.array(0.03, np.float32), "s_out"),
        *extra_init,
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["images", "s_in", "z"], ["x_q"], name="q_in"),
        helper.make_node("DequantizeLinear", ["x_q", "s_in", "z"], ["x_dq"], name="dq_in"),
        *middle,
        helper.make_node("QuantizeLinear", ["y", "s_out", zp_out], ["y_q"], name="q_out"),
        helper.make_node("DequantizeLinear", ["y_q", "s_out", zp_out], ["out"], name="dq_out"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        init,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def _const(name: str, values, dtype=np.int64) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype), name)


MOVES = {  # id -> (op, attributes, constant inputs after the data input)
    "transpose": ("Transpose", {"perm": [0, 2, 3, 1]}, []),
    "flatten": ("Flatten", {"axis": 2}, []),
    "reshape": ("Reshape", {}, [_const("shape", [1, 0, -1])]),
    "split": ("Split", {"axis": 1}, [_const("split", [1, 3])]),
    "slice-reverse": (
        "Slice",
        {},
        [_const(n, v) for n, v in zip("seat", [[-1, 5], [-99, 0], [3, 1], [-1, -2]], strict=True)],
    ),
    "unsqueeze": ("Unsqueeze", {}, [_const("axes", [0])]),
    "maxpool-s2": ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, []),
    "resize-half-pixel": (
        "Resize",
        {"mode": "nearest"},
        [_const("roi", [], np.float32), _const("sc", [1, 1, 2, 2], np.float32)],
    ),
    "resize-sizes-align": (
        "Resize",
        {"mode": "nearest", "coordinate_transformation_mode": "align_corners", "nearest_mode": "ceil"},
        [_const("roi", [], np.float32), _const("", [], np.float32), _const("sz", [1, 4, 9, 4])],
    ),
    "resize-asym-floor": (
        "Resize",
        {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
        [_const("roi", [], np.float32), _const("sc", [1, 1, 1.5, 0.5], np.float32)],
    ),
}


@pytest.mark.parametrize("case", list(MOVES))
def test_int8_data_movement_matches_reference(tmp_path, case):
    op, kw, extra = MOVES[case]
    inputs = ["x_dq"] + [t.name for t in extra]
    outputs = ["y", "unused"] if op == "Split" else ["y"]
    init = [t for t in extra if t.name]
    path = _int8_graph(tmp_path / f"{case}.onnx", [helper.make_node(op, inputs, outputs, name="mover", **kw)], init)
    golden = GoldenModel.from_onnx(path)
    (layer,) = [lay for lay in golden.layers() if lay.op == op]
    assert "out" in layer.requant  # s_in = 0.02, s_out = 0.03: requantized after the move
    x = np.random.default_rng(0).normal(size=(1, 4, 6, 6)).astype(np.float32)
    match = compare_layers(golden, path, x)
    assert match.max_lsb <= 1 and match.end_to_end_max_lsb["out"] <= 1, match.worst()
    assert golden.run(x)["out"].shape == qdq_reference(path, x)["out"].shape


def test_identity_on_a_constant_is_folded(tmp_path):
    # The TorchScript exporter routes shared constants (here the zero point) through Identity nodes.
    middle = [helper.make_node("Identity", ["z"], ["z_shared"]), helper.make_node("Relu", ["x_dq"], ["y"], name="r")]
    path = _int8_graph(tmp_path / "ident.onnx", middle, zp_out="z_shared")
    golden = GoldenModel.from_onnx(path)
    assert [layer.op for layer in golden.layers()] == ["QuantizeLinear", "Relu"]
    x = np.random.default_rng(0).normal(size=(1, 4, 6, 6)).astype(np.float32)
    assert compare_layers(golden, path, x).max_lsb == 0
    np.testing.assert_allclose(golden.run(x)["out"], qdq_reference(path, x)["out"], atol=1e-7)


def test_unsupported_op_is_a_clear_error(tmp_path):
    path = _int8_graph(tmp_path / "cos.onnx", [helper.make_node("Cos", ["x_dq"], ["y"], name="my_cos")])
    with pytest.raises(ExportError, match=r"cos\.onnx: node 'my_cos' \(Cos\): op type 'Cos' is not supported"):
        GoldenModel.from_onnx(path)


def test_float_op_outside_qdq_is_a_clear_error(tmp_path):
    middle = [
        helper.make_node("Relu", ["x_dq"], ["r"], name="relu_float"),
        helper.make_node("Sigmoid", ["r"], ["y"], name="sig"),
    ]
    path = _int8_graph(tmp_path / "float.onnx", middle)
    with pytest.raises(ExportError, match=r"node 'relu_float' \(Relu\): its float output 'r' feeds node 'sig'"):
        GoldenModel.from_onnx(path)


def test_fixed_point_multiplier_decomposition():
    rng = np.random.default_rng(0)
    reals = np.concatenate([rng.uniform(1e-6, 1, 500), 10 ** rng.uniform(-9, 0, 500), rng.uniform(1, 5000, 500)])
    fp = quantize_multiplier(reals)
    m0, n = fp.multiplier.astype(np.int64), fp.shift.astype(np.int64)
    assert fp.multiplier.dtype == np.int32 and fp.shift.dtype == np.int8
    assert np.all((m0 >= 2**30) & (m0 < 2**31))
    approx = m0 * np.exp2(-31.0 - n)
    assert np.max(np.abs(approx - reals) / reals) <= 2.0**-31 * 1.0001
    np.testing.assert_array_equal(fp.real, reals)

    # applying it: round(x * M) for int32 inputs, to within the multiplier's own error
    x = rng.integers(-(2**20), 2**20, size=reals.size)
    got = quantize_multiplier(reals).apply(x, axis=0)
    exact = x * reals
    assert np.all(np.abs(got - exact) <= 0.5 + np.abs(exact) * 2.0**-30 + 1e-9)
    assert np.array_equal(quantize_multiplier(1.0).apply(np.arange(-300, 300)), np.arange(-300, 300))
    assert quantize_multiplier(0.5).apply(np.array([1, 3, -1, -3])).tolist() == [1, 2, 0, -1]  # ties round up
    tiny = quantize_multiplier(1e-12)
    assert tiny.multiplier[0] == 0 and tiny.apply(np.array([2**31 - 1]))[0] == 0
    with pytest.raises(ValueError):
        quantize_multiplier(-1.0)


def test_conv_float64_accumulation_is_exact_integer_arithmetic(tiny_qdq):
    golden = GoldenModel.from_onnx(tiny_qdq)
    layer = next(lay for lay in golden.layers() if lay.op == "Conv" and lay.attrs["kernel_shape"] == [1, 1])
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(1, layer.weight.shape[1], 5, 5)).astype(np.uint8)
    got = run_layer(layer, [x])
    acc = np.einsum(
        "nchw,mc->nmhw", x.astype(np.int64) - layer.input_q[0].zero_point, layer.weight[:, :, 0, 0].astype(np.int64)
    ) + layer.bias.astype(np.int64).reshape(1, -1, 1, 1)
    want = layer.output_q.saturate(layer.requant["out"].apply(acc, axis=1) + layer.output_q.zero_point)
    np.testing.assert_array_equal(got, want)


def test_a_wrong_multiplier_is_caught(tiny_qdq):
    golden = GoldenModel.from_onnx(tiny_qdq)
    i = next(k for k, lay in enumerate(golden.layers()) if lay.op == "Mul")
    layers = golden.layers()
    bad = layers[i].requant["out"]
    bad.multiplier[...] = (bad.multiplier.astype(np.int64) * 103 // 100).astype(np.int32)  # 3 % too large
    match = compare_layers(golden, tiny_qdq, _image(32))
    assert not match.ok and match.worst(1)[0].name == layers[i].name and match.worst(1)[0].max_lsb > 1
