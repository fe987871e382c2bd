"""Export a quantized detector to ONNX in QDQ form, for ONNX Runtime's integer kernels.

The fake quantizers of :mod:`slimdet.compress.quant` export as QuantizeLinear/DequantizeLinear
pairs (PyTorch's ``fake_quantize_*`` ops), so the graph computes what the simulation computes.
Two rewrites then turn it into what integer runtimes expect (the layout ONNX Runtime's own
``quantize_static`` writes):

* a QuantizeLinear applied to a constant weight is folded: the weight is stored as int8 codes
  (4x smaller on disk) and only its DequantizeLinear stays;
* a conv/gemm bias whose input and weight are both dequantized is stored as int32 codes on the
  grid ``s_in * s_w`` (the simulation already rounds it there) behind a DequantizeLinear.

ONNX Runtime then fuses ``DQ -> Conv -> Q`` into QLinearConv, ``DQ -> Sigmoid -> Q`` into
QLinearSigmoid, and so on; layers kept in float stay float convs.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from slimdet.errors import ExportError
from slimdet.export.onnx import INPUT_NAME, ExportResult, export_onnx, onnx_session
from slimdet.models.base import Detector


@dataclass(frozen=True)
class QdqExportResult:
    path: str
    size_bytes: int
    op_counts: dict[str, int]
    int8_weights: int  # weight tensors stored as integer codes
    int32_biases: int
    #: max |ONNX Runtime int8 - PyTorch simulation| over the outputs, and the same in output steps
    max_abs_diff: float | None
    max_diff_steps: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_qdq(
    model: Detector, path: str | Path, *, batch_size: int = 1, check: bool = True, opset: int = 17
) -> QdqExportResult:
    """Write the quantized ``model`` (see ``slimdet.compress.quant.quantize``) as a QDQ ONNX file.

    Raises:
        ExportError: the model has no quantizers, or the graph has a pattern that cannot be rewritten.
    """
    from slimdet.compress.quant.graph import is_quantized

    if not is_quantized(model):
        raise ExportError("export_qdq: the model is not quantized; run slimdet.compress.quant.quantize first")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        from slimdet.compress.quant.graph import frozen

        with frozen(model):
            export_onnx(model, tmp, batch_size=batch_size, opset=opset, exporter="torchscript", check=False)
        proto = onnx.load(str(tmp))
        n_weights, n_biases = rewrite_qdq(proto)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        diff = steps = None
        if check:
            diff, steps = _compare(model, tmp, batch_size)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    counts = Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    return QdqExportResult(path=str(path), size_bytes=path.stat().st_size, op_counts=dict(counts.most_common()),
                           int8_weights=n_weights, int32_biases=n_biases, max_abs_diff=diff,
                           max_diff_steps=steps)  # fmt: skip


def export_deployable(
    model: Detector,
    path: str | Path,
    *,
    batch_size: int = 1,
    dynamic_batch: bool = False,
    opset: int = 17,
    check: bool = True,
    atol: float = 1e-4,
) -> ExportResult | QdqExportResult:
    """The ONNX file a runtime should run: FP32 for a float model, QDQ (int8 kernels) for a quantized one.

    Raises:
        ExportError: ``dynamic_batch`` for a quantized model (its file has a fixed batch size).
    """
    from slimdet.compress.quant.graph import is_quantized

    if not is_quantized(model):
        return export_onnx(model, path, batch_size=batch_size, dynamic_batch=dynamic_batch, opset=opset, check=check,
                           atol=atol)  # fmt: skip
    if dynamic_batch:
        raise ExportError(f"{path}: a quantized model is exported with a fixed batch size, not a dynamic one")
    return export_qdq(model, path, batch_size=batch_size, check=check, opset=opset)


def rewrite_qdq(proto: onnx.ModelProto) -> tuple[int, int]:
    """Fold weight quantization into integer initializers and biases into int32; returns the counts."""
    graph = proto.graph
    _scalar_qparams(graph)
    consts = _constants(graph)
    producer = {o: n for n in graph.node for o in n.output}
    new_inits: list[onnx.TensorProto] = []
    drop: set[int] = set()
    n_weights = 0
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in consts:
            continue
        x, scale = consts[node.input[0]], consts[node.input[1]]
        zero = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
        axis = _attr(node, "axis", 1)
        shape = [1] * x.ndim
        if scale.ndim == 1 and scale.size > 1:
            shape[axis] = -1
        q = np.round(x / scale.reshape(shape)) + zero.reshape(shape).astype(np.int64)
        info = np.iinfo(zero.dtype)
        codes = np.clip(q, info.min, info.max).astype(zero.dtype)
        name = node.output[0]  # the DQ keeps reading the same name, now an initializer
        new_inits.append(numpy_helper.from_array(codes, name))
        consts[name] = codes
        drop.add(id(node))
        n_weights += 1
    nodes = [n for n in graph.node if id(n) not in drop]
    producer = {o: n for n in nodes for o in n.output}
    n_biases = 0
    extra: list[onnx.NodeProto] = []
    for node in nodes:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in consts:
            continue
        dq_x, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
        if not (dq_x is not None and dq_w is not None and dq_x.op_type == dq_w.op_type == "DequantizeLinear"):
            continue
        if dq_w.input[0] not in consts:
            continue
        sx = consts[dq_x.input[1]].astype(np.float64)
        sw = consts[dq_w.input[1]].astype(np.float64).reshape(-1)
        bias = consts[node.input[2]].astype(np.float64)
        step = (sx.reshape(()) * sw) * np.ones_like(bias)
        codes = np.clip(np.round(bias / step), -(2**31), 2**31 - 1).astype(np.int32)
        base = node.input[2] + "_int32"
        new_inits += [numpy_helper.from_array(codes, base),
                      numpy_helper.from_array(step.astype(np.float32), base + "_scale"),
                      numpy_helper.from_array(np.zeros_like(codes), base + "_zero_point")]  # fmt: skip
        extra.append(helper.make_node("DequantizeLinear", [base, base + "_scale", base + "_zero_point"],
                                      [base + "_dq"], name=base + "_DequantizeLinear", axis=0))  # fmt: skip
        node.input[2] = base + "_dq"
        n_biases += 1
    del graph.node[:]
    graph.node.extend(extra + nodes)  # bias DQs read initializers only: they can go first
    graph.initializer.extend(new_inits)
    _prune(graph)
    return n_weights, n_biases


def _scalar_qparams(graph: onnx.GraphProto) -> None:
    """Per-tensor scales and zero points as scalars (the exporter writes shape [1]; integer kernels
    such as QLinearMul require scalars)."""
    names = {i for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for i in n.input[1:3]}
    for init in graph.initializer:
        if init.name in names and len(init.dims) == 1 and init.dims[0] == 1:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).reshape(()), init.name))
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] in names:
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None and len(attr.t.dims) == 1 and attr.t.dims[0] == 1:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).reshape(()), attr.t.name))


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Values known before run time: initializers, Constant nodes, and casts/reshapes of them."""
    out = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:  # nodes are in topological order
        if node.op_type == "Constant":
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None:
                out[node.output[0]] = numpy_helper.to_array(attr.t)
        elif node.op_type in _FOLDABLE and all(i in out for i in node.input if i):
            out[node.output[0]] = _FOLDABLE[node.op_type](node, *[out[i] for i in node.input if i])
    return out


_FOLDABLE = {
    "Identity": lambda node, x: x,
    "Cast": lambda node, x: x.astype(helper.tensor_dtype_to_np_dtype(_attr(node, "to", 1))),
    "Reshape": lambda node, x, shape: x.reshape([d if d != 0 else x.shape[i] for i, d in enumerate(shape)]),
    "Squeeze": lambda node, x, *axes: np.squeeze(x, axis=tuple(axes[0]) if axes else None),
    "Unsqueeze": lambda node, x, axes: np.expand_dims(x, tuple(int(a) for a in axes)),
}


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    a = next((a for a in node.attribute if a.name == name), None)
    return int(a.i) if a is not None else default


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers nothing reads (the float weights behind folded quantizers)."""
    needed = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _compare(model: Detector, path: Path, batch_size: int) -> tuple[float, float]:
    """Largest output difference between ONNX Runtime's integer execution and the simulation."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, 3, model.input_size, model.input_size, generator=gen)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(x)
    finally:
        model.train(was_training)
    ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    got = onnx_session(path, threads=1).run(None, {INPUT_NAME: x.numpy()})
    if len(got) != len(ref):
        raise ExportError(f"{path}: ONNX graph has {len(got)} outputs, the model {len(ref)}")
    diff = max(float(np.max(np.abs(g - r.numpy()))) for g, r in zip(got, ref, strict=True))
    spread = max(float(r.max() - r.min()) for r in ref)
    return diff, diff / max(spread / 255, 1e-12)
