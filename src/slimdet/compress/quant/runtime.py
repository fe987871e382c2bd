"""Runtime-aware precision: keep in float the layers whose int8 kernel is slower on the target.

Integer kernels are not faster everywhere: on ONNX Runtime's CPU kernels a convolution with very
few input channels (the first layer on an RGB image: an im2col depth of 27) runs slower in u8s8
than the float kernel, and so can tiny 1x1 prediction convs. Which layers, and by how much, depends
on the runtime and the CPU, so it is measured: every quantized conv, with its activation, is built
alone as a float graph and as a QDQ graph with its real shapes, both are timed interleaved on this
machine, and the layers where int8 loses by more than ``margin`` in two independent timings are
switched back to float.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from tqdm.auto import tqdm

from slimdet.compress.quant.graph import QuantConv2d, quantizers
from slimdet.compress.quant.quantizers import Mode
from slimdet.export.onnx import onnx_session
from slimdet.models.base import Detector
from slimdet.profiling.latency import time_interleaved


def conv_shapes(model: Detector) -> dict[str, tuple[int, ...]]:
    """Input shape (batch 1) of every quantized conv, from one forward pass."""
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str) -> Any:
        def record(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            shapes.setdefault(name, tuple(args[0].shape))

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, QuantConv2d)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(model.example_inputs(1))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes


def layer_latency(conv: nn.Conv2d, input_shape: tuple[int, ...], *, silu: bool, runs: int = 30) -> dict[str, float]:
    """Median seconds of ``conv`` (+ SiLU) alone in ONNX Runtime, float and int8 (QDQ), 1 thread."""
    graphs = {"fp32": _graph(conv, input_shape, silu=silu, int8=False),
              "int8": _graph(conv, input_shape, silu=silu, int8=True)}  # fmt: skip
    sessions = {k: onnx_session(g, threads=1) for k, g in graphs.items()}
    rng = np.random.default_rng(0)
    feeds = {"fp32": rng.random(input_shape, dtype=np.float32), "int8": rng.integers(0, 255, input_shape, np.uint8)}
    fns = {k: (lambda s=s, f=feeds[k]: s.run(None, {"x": f})) for k, s in sessions.items()}
    times = time_interleaved(fns, warmup=3, runs=runs)
    return {k: float(np.median(v)) for k, v in times.items()}


def runtime_fallback(
    model: Detector, *, margin: float = 0.25, runs: int = 40, progress: bool = True
) -> dict[str, str]:
    """Switch to float every quantized conv whose int8 unit is slower than float by more than ``margin``
    (a fraction), in two timings of ``runs`` interleaved calls each.

    Returns {layer: reason}. The conv's weight and output quantizers go off, and so does the
    sigmoid of a SiLU right after it (the float runtime fuses conv, sigmoid and product); the
    SiLU's output stays quantized for the int8 layers that read it. The graph input's quantizer
    goes off when no int8 layer reads it any more.
    """
    qs = quantizers(model)
    shapes = conv_shapes(model)
    silu_of = _silu_after(model)
    reasons: dict[str, str] = {}
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, QuantConv2d) and m.weight_quant.mode == Mode.QUANT and n in shapes]  # fmt: skip
    for name, conv in tqdm(layers, desc="int8 vs fp32 per layer", unit="layer", disable=not progress):
        t = layer_latency(conv, shapes[name], silu=name in silu_of, runs=runs)
        if t["int8"] <= t["fp32"] * (1 + margin):
            continue
        again = layer_latency(conv, shapes[name], silu=name in silu_of, runs=runs)  # a second, independent look:
        if again["int8"] <= again["fp32"] * (1 + margin):  # one noisy timing must not move a layer to float
            continue
        t = {k: min(t[k], again[k]) for k in t}
        conv.weight_quant.mode = Mode.OFF
        for key in (_key_of(qs, name, "act"), silu_of.get(name)):
            if key is not None:
                qs[key].mode = Mode.OFF
        reasons[name] = (f"measured on ONNX Runtime (1 thread): int8 {t['int8'] * 1e6:.0f} us vs fp32 "
                         f"{t['fp32'] * 1e6:.0f} us for this layer alone: float is faster")  # fmt: skip
    _drop_unread_input(model)
    return reasons


def _key_of(qs: dict[str, Any], label: str, kind: str) -> str | None:
    return next((k for k, q in qs.items() if q.label == label and q.kind == kind), None)


def _silu_after(model: Detector) -> dict[str, str]:
    """conv name -> key of the sigmoid quantizer of the SiLU that reads (only) its output."""
    gm = model._quant_graph
    modules = dict(gm.named_modules())
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), QuantConv2d):
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and str(users[0].target).startswith("quant."):
            consumers = list(users[0].users)
            sig = next((u for u in consumers if u.op == "call_function" and u.target is torch.sigmoid), None)
            if sig is not None and all(u is sig or u.target is operator.mul for u in consumers):
                qsig = next((u for u in sig.users if str(u.target).startswith("quant.")), None)
                if qsig is not None:
                    out[node.target] = qsig.target.split(".", 1)[1]
    return out


def _drop_unread_input(model: Detector) -> None:
    gm = model._quant_graph
    modules = dict(gm.named_modules())
    qs = quantizers(model)
    for node in gm.graph.nodes:
        if node.op != "call_module" or not str(node.target).startswith("quant."):
            continue
        if not (node.args and getattr(node.args[0], "op", None) == "placeholder"):
            continue
        readers = [modules.get(u.target) for u in node.users if u.op == "call_module"]
        if readers and all(isinstance(r, QuantConv2d) and r.weight_quant.mode == Mode.OFF for r in readers):
            qs[node.target.split(".", 1)[1]].mode = Mode.OFF


def _graph(conv: nn.Conv2d, shape: tuple[int, ...], *, silu: bool, int8: bool) -> bytes:
    rng = np.random.default_rng(1)
    w = rng.standard_normal(tuple(conv.weight.shape)).astype(np.float32) * 0.1
    attrs = {"strides": list(conv.stride), "pads": [*conv.padding, *conv.padding], "dilations": list(conv.dilation),
             "group": conv.groups, "kernel_shape": list(conv.kernel_size)}  # fmt: skip
    out_ch = w.shape[0]
    inits, nodes = [], []
    x = "x"
    if int8:
        inits += [numpy_helper.from_array(np.array(0.02, np.float32), "s"),
                  numpy_helper.from_array(np.array(128, np.uint8), "z"),
                  numpy_helper.from_array(np.clip(np.round(w / 0.01), -127, 127).astype(np.int8), "w_q"),
                  numpy_helper.from_array(np.full(out_ch, 0.01, np.float32), "w_s"),
                  numpy_helper.from_array(np.zeros(out_ch, np.int8), "w_z"),
                  numpy_helper.from_array(np.zeros(out_ch, np.int32), "b_q"),
                  numpy_helper.from_array(np.full(out_ch, 0.0002, np.float32), "b_s"),
                  numpy_helper.from_array(np.zeros(out_ch, np.int32), "b_z")]  # fmt: skip
        nodes += [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["xf"]),
                  helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], axis=0),
                  helper.make_node("DequantizeLinear", ["b_q", "b_s", "b_z"], ["b"], axis=0)]  # fmt: skip
        x = "xf"
    else:
        inits += [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(out_ch, np.float32), "b")]
    nodes.append(helper.make_node("Conv", [x, "w", "b"], ["y"], **attrs))
    y = "y"
    if int8:
        nodes += [helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"]),
                  helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["yd"])]  # fmt: skip
        y = "yd"
    if silu:
        nodes.append(helper.make_node("Sigmoid", [y], ["sig"]))
        sig = "sig"
        if int8:
            nodes += [helper.make_node("QuantizeLinear", ["sig", "s", "z"], ["sq"]),
                      helper.make_node("DequantizeLinear", ["sq", "s", "z"], ["sd"])]  # fmt: skip
            sig = "sd"
        nodes.append(helper.make_node("Mul", [y, sig], ["act"]))
        y = "act"
    elem = TensorProto.UINT8 if int8 else TensorProto.FLOAT
    if int8:
        nodes.append(helper.make_node("QuantizeLinear", [y, "s", "z"], ["out"]))
    else:
        nodes.append(helper.make_node("Identity", [y], ["out"]))
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", elem, list(shape))],
                              [helper.make_tensor_value_info("out", elem, None)], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()
