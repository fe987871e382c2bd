"""The integer layers of the golden model: fixed-point arithmetic, layer specs, builders and kernels.

A builder turns one ONNX node (with its DQ inputs and Q output) into a LayerSpec, which is plain data:
integer arrays, fixed-point multipliers, lookup tables and JSON-able attributes. A kernel runs a
LayerSpec on integer inputs. Kernels read nothing but the spec, so a spec loaded from a hardware
package runs exactly like one built from ONNX.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper

from slimdet.errors import ExportError
from slimdet.registry import Registry

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
#: the fixed-point mantissa M0 is a Q31 number in [0.5, 1): M = M0 * 2^-31 * 2^-n
Q31 = 31


class Unsupported(Exception):
    """A node pattern the golden model does not implement; the reader adds the file and node name."""


# ---------------------------------------------------------------------------- quantization and fixed point


@dataclass(frozen=True)
class QParams:
    """Per-tensor affine quantization: real = scale * (q - zero_point), q of ``dtype``."""

    scale: float
    zero_point: int
    dtype: str  # numpy dtype name: "uint8", "int8", "int16", "int32", ...

    @property
    def bits(self) -> int:
        return np.iinfo(self.dtype).bits

    @property
    def qmin(self) -> int:
        return int(np.iinfo(self.dtype).min)

    @property
    def qmax(self) -> int:
        return int(np.iinfo(self.dtype).max)

    def saturate(self, q: np.ndarray) -> np.ndarray:
        return np.clip(q, self.qmin, self.qmax).astype(self.dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return ((q.astype(np.int64) - self.zero_point).astype(np.float32) * np.float32(self.scale)).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "zero_point": self.zero_point, "dtype": self.dtype, "bits": self.bits}


@dataclass(frozen=True, eq=False)
class FixedPoint:
    """A positive real multiplier M ~= M0 * 2^-(31 + n): int32 mantissa M0 and int8 shift n.

    M0 lies in [2^30, 2^31) (Q31, Jacob et al. 2018, section 2.2), or is 0 for M < 2^-32 (the product
    rounds to 0 for every int32 input). n < 0 is a left shift (M >= 1).
    """

    multiplier: np.ndarray  # int32, shape (C,) per channel or (1,)
    shift: np.ndarray  # int8, same shape
    real: np.ndarray = field(repr=False)  # float64, the exact M it approximates (informational)

    def apply(self, x: np.ndarray, axis: int | None = None) -> np.ndarray:
        """round(x * M) for integers |x| < 2^31: ``(x * M0 + 2^(30 + n)) >> (31 + n)`` in int64."""
        m0 = self.multiplier.astype(np.int64)
        total = Q31 + self.shift.astype(np.int64)
        if m0.size > 1:
            shape = [1] * x.ndim
            shape[axis if axis is not None else -1] = -1
            m0, total = m0.reshape(shape), total.reshape(shape)
        else:
            m0, total = m0.reshape(()), total.reshape(())
        return (x.astype(np.int64) * m0 + np.left_shift(np.int64(1), total - 1)) >> total


def quantize_multiplier(real: float | np.ndarray) -> FixedPoint:
    """Decompose M > 0 (scalar or per channel) into an int32 Q31 mantissa and an int8 shift.

    The relative error of M0 * 2^-(31 + n) is at most 2^-31 (M0 >= 2^30, rounded to nearest).
    """
    m = np.atleast_1d(np.asarray(real, dtype=np.float64)).reshape(-1)
    if not np.all(np.isfinite(m)) or np.any(m < 0):
        raise ValueError(f"fixed-point multipliers must be finite and >= 0, got {m[~np.isfinite(m) | (m < 0)][:3]}")
    mant, exp = np.frexp(m)  # m = mant * 2^exp, mant in [0.5, 1)
    m0 = np.rint(mant * 2.0**Q31).astype(np.int64)
    carry = m0 == 2**Q31
    m0[carry] //= 2
    exp = exp.astype(np.int64) + carry
    n = -exp
    if np.any((n < -30) & (m0 > 0)):
        raise ValueError(f"fixed-point multiplier too large (>= 2^30): {m.max():g}")
    tiny = (n > Q31) | (m0 == 0)  # M < 2^-32: x * M rounds to 0 for every |x| < 2^31
    m0[tiny], n[tiny] = 0, 0
    return FixedPoint(m0.astype(np.int32), n.astype(np.int8), m)


# ---------------------------------------------------------------------------- layer specs


@dataclass(frozen=True, eq=False)
class LayerSpec:
    """One integer layer: everything an accelerator needs to compute its output tensor."""

    name: str
    op: str  # ONNX op type, or "QuantizeLinear" (graph input) / "Requantize" (Q after DQ)
    inputs: tuple[str, ...]  # quantized tensors or constants (the QuantizeLinear layer: the float graph input)
    output: str
    input_shapes: tuple[tuple[int, ...], ...]  # -1 where unknown; () where unknown rank
    output_shape: tuple[int, ...]
    input_q: tuple[QParams | None, ...]  # None for a float input
    output_q: QParams
    attrs: Mapping[str, Any] = field(default_factory=dict)  # JSON-able op attributes and constant inputs
    weight: np.ndarray | None = None  # int8; Conv (M, C/group, kh, kw), Gemm/MatMul (N, K)
    weight_scale: np.ndarray | None = None  # float32 per output channel (informational: folded into requant)
    bias: np.ndarray | None = None  # int32 at scale s_x * s_w, per output channel
    lut: np.ndarray | None = None  # output code for every input code qmin..qmax
    requant: Mapping[str, FixedPoint] = field(default_factory=dict)  # role ("out", "in0", ...) -> multiplier

    @property
    def weight_bits(self) -> int | None:
        """Smallest signed width holding the weights (4 for a [-7, 7] range stored in int8)."""
        if self.weight is None:
            return None
        return int(np.abs(self.weight.astype(np.int64)).max(initial=0)).bit_length() + 1


@dataclass(frozen=True)
class Operand:
    """An input of a compute node: an activation behind a DQ, a constant behind a DQ, or a float constant."""

    kind: str  # "act" | "const" | "float"
    tensor: str = ""
    value: np.ndarray | None = None
    qparams: QParams | None = None
    scale: np.ndarray | None = None  # const: per-channel scales
    axis: int = 1  # const: the DQ's channel axis
    shape: tuple[int, ...] = ()  # -1 where unknown


@dataclass(frozen=True)
class Site:
    """What a builder sees: one compute node, its operands, and the QuantizeLinear output it feeds."""

    name: str
    node: onnx.NodeProto
    operands: list[Operand | None]
    output_index: int  # which of the node's outputs the Q quantizes
    output: str
    output_q: QParams
    output_shape: tuple[int, ...]

    @property
    def op(self) -> str:
        return self.node.op_type

    def spec(self, xs: list[Operand], **fields: Any) -> LayerSpec:
        """A LayerSpec for this site with quantized inputs ``xs``."""
        return LayerSpec(
            name=self.name,
            op=self.op,
            inputs=tuple(x.tensor for x in xs),
            output=self.output,
            input_shapes=tuple(x.shape for x in xs),
            output_shape=self.output_shape,
            input_q=tuple(x.qparams for x in xs),
            output_q=self.output_q,
            **fields,
        )


Builder = Callable[[Site], LayerSpec]
Kernel = Callable[[LayerSpec, list[np.ndarray]], np.ndarray]

BUILDERS: Registry[Builder] = Registry("golden-model op")
KERNELS: Registry[Kernel] = Registry("golden-model kernel")


def run_layer(spec: LayerSpec, inputs: list[np.ndarray]) -> np.ndarray:
    return KERNELS.get(spec.op)(spec, inputs)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else list(v) if isinstance(v, (list, tuple)) else v
    return out


def _act(site: Site, i: int, *, const: bool = False) -> Operand:
    """Operand i as a quantized tensor: an activation, or (``const``) a per-tensor quantized constant."""
    node_op, operands = site.op, site.operands
    op = operands[i] if i < len(operands) else None
    if op is not None and op.kind == "const" and const:
        if op.scale is not None and op.scale.size > 1:
            raise Unsupported(f"{node_op} input {i}: a per-channel quantized constant is not supported here")
        return op
    if op is None or op.kind != "act":
        what = "quantized tensor" if const else "quantized activation"
        raise Unsupported(f"{node_op} input {i} must be a {what} (behind a DequantizeLinear)")
    return op


def _consts(site: Site, first: int) -> list[list[float] | None]:
    out: list[list[float] | None] = []
    for op in site.operands[first:]:
        if op is None:
            out.append(None)
        elif op.kind == "float":
            out.append(np.asarray(op.value).reshape(-1).tolist())
        else:
            raise Unsupported("its shape/index inputs must be constants")
    return out


def _check_acc(spec: LayerSpec, acc: np.ndarray) -> None:
    if acc.size and (acc.min() < INT32_MIN or acc.max() > INT32_MAX):
        raise ExportError(f"layer {spec.name!r} ({spec.op}): int32 accumulator overflow ({acc.min()}..{acc.max()})")


# ---------------------------------------------------------------------------- boundary layers


def build_quantize_input(
    *, name: str, source: str, source_shape: tuple[int, ...], output: str, output_q: QParams, output_shape: tuple
) -> LayerSpec:
    return LayerSpec(name, "QuantizeLinear", (source,), output, (source_shape,), output_shape, (None,), output_q)


def quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    """ONNX QuantizeLinear in float32: saturate(round_half_even(x / scale) + zero_point)."""
    x = np.asarray(x, dtype=np.float32)
    return qp.saturate(np.rint(x / np.float32(qp.scale)).astype(np.int64) + qp.zero_point)


@KERNELS.register("QuantizeLinear")
def _quantize_input(spec: LayerSpec, inputs: list[np.ndarray]) -> np.ndarray:
    return quantize(inputs[0], spec.output_q)


def build_requantize(*, name: str, x: Operand, output: str, output_q: QParams, output_shape: tuple) -> LayerSpec:
    assert x.qparams is not None
    fp = quantize_multiplier(x.qparams.scale / output_q.scale)
    return LayerSpec(
        name, "Requantize", (x.tensor,), output, (x.shape,), output_shape, (x.qparams,), output_q, requant={"out": fp}
    )


def _requant(spec: LayerSpec, q: np.ndarray, qin: QParams, role: str = "out") -> np.ndarray:
    return spec.output_q.saturate(
        spec.requant[role].apply(q.astype(np.int64) - qin.zero_point) + spec.output_q.zero_point
    )


@KERNELS.register("Requantize")
def _requantize(spec: LayerSpec, inputs: list[np.ndarray]) -> np.ndarray:
    assert spec.input_q[0] is not None
    return _requant(spec, inputs[0], spec.input_q[0])


# ---------------------------------------------------------------------------- Conv, Gemm, MatMul


@BUILDERS.register("Conv")
@BUILDERS.register("Gemm")
@BUILDERS.register("MatMul")
def _build_linear(site: Site) -> LayerSpec:
    op, operands = site.op, site.operands
    x = _act(site, 0)
    w = operands[1] if len(operands) > 1 else None
    if w is None or w.kind != "const":
        raise Unsupported(f"{op} weights must be an integer initializer behind a DequantizeLinear")
    assert w.value is not None and w.scale is not None and w.qparams is not None and x.qparams is not None
    if w.value.dtype != np.int8 or w.qparams.zero_point != 0:
        raise Unsupported(f"{op} weights must be 8-bit symmetric (zero point 0), got {w.qparams.dtype}")
    attrs = _attrs(site.node)
    weight, channel_axis = w.value, w.axis % max(w.value.ndim, 1)
    if op == "Conv":
        if weight.ndim != 4 or attrs.get("auto_pad", "NOTSET") != "NOTSET":
            raise Unsupported("only 2-D Conv with explicit pads (auto_pad NOTSET) is supported")
        k = weight.shape[2:]
        attrs = {
            "strides": list(attrs.get("strides", [1, 1])),
            "pads": list(attrs.get("pads", [0, 0, 0, 0])),
            "dilations": list(attrs.get("dilations", [1, 1])),
            "group": int(attrs.get("group", 1)),
            "kernel_shape": list(k),
        }
    else:
        if op == "Gemm" and (attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0)):
            raise Unsupported("Gemm with alpha != 1, beta != 1 or transA is not supported")
        if weight.ndim != 2:
            raise Unsupported(f"{op} weights must be 2-D")
        if not (op == "Gemm" and attrs.get("transB", 0)):  # store as (N, K): one row per output channel
            weight, channel_axis = weight.T, 1 - channel_axis
        attrs = {}
    if w.scale.size > 1 and channel_axis != 0:
        raise Unsupported(f"{op} per-channel weight scales must be along the output channels")
    n_out = weight.shape[0]
    w_scale = np.broadcast_to(w.scale, (n_out,)).astype(np.float32)
    acc_scale = np.float64(x.qparams.scale) * w_scale.astype(np.float64)  # the int32 accumulator's scale
    bias = _bias(op, operands[2] if len(operands) > 2 else None, acc_scale, n_out)
    return site.spec(
        [x],
        attrs=attrs,
        weight=np.ascontiguousarray(weight.astype(np.int8)),
        weight_scale=w_scale,
        bias=bias,
        requant={"out": quantize_multiplier(acc_scale / site.output_q.scale)},
    )


def _bias(op: str, b: Operand | None, acc_scale: np.ndarray, n_out: int) -> np.ndarray:
    if b is None:
        return np.zeros(n_out, np.int32)
    if b.kind != "const" or b.qparams is None or b.qparams.zero_point != 0:
        raise Unsupported(f"{op} bias must be an int32 initializer behind a DequantizeLinear with zero point 0")
    assert b.value is not None and b.scale is not None
    values = np.broadcast_to(b.value.reshape(-1), (n_out,)).astype(np.int64)
    b_scale = np.broadcast_to(b.scale, (n_out,)).astype(np.float64)
    if not np.allclose(b_scale, acc_scale, rtol=1e-6, atol=0):
        # Offline re-expression of the bias at the accumulator's scale (a compiler step, not a runtime one).
        values = np.rint(values * (b_scale / acc_scale)).astype(np.int64)
    if values.min(initial=0) < INT32_MIN or values.max(initial=0) > INT32_MAX:
        raise Unsupported(f"{op} bias does not fit int32 at the accumulator scale s_x * s_w")
    return values.astype(np.int32)


@KERNELS.register("Conv")
def _conv(spec: LayerSpec, inputs: list[np.ndarray]) -> np.ndarray:
    assert spec.weight is not None and spec.bias is not None and spec.input_q[0] is not None
    a = spec.attrs
    x = inputs[0].astype(np.int64) - spec.input_q[0].zero_point
    pt, pl, pb, pr = a["pads"]
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))  # padding is real 0 = zero point
    win = _windows(xp, a["kernel_shape"], a["strides"], a["dilations"])  # N, C, OH, OW, kh, kw
    n, c, oh, ow, kh, kw = win.shape
    g, m = a["group"], spec.weight.shape[0]
    w = spec.weight.astype(np.float64)
    # Exact: every product and partial sum is an integer below 2^53 (|x - z| < 2^16, |w| <= 2^7, K < 2^30).
    if g == 1:
        cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)
        acc = (cols @ w.reshape(m, -1).T).reshape(n, oh, ow, m).transpose(0, 3, 1, 2)
    else:
        win = win.reshape(n, g, c // g, oh, ow, kh, kw)
        acc = np.einsum("ngchwij,gmcij->ngmhw", win, w.reshape(g, m // g, c // g, kh, kw)).reshape(n, m, oh, ow)
    acc = np.rint(acc).astype(np.int64) + spec.bias.reshape(1, -1, 1, 1)
    _check_acc(spec, acc)
    return spec.output_q.saturate(spec.requant["out"].apply(acc, axis=1) + spec.output_q.zero_point)


@KERNELS.register("Gemm")
@KERNELS.register("MatMul")
def _gemm(spec: LayerSpec, inputs: list[np.ndarray]) -> np.ndarray:
    assert spec.weight is not None and spec.bias is not None and spec.input_q[0] is not None
    x = (inputs[0].astype(np.int64) - spec.input_q[0].zero_point).astype(np.float64)
    acc = np.rint(x @ spec.weight.astype(np.float64).T).astype(np.int64) + spec.bias  # exact, as in _conv
    _check_acc(spec, acc)
    return spec.output_q.saturate(spec.requant["out"].apply(acc, axis=-1) + spec.output_q.zero_point)


def _windows(x: np.ndarray, kernel: list[int], strides: list[int], dilations: list[int]) -> np.ndarray:
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    view = sliding_window_view(x, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    return view[:, :, ::sh, ::sw, ::dh, ::dw]


# ---------------------------------------------------------------------------- elementwise lookup tables

UNARY: Registry[Callable[[np.ndarray, Mapping[str, Any]], np.ndarray]] = Registry("unary op")


def _f32(v: Any) -> np.float32:
    return np.float32(v)


UNARY.register("Sigmoid")(lambda x, a: 1 / (1 + np.exp(-x)))
UNARY.register("Tanh")(lambda x, a: np.tanh(x))
UNARY.register("Relu")(lambda x, a: np.maximum(x, 0))
UNARY.register("LeakyRelu")(lambda x, a: np.where(x >= 0, x, _f32(a.get("alpha", 0.01)) * x))
UNARY.register("Elu")(lambda x, a: np.where(x > 0, x, _f32(a.get("alpha", 1.0)) * (np.exp(x) - 1)))
UNARY.register("HardSigmoid")(lambda x, a: np.clip(_f32(a.get("alpha", 0.2)) * x + _f32(a.get("beta", 0.5)), 0, 1))
UNARY.register("HardSwish")(lambda x, a: x * np.clip(x * _f32(1 / 6) + _f32(0.5), 0, 1))
UNARY.register("Softplus")(lambda x, a: np.log1p(np.exp(x)))
UNARY.register("Clip")(
    lambda x, a: np.clip(
        x,
        _f32(a["min"]) if a.get("min") is not None else -np.inf,
        _f32(a["max"]) if a.get("max") is not None else np.inf,
    )
)


def _build_unary(site: Site) -> LayerSpec:
    x, output_q = _act(site, 0), site.output_q
    assert x.qparams is not None
    attrs = {k: v for k, v in _attrs(site.node).items() if isinstance(v, (int, float))}
    if site.op == "Clip":
        bounds = _consts(site, 1)
        bounds += [None] * (2 - len(bounds))
        attrs["min"], attrs["max"] = (value[0] if value else None for value in bounds[:2])
    if x.qparams.bits > 16:
        raise Unsupported(f"a lookup table for a {x.qparams.bits}-bit input is too large")
    codes = np.arange(x.qparams.qmin, x.qparams.qmax + 1, dtype=np.int64)
    real = x.qparams.dequantize(codes)
    with np.errstate(over="ignore", invalid="ignore"):
        y = np.asarray(UNARY.get(site.op)(real, attrs), dtype=np.float32)
    q = np.rint(y / np.float32(output_q.scale)).astype(np.int64) + output_q.zero_point  # ONNX QuantizeLinear
    return site.spec([x], attrs=attrs, lut=output_q.saturate(q))


def _lut(spec: LayerSpec, inputs: list[np.ndarray]) -> np.ndarray:
    assert spec.lut is not None and spec.input_q[0] is not None
    return spec.lut[inputs[0].astype(np.int64) - spec.input_q[0].qmin]


for _name in UNARY.names():
    BUILDERS.register(_name)(_build_unary)
    KERNELS.register(_name)(_lut)


# ---------------------------------------------------------------------------- Add, Mul, Concat, GlobalAveragePool


@BUILDERS.register("Add")
@BUILDERS.register("Mul")
def _build_binary(site: Site) -> LayerSpec:
    a, b = _act(site, 0, const=True), _act(site, 1, const=True)
    assert a.qparams is not None and b.qparams is not None
    sa, sb, sy = a.qparams.scale, b.qparams.scale, site.output_q.scale
    if site.op == "Mul":
        requant, attrs = {"out": quantize_multiplier(sa * sb / sy)}, {}
    else:
        # TFLite's quantized Add: both inputs shifted left, rescaled to 2 * max(s_a, s_b) / 2^shift, summed, rescaled
        left_shift = 28 - max(a.qparams.bits, b.qparams.bits)  # 20 for 8-bit inputs: sums stay below 2^30
        twice_max = 2 * max(sa, sb)
        requant = {
            "in0": quantize_multiplier(sa / twice_max),
            "in1": quantize_multiplier(sb / twice_max),
            "out": quantize_multiplier(twice_max / (2**left_shift * sy)),
        }
        attrs = {"left_shift": left_shift}
    return site.spec([a, b], attrs=attrs, requant=requant)


@KERNELS.register("Mul")
def _mul(spec: LayerSpec, inputs: list[np.ndarray]) -> np.ndarray:
    qa, qb = spec.input_q
    assert qa is not None and qb is not None
    prod = (inputs[0].astype(np.int64) - qa.zero_point) * (inputs[1].astype(np.int64) - qb.zero_point)
    _check_acc(spec, prod)
    return spec.output_q.saturate(spec.requant["out"].apply(prod) + spec.output_q.zero_point)


@KERNELS.register("Add")
def _add(spec: LayerSpec, inputs: list[np.ndarray]) -> np.ndarray:
    qa, qb = spec.input_q
    assert qa is not None and qb is not None
    shift = int(spec.attrs["left_shift"])
    a = spec.requant["in0"].apply((inputs[0].astype(np.int64) - qa.zero_point) << shift)
    b = spec.requant["in1"].apply((inputs[1].astype(np.int64) - qb.zero_point) << shift)
    _check_acc(spec, a + b)
    return spec.output_q.saturate(spec.requant["out"].apply(a + b) + spec.output_q.zero_point)


@BUILDERS.register("Concat")
def _build_concat(site: Site) -> LayerSpec:
    xs = [_act(site, i, const=True) for i in range(len(site.operands))]
    sy = site.output_q.scale
    requant = {f"in{i}": quantize_multiplier(x.qparams.scale / sy) for i, x in enumerate(xs) if x.qparams}
    return site.spec(xs, attrs={"axis": int(_attrs(site.node)["axis"])}, requant=requant)


@KERNELS.register("Concat")
def _concat(spec: LayerSpec, inputs: list[np.ndarray]) -> np.ndarray:
    parts = [_requant(spec, q, qp, f"in{i}") for i, (q, qp) in enumerate(zip(inputs, spec.input_q, strict=True))]
    return np.concatenate(parts, axis=spec.attrs["axis"])


@BUILDERS.register("GlobalAveragePool")
def _build_gap(site: Site) -> LayerSpec:
    x = _act(site, 0)
    shape = x.shape
    if len(shape) != 4 or min(shape[2:]) < 1:
        raise Unsupported(f"GlobalAveragePool needs a static 4-D input shape, got {shape}")
    assert x.qparams is not None
    hw = shape[2] * shape[3]
    requant = {"out": quantize_multiplier(x.qparams.scale / (site.output_q.scale * hw))}
    return site.spec([x], attrs={"pool_size": hw}, requant=requant)


@KERNELS.register("GlobalAveragePool")
def _gap(spec: LayerSpec, inputs: list[np.ndarray]) -> np.ndarray:
    assert spec.input_q[0] is not None
    x = inputs[0]
    if x.shape[2] * x.shape[3] != spec.attrs["pool_size"]:
        raise ExportError(f"layer {spec.name!r}: built for {spec.attrs['pool_size']} pixels, got {x.shape}")
    acc = (x.astype(np.int64) - spec.input_q[0].zero_point).sum(axis=(2, 3), keepdims=True)
    _check_acc(spec, acc)
    return spec.output_q.saturate(spec.requant["out"].apply(acc) + spec.output_q.zero_point)


# ---------------------------------------------------------------------------- data movement (no arithmetic)

MOVES: Registry[Callable[[np.ndarray, Mapping[str, Any], int], np.ndarray]] = Registry("data-movement op")


def _build_move(site: Site) -> LayerSpec:
    x, output_q = _act(site, 0), site.output_q
    assert x.qparams is not None
    attrs = {k: v for k, v in _attrs(site.node).items() if isinstance(v, (int, float, str, list))}
    for key, value in zip(_MOVE_INPUTS.get(site.op, ()), _consts(site, 1), strict=False):
        if value is not None:
            attrs[key] = value
    attrs["output_index"] = site.output_index
    _check_move(site.op, attrs)
    same = x.qparams == output_q
    requant = {} if same else {"out": quantize_multiplier(x.qparams.scale / output_q.scale)}
    return site.spec([x], attrs=attrs, requant=requant)


def _move(spec: LayerSpec, inputs: list[np.ndarray]) -> np.ndarray:
    assert spec.input_q[0] is not None
    y = MOVES.get(spec.op)(inputs[0], spec.attrs, spec.input_q[0].qmin)
    # Requantization is monotone, so it commutes with selection and max: apply it after the move.
    return _requant(spec, y, spec.input_q[0]) if "out" in spec.requant else y.astype(spec.output_q.dtype)


# ONNX constant inputs after the data input, by name (opset 13+); older opsets use attributes of the same names.
_MOVE_INPUTS = {
    "Slice": ("starts", "ends", "axes", "steps"),
    "Split": ("split",),
    "Resize": ("roi", "scales", "sizes"),
    "Reshape": ("shape",),
    "Squeeze": ("axes",),
    "Unsqueeze": ("axes",),
}


def _check_move(op: str, a: Mapping[str, Any]) -> None:
    if op == "MaxPool" and (a.get("ceil_mode", 0) or a.get("auto_pad", "NOTSET") != "NOTSET"):
        raise Unsupported("MaxPool with ceil_mode or auto_pad is not supported")
    if op == "MaxPool" and a["output_index"] != 0:
        raise Unsupported("MaxPool indices output is not supported")
    if op == "Resize":
        if a.get("mode", "nearest") != "nearest":
            raise Unsupported(f"Resize mode {a.get('mode')!r} is not supported (only nearest)")
        if a.get("coordinate_transformation_mode") == "tf_crop_and_resize" or a.get("axes"):
            raise Unsupported("Resize with tf_crop_and_resize or axes is not supported")


@MOVES.register("Identity")
def _identity(x: np.ndarray, a: Mapping[str, Any], pad: int) -> np.ndarray:
    return x


@MOVES.register("Reshape")
def _reshape(x: np.ndarray, a: Mapping[str, Any], pad: int) -> np.ndarray:
    shape = [int(d) for d in a["shape"]]
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


@MOVES.register("Flatten")
def _flatten(x: np.ndarray, a: Mapping[str, Any], pad: int) -> np.ndarray:
    axis = int(a.get("axis", 1)) % (x.ndim + 1) if x.ndim else 0
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


@MOVES.register("Transpose")
def _transpose(x: np.ndarray, a: Mapping[str, Any], pad: int) -> np.ndarray:
    return x.transpose(a.get("perm", list(range(x.ndim))[::-1]))


@MOVES.register("Squeeze")
def _squeeze(x: np.ndarray, a: Mapping[str, Any], pad: int) -> np.ndarray:
    axes = a.get("axes")
    return np.squeeze(x, axis=tuple(int(i) for i in axes) if axes else None)


@MOVES.register("Unsqueeze")
def _unsqueeze(x: np.ndarray, a: Mapping[str, Any], pad: int) -> np.ndarray:
    return np.expand_dims(x, tuple(int(i) for i in a["axes"]))


@MOVES.register("Slice")
def _slice(x: np.ndarray, a: Mapping[str, Any], pad: int) -> np.ndarray:
    starts, ends = a["starts"], a["ends"]
    axes = a.get("axes") or list(range(len(starts)))
    steps = a.get("steps") or [1] * len(starts)
    index = [slice(None)] * x.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps, strict=True):
        index[int(ax)] = slice(int(s), int(e), int(st))  # Python slicing clamps exactly as ONNX Slice does
    return x[tuple(index)]


@MOVES.register("Split")
def _split(x: np.ndarray, a: Mapping[str, Any], pad: int) -> np.ndarray:
    axis = int(a.get("axis", 0))
    sizes = a.get("split")
    if not sizes:
        parts = int(a.get("num_outputs", 0)) or int(a.get("num_splits", 0))
        if not parts:
            raise ExportError("Split without split sizes needs num_outputs")
        size = -(-x.shape[axis] // parts)
        sizes = [min(size, x.shape[axis] - i * size) for i in range(parts)]
    start = int(sum(sizes[: a["output_index"]]))
    return np.take(x, np.arange(start, start + int(sizes[a["output_index"]])), axis=axis)


@MOVES.register("MaxPool")
def _maxpool(x: np.ndarray, a: Mapping[str, Any], pad: int) -> np.ndarray:
    if x.ndim != 4:
        raise ExportError(f"MaxPool: only 2-D pooling is supported, got a {x.ndim}-D input")
    pt, pl, pb, pr = a.get("pads", [0, 0, 0, 0])
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=pad)  # the dtype's minimum never wins
    win = _windows(xp, a["kernel_shape"], a.get("strides", [1, 1]), a.get("dilations", [1, 1]))
    return win.max(axis=(4, 5))


@MOVES.register("Resize")
def _resize(x: np.ndarray, a: Mapping[str, Any], pad: int) -> np.ndarray:
    # ONNX Resize, mode "nearest": index arithmetic only (address generation), in float32 like ONNX Runtime
    sizes, scales = a.get("sizes"), a.get("scales")
    if sizes:
        out_len = [int(s) for s in sizes]
        scale = [np.float32(o) / np.float32(i) for o, i in zip(out_len, x.shape, strict=True)]
    else:
        scale = [np.float32(s) for s in scales]
        out_len = [int(np.floor(np.float32(n) * s)) for n, s in zip(x.shape, scale, strict=True)]
    mode = a.get("coordinate_transformation_mode", "half_pixel")
    nearest = a.get("nearest_mode", "round_prefer_floor")
    for axis, (n_in, n_out, s) in enumerate(zip(x.shape, out_len, scale, strict=True)):
        if n_in == n_out:
            continue
        i = np.arange(n_out, dtype=np.float32)
        if mode == "asymmetric":
            src = i / s
        elif mode == "align_corners":
            src = i * np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.zeros_like(i)
        elif mode == "tf_half_pixel_for_nn":
            src = (i + np.float32(0.5)) / s
        elif mode == "pytorch_half_pixel" and n_out == 1:
            src = np.zeros_like(i)
        else:  # half_pixel, pytorch_half_pixel
            src = (i + np.float32(0.5)) / s - np.float32(0.5)
        rounders = {
            "round_prefer_floor": lambda v: np.ceil(v - np.float32(0.5)),
            "round_prefer_ceil": lambda v: np.floor(v + np.float32(0.5)),
            "floor": np.floor,
            "ceil": np.ceil,
        }
        idx = np.clip(rounders[nearest](src).astype(np.int64), 0, n_in - 1)
        x = np.take(x, idx, axis=axis)
    return x


for _name in MOVES.names():
    BUILDERS.register(_name)(_build_move)
    KERNELS.register(_name)(_move)
