"""Integer-only golden model of a QDQ ONNX detector: the network as an integer accelerator computes it.

The input is the QDQ graph written by ``slimdet.compress.quant`` or by ONNX Runtime's
``quantize_static(..., quant_format=QuantFormat.QDQ)``: every activation is a QuantizeLinear (Q) ->
DequantizeLinear (DQ) pair, weights and biases are integer initializers behind a DQ, and every
other op sits between DQ inputs and one Q output. Each Q output is a *quantized tensor* (integers
with a scale, a zero point and a dtype) and is made by exactly one *integer layer*:

* Conv / Gemm / MatMul: int8 weights times (input - zero point), int32 accumulation plus an int32
  bias, then requantization by a fixed-point multiplier ``M0 * 2^-(31 + n)`` per output channel
  (Jacob et al., CVPR 2018, "Quantization and Training of Neural Networks for Efficient
  Integer-Arithmetic-Only Inference", section 2.2; gemmlowp's Q31 multiplier);
* unary elementwise ops (Sigmoid, HardSwish, Relu, ...): a lookup table over every input code,
  computed once from the scales;
* Add (TFLite's scheme: both inputs shifted left and rescaled to a common scale), Mul, Concat,
  GlobalAveragePool: integer arithmetic with fixed-point multipliers;
* Slice, Split, MaxPool, Resize (nearest), Reshape, Transpose, Flatten, Squeeze, Unsqueeze,
  Identity: pure integer data movement (plus a requantization when the output scale differs);
* the graph input's QuantizeLinear (the only float op, at the boundary) and Q(DQ(x)) requantizations.

Every multiplier applies ``y = (x * M0 + 2^(30 + n)) >> (31 + n)`` on 64-bit integers: one rounding,
to nearest with ties up. Anything else in the graph raises an ExportError naming the node.

Conv and Gemm accumulate in float64 BLAS: every product and partial sum is an integer below 2^53,
so the result is bit-identical to integer multiply-accumulate in any order, and much faster in NumPy.

``compare_layers`` checks the model against the *simulated quantization* reference: the same graph in
ONNX Runtime with graph optimizations off (every Q and DQ executed as written) and every Q output
fetched. Each layer is teacher-forced (fed the reference's integer inputs); a correct integer
pipeline is within 1 LSB of the float reference, which rounds half to even in float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from slimdet.errors import ExportError
from slimdet.export import golden_ops as ops
from slimdet.export.golden_ops import FixedPoint, LayerSpec, QParams, quantize_multiplier

__all__ = [
    "FixedPoint",
    "GoldenModel",
    "LayerDiff",
    "LayerMatch",
    "LayerSpec",
    "QParams",
    "compare_layers",
    "qdq_reference",
    "quantize_multiplier",
]


@dataclass(frozen=True)
class GraphOutput:
    """A graph output: the quantized tensor behind it, and whether the graph dequantizes it."""

    name: str
    tensor: str
    dequantize: bool


class GoldenModel:
    """A QDQ network as a list of integer layers, run in NumPy with integer arithmetic only."""

    def __init__(
        self,
        layers: list[LayerSpec],
        *,
        inputs: Mapping[str, tuple[int, ...]],
        outputs: list[GraphOutput],
        tensors: Mapping[str, QParams],
        constants: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self._layers = list(layers)
        self.inputs = dict(inputs)  # graph input name -> shape (-1 where dynamic)
        self.outputs = list(outputs)
        self.tensors = dict(tensors)  # quantized tensor name -> its quantization (constants included)
        self.constants = dict(constants or {})  # quantized constant operands (not weights or biases): integers

    @classmethod
    def from_onnx(cls, path: str | Path) -> GoldenModel:
        """Build the integer layers of a QDQ ONNX file; raises ExportError for anything not integer."""
        return _GraphReader(Path(path)).golden()

    def layers(self) -> list[LayerSpec]:
        """The integer layers in execution order."""
        return list(self._layers)

    def run(self, images: np.ndarray | Mapping[str, np.ndarray], *, keep: bool = False) -> dict[str, np.ndarray]:
        """Run the network on integers.

        Args:
            images: the (float) graph input, or a mapping from input name to array.
            keep: also return every quantized tensor (integers), keyed by its ONNX name.

        Returns:
            graph output name -> float32 array (int array where the graph output is not dequantized),
            plus every quantized tensor with ``keep``.
        """
        env = {**self.constants, **self._feeds(images)}
        for layer in self._layers:
            env[layer.output] = ops.run_layer(layer, [env[name] for name in layer.inputs])
        out: dict[str, np.ndarray] = {}
        for o in self.outputs:
            q = env[o.tensor]
            out[o.name] = self.tensors[o.tensor].dequantize(q) if o.dequantize else q
        if keep:
            skip = {*self.inputs, *self.constants}
            out.update({name: env[name] for name in self.tensors if name in env and name not in skip})
        return out

    def _feeds(self, images: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = dict(images) if isinstance(images, Mapping) else {next(iter(self.inputs)): images}
        if set(feeds) != set(self.inputs):
            raise ExportError(f"golden model inputs are {sorted(self.inputs)}, got {sorted(feeds)}")
        for name, arr in feeds.items():
            want = self.inputs[name]
            arr = np.asarray(arr)
            if want and (arr.ndim != len(want) or any(w not in (-1, a) for w, a in zip(want, arr.shape, strict=True))):
                raise ExportError(f"golden model input {name!r}: expected shape {want}, got {arr.shape}")
            feeds[name] = arr
        return feeds


# ---------------------------------------------------------------------------- reading the ONNX graph


_QUANT_OPS = ("QuantizeLinear", "DequantizeLinear")


class _GraphReader:
    """Finds the integer layers of a QDQ graph; every error names the file and the node."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise ExportError(f"{path}: ONNX file not found")
        self.path = path
        model = onnx.load(str(path))
        try:
            model = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 - shapes are informational; the run does not need them
            pass
        self.graph = model.graph
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in self.graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.folded: set[str] = set()  # outputs of Constant nodes and of Identity nodes on constants
        for node in self.graph.node:
            if node.op_type == "Constant":
                self.consts[node.output[0]] = _constant_value(node)
                self.folded.add(node.output[0])
            elif node.op_type == "Identity" and node.input[0] in self.consts:  # TorchScript: shared constants
                self.consts[node.output[0]] = self.consts[node.input[0]]
                self.folded.add(node.output[0])
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.input_names = [i.name for i in self.graph.input if i.name not in self.consts]
        self.shapes = _shapes(model)
        self.tensors: dict[str, QParams] = {}
        self.qconsts: dict[str, np.ndarray] = {}  # Q outputs of constants, folded at build time
        self.constants: dict[str, np.ndarray] = {}  # quantized constants that are layer inputs

    def where(self, node: onnx.NodeProto) -> str:
        return f"{self.path}: node {_node_name(node, self.graph)!r} ({node.op_type})"

    def golden(self) -> GoldenModel:
        layers: list[LayerSpec] = []
        names: set[str] = set()
        for node in self.graph.node:
            if node.op_type == "QuantizeLinear":
                layer = self._layer(node)
                if layer is None:
                    continue
                name, k = layer.name, 1
                while name in names:
                    k += 1
                    name = f"{layer.name}#{k}"
                names.add(name)
                layers.append(layer if name == layer.name else _renamed(layer, name))
            elif node.op_type not in _QUANT_OPS and node.output[0] not in self.folded:
                self._check_compute_node(node)
        outputs = [self._graph_output(o.name) for o in self.graph.output]
        inputs = {name: self.shapes.get(name, ()) for name in self.input_names}
        return GoldenModel(layers, inputs=inputs, outputs=outputs, tensors=self.tensors, constants=self.constants)

    # -- quantization parameters

    def qparams(self, node: onnx.NodeProto, *, per_channel: bool = False) -> tuple[QParams, np.ndarray, int]:
        """(per-tensor QParams, scale array, axis) of a Q or DQ node."""
        for attr in node.attribute:
            if attr.name == "block_size" and attr.i:
                raise ExportError(f"{self.where(node)}: blocked quantization is not supported")
        scale = self._const_input(node, 1, "scale").astype(np.float32)
        if len(node.input) > 2 and node.input[2]:
            zp = self._const_input(node, 2, "zero point")
        else:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(_attr(node, "output_dtype", onnx.TensorProto.UINT8))
            zp = np.zeros((), dtype)
        if scale.size > 1 and not per_channel:
            raise ExportError(f"{self.where(node)}: per-channel quantization of an activation is not supported")
        if zp.size > 1 and np.any(zp != zp.reshape(-1)[0]):
            raise ExportError(f"{self.where(node)}: per-channel zero points are not supported")
        qp = QParams(float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0]), np.dtype(zp.dtype).name)
        return qp, scale.reshape(-1), int(_attr(node, "axis", 1))

    def _const_input(self, node: onnx.NodeProto, i: int, what: str) -> np.ndarray:
        name = node.input[i] if len(node.input) > i else ""
        if name not in self.consts:
            raise ExportError(f"{self.where(node)}: the {what} ({name!r}) must be a constant")
        return self.consts[name]

    # -- operands of a compute node

    def operand(self, node: onnx.NodeProto, i: int) -> ops.Operand | None:
        """Input i of a compute node: an activation or constant behind a DQ, a float constant, or None."""
        name = node.input[i] if len(node.input) > i else ""
        if not name:
            return None
        if name in self.consts:
            return ops.Operand(kind="float", value=self.consts[name])
        dq = self.producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            what = (
                "a graph input" if dq is None else f"the output of node {_node_name(dq, self.graph)!r} ({dq.op_type})"
            )
            raise ExportError(
                f"{self.where(node)}: input {name!r} is {what}, not a DequantizeLinear output; the golden model "
                "needs every op between DequantizeLinear inputs and a QuantizeLinear output"
            )
        source = dq.input[0]
        if source in self.consts:  # an integer initializer: weights, biases, constant operands
            qp, scale, axis = self.qparams(dq, per_channel=True)
            value = self.consts[source]
            return ops.Operand("const", source, value, qp, scale, axis, shape=value.shape)
        qp, scale, _ = self.qparams(dq)
        if source in self.qconsts:  # Q(constant), folded
            self._same_qparams(dq, source, qp)
            value = self.qconsts[source]
            return ops.Operand("const", source, value, qp, scale, shape=value.shape)
        tensor = self._activation(dq, source, qp)
        return ops.Operand("act", tensor, qparams=qp, shape=self.shapes.get(tensor, ()))

    def _activation(self, dq: onnx.NodeProto, source: str, qp: QParams) -> str:
        producer = self.producer.get(source)
        if producer is not None and producer.op_type != "QuantizeLinear":
            raise ExportError(
                f"{self.where(dq)}: dequantizes {source!r}, made by {producer.op_type} rather than QuantizeLinear"
            )
        if producer is None and source not in self.input_names:
            raise ExportError(f"{self.where(dq)}: input {source!r} is neither a graph input nor a Q output")
        self.tensors.setdefault(source, qp)
        self._same_qparams(dq, source, qp)
        return source

    def _same_qparams(self, dq: onnx.NodeProto, source: str, qp: QParams) -> None:
        known = self.tensors[source]
        if known != qp:
            raise ExportError(
                f"{self.where(dq)}: dequantizes {source!r} with scale {qp.scale:g}, zero point {qp.zero_point}, "
                f"but it was quantized with scale {known.scale:g}, zero point {known.zero_point}"
            )

    # -- layers

    def _layer(self, q: onnx.NodeProto) -> LayerSpec | None:
        """The layer that makes Q's output, or None where Q quantizes a constant (folded)."""
        out_q, _, _ = self.qparams(q)
        out = q.output[0]
        self.tensors[out] = out_q
        src = q.input[0]
        if src in self.consts:
            self.qconsts[out] = ops.quantize(self.consts[src], out_q)
            return None
        base = dict(output=out, output_q=out_q, output_shape=self.shapes.get(out, ()))
        if src in self.input_names:
            return ops.build_quantize_input(
                name=_node_name(q, self.graph), source=src, source_shape=self.shapes.get(src, ()), **base
            )
        producer = self.producer.get(src)
        if producer is None:
            raise ExportError(f"{self.where(q)}: quantizes {src!r}, which is a constant, not an activation")
        if producer.op_type == "DequantizeLinear":
            operand = self.operand(q, 0)
            assert operand is not None
            if operand.kind != "act":
                raise ExportError(f"{self.where(q)}: requantizes a constant; fold it into an initializer")
            return ops.build_requantize(name=_node_name(q, self.graph), x=operand, **base)
        builder = self._builder(producer)
        operands = [self.operand(producer, i) for i in range(len(producer.input))]
        site = ops.Site(
            name=_node_name(producer, self.graph), node=producer, operands=operands,
            output_index=list(producer.output).index(src), **base,
        )  # fmt: skip
        try:
            layer = builder(site)
        except ops.Unsupported as exc:
            raise ExportError(f"{self.where(producer)}: {exc}") from None
        for o in operands:  # constant operands become constant tensors of the model
            if o is not None and o.kind == "const" and o.tensor in layer.inputs:
                assert o.value is not None and o.qparams is not None
                self.constants[o.tensor] = np.asarray(o.value)
                self.tensors[o.tensor] = o.qparams
        return layer

    def _builder(self, node: onnx.NodeProto) -> ops.Builder:
        if node.op_type not in ops.BUILDERS or (node.domain not in ("", "ai.onnx")):
            raise ExportError(
                f"{self.where(node)}: op type {node.op_type!r} is not supported by the integer golden model; "
                f"supported between DequantizeLinear and QuantizeLinear: {', '.join(ops.BUILDERS.names())}"
            )
        return ops.BUILDERS.get(node.op_type)

    def _check_compute_node(self, node: onnx.NodeProto) -> None:
        self._builder(node)
        graph_outputs = {o.name for o in self.graph.output}
        for name in node.output:
            if name in graph_outputs:
                raise ExportError(f"{self.where(node)}: its output {name!r} is a float graph output; quantize it")
            for user in self.consumers.get(name, []):
                if user.op_type != "QuantizeLinear":
                    raise ExportError(
                        f"{self.where(node)}: its float output {name!r} feeds node "
                        f"{_node_name(user, self.graph)!r} ({user.op_type}) directly; the golden model needs a "
                        "QuantizeLinear after every op"
                    )

    def _graph_output(self, name: str) -> GraphOutput:
        producer = self.producer.get(name)
        if producer is not None and producer.op_type == "QuantizeLinear":
            return GraphOutput(name, name, dequantize=False)
        if producer is not None and producer.op_type == "DequantizeLinear" and producer.input[0] in self.tensors:
            return GraphOutput(name, producer.input[0], dequantize=True)
        what = "a graph input" if producer is None else f"made by {producer.op_type}"
        raise ExportError(f"{self.path}: graph output {name!r} is {what}, not a (de)quantized tensor")


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    return np.asarray(helper.get_attribute_value(attr))


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _node_name(node: onnx.NodeProto, graph: onnx.GraphProto) -> str:
    if node.name:
        return node.name
    return f"{node.op_type}_{list(graph.node).index(node)}"


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    out = {}
    for info in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            dims = info.type.tensor_type.shape.dim
            out[info.name] = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
    return out


def _renamed(layer: LayerSpec, name: str) -> LayerSpec:
    return LayerSpec(**{**{f: getattr(layer, f) for f in LayerSpec.__dataclass_fields__}, "name": name})


# ---------------------------------------------------------------------------- checking against ONNX Runtime


def qdq_reference(
    onnx_path: str | Path, images: np.ndarray | Mapping[str, np.ndarray], *, threads: int = 1
) -> dict[str, np.ndarray]:
    """Simulated quantization: the QDQ graph in ONNX Runtime with no graph optimization (no QDQ fusion).

    Returns every graph output and every QuantizeLinear output (integers), keyed by tensor name.
    """
    model = onnx.load(str(onnx_path))
    elem_types = {i.name: i.data_type for i in model.graph.initializer}  # of zero points: the Q output type
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            elem_types[node.output[0]] = node.attribute[0].t.data_type
        elif node.op_type == "Identity" and node.input[0] in elem_types:
            elem_types[node.output[0]] = elem_types[node.input[0]]
    present = {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.output[0] not in present:
            elem = elem_types.get(node.input[2], 0) if len(node.input) > 2 and node.input[2] else 0
            elem = elem or _attr(node, "output_dtype", 0) or onnx.TensorProto.UINT8
            model.graph.output.append(helper.make_tensor_value_info(node.output[0], elem, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    first = session.get_inputs()[0].name
    feeds = dict(images) if isinstance(images, Mapping) else {first: images}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


@dataclass(frozen=True)
class LayerDiff:
    """One layer's integer output against the reference's, fed the reference's integer inputs."""

    name: str
    op: str
    output: str
    max_lsb: int  # largest |golden - reference| in integer steps
    frac_differ: float  # fraction of elements that differ at all
    num_elements: int


@dataclass(frozen=True)
class LayerMatch:
    """Teacher-forced per-layer agreement, plus free-running agreement at the graph outputs."""

    layers: tuple[LayerDiff, ...]
    end_to_end_max_lsb: dict[str, int] = field(default_factory=dict)  # graph output -> max LSB, free-running

    @property
    def max_lsb(self) -> int:
        return max((d.max_lsb for d in self.layers), default=0)

    @property
    def ok(self) -> bool:
        """The acceptance: every layer within 1 LSB of the reference."""
        return self.max_lsb <= 1

    def worst(self, k: int = 5) -> list[LayerDiff]:
        return sorted(self.layers, key=lambda d: (d.max_lsb, d.frac_differ), reverse=True)[:k]

    def to_text(self, k: int = 10) -> str:
        """The verdict, the end-to-end differences and the k worst layers, one per line."""
        verdict = "OK" if self.ok else "FAIL"
        lines = [
            f"{verdict}: max {self.max_lsb} LSB over {len(self.layers)} layers (teacher-forced, acceptance <= 1)",
            "end-to-end (free-running) max LSB: " + ", ".join(f"{n}={v}" for n, v in self.end_to_end_max_lsb.items()),
        ]
        lines += [f"  {d.max_lsb} LSB  {d.frac_differ:9.2e} differ  {d.op:<16} {d.name}" for d in self.worst(k)]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_lsb": self.max_lsb,
            "ok": self.ok,
            "end_to_end_max_lsb": dict(self.end_to_end_max_lsb),
            "layers": [asdict(d) for d in self.layers],
        }


def compare_layers(
    golden: GoldenModel, onnx_path: str | Path, images: np.ndarray | Mapping[str, np.ndarray]
) -> LayerMatch:
    """Compare every integer layer with ONNX Runtime's simulated quantization of the same graph.

    Each layer gets the reference's integer inputs (teacher forcing), so an error in one layer does not
    spread to the next; the graph outputs are also compared free-running (informational).
    """
    ref = qdq_reference(onnx_path, images)
    feeds = golden._feeds(images)  # noqa: SLF001 - same module family, same validation
    diffs = []
    for layer in golden.layers():
        inputs = [
            feeds[n] if n in feeds else golden.constants[n] if n in golden.constants else ref[n] for n in layer.inputs
        ]
        got = ops.run_layer(layer, inputs)
        diffs.append(_diff(layer, got, ref[layer.output]))
    free = golden.run(images, keep=True)
    e2e = {}
    for o in golden.outputs:
        delta = np.abs(free[o.tensor].astype(np.int64) - ref[o.tensor].astype(np.int64))
        e2e[o.name] = int(delta.max()) if delta.size else 0
    return LayerMatch(tuple(diffs), e2e)


def _diff(layer: LayerSpec, got: np.ndarray, want: np.ndarray) -> LayerDiff:
    if got.shape != want.shape:
        raise ExportError(f"layer {layer.name!r} ({layer.op}): golden shape {got.shape}, reference {want.shape}")
    delta = np.abs(got.astype(np.int64) - want.astype(np.int64))
    n = int(delta.size)
    return LayerDiff(
        name=layer.name,
        op=layer.op,
        output=layer.output,
        max_lsb=int(delta.max()) if n else 0,
        frac_differ=float(np.count_nonzero(delta)) / n if n else 0.0,
        num_elements=n,
    )
