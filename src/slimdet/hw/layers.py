"""The layer table: a model as the GEMMs and element-wise ops a piece of hardware executes.

Every conv (grouped and depthwise too), linear layer and activation-by-activation matmul becomes a
:class:`GemmLayer` in im2col form (Chellapilla et al., 2006): an ``M x K`` input matrix times a
``K x N`` weight matrix, ``groups`` times over, with the layer's weight and activation bits and the
fraction of zero weights. The ops between them (activations, element-wise arithmetic, concat, resize,
pooling) and the detector's post-processing (box decode and NMS) become :class:`ElementOp` rows with
their element counts. Pruned, sparse and quantized models are read as they are: channels from the
weights' shapes, sparsity from the (quantized) weights, bits from the quantizers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

FLOAT_BITS = 32


@dataclass(frozen=True)
class GemmLayer:
    """One conv / linear / matmul as ``groups`` GEMMs of ``(m x k) @ (k x n)``.

    Conv2d: m = batch x out_h x out_w, k = in_channels / groups x kernel_h x kernel_w,
    n = out_channels / groups. Linear: m = rows of the input, k = in_features, n = out_features.
    """

    name: str
    op: str  # "conv", "dwconv" (one input channel per group), "gconv", "linear", "matmul"
    m: int
    k: int
    n: int
    groups: int = 1
    weight_bits: int = FLOAT_BITS
    act_bits: int = FLOAT_BITS
    #: fraction of weights that are exactly zero (after quantization for a quantized layer)
    weight_sparsity: float = 0.0
    batch: int = 1
    #: conv geometry of one image: input (channels, height, width) before padding
    in_chw: tuple[int, int, int] = (0, 0, 0)
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    out_hw: tuple[int, int] = (1, 1)

    @property
    def macs(self) -> int:
        """Dense multiply-accumulates (zeros included)."""
        return self.m * self.k * self.n * self.groups

    @property
    def in_channels(self) -> int:
        return self.in_chw[0] if self.op in ("conv", "dwconv", "gconv") else self.k * self.groups

    @property
    def out_channels(self) -> int:
        return self.n * self.groups

    @property
    def weight_elements(self) -> int:
        return self.k * self.n * self.groups

    @property
    def input_elements(self) -> int:
        """Distinct input elements read (an activation, not its im2col copies)."""
        if self.op in ("conv", "dwconv", "gconv"):
            return self.batch * math.prod(self.in_chw)
        return self.m * self.k * self.groups

    @property
    def output_elements(self) -> int:
        return self.m * self.n * self.groups


@dataclass(frozen=True)
class ElementOp:
    """A non-GEMM op: activation, element-wise arithmetic, concat, resize, pool, decode, NMS."""

    name: str  # the module it ran in (+ the op), or "postprocess"
    op: str  # "activation", "elementwise", "norm", "concat", "resize", "reduce", "copy", "decode", "nms"
    elements: int  # output elements (NMS: candidate boxes in)
    bits: int = FLOAT_BITS
    calls: int = 1


#: aten op name (without overload) -> ElementOp kind; view ops (outputs alias inputs) are skipped
_KINDS = {
    **dict.fromkeys(("silu", "sigmoid", "relu", "relu6", "hardswish", "hardsigmoid", "gelu", "tanh", "leaky_relu",
                     "mish", "softmax", "_softmax", "log_softmax", "_log_softmax", "exp", "hardtanh", "clamp",
                     "clamp_min", "clamp_max", "elu", "softplus"), "activation"),  # fmt: skip
    **dict.fromkeys(("add", "sub", "mul", "div", "rsub", "neg", "where", "maximum", "minimum", "pow", "sqrt",
                     "rsqrt", "abs", "floor", "ceil", "round", "log", "masked_fill", "bitwise_and", "gt", "lt",
                     "ge", "le", "eq", "ne", "copysign"), "elementwise"),  # fmt: skip
    **dict.fromkeys(("cat", "stack"), "concat"),
    **dict.fromkeys(("upsample_nearest2d", "upsample_bilinear2d", "_upsample_nearest_exact2d",
                     "_upsample_bilinear2d_aa", "grid_sampler_2d", "roi_align"), "resize"),  # fmt: skip
    **dict.fromkeys(("max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "adaptive_avg_pool2d",
                     "_adaptive_avg_pool2d", "adaptive_max_pool2d", "mean", "amax", "max", "sum",
                     "topk", "sort", "argmax"), "reduce"),  # fmt: skip
    **dict.fromkeys(("clone", "_to_copy", "contiguous", "copy_", "index", "gather", "index_select",
                     "nonzero", "constant_pad_nd"), "copy"),  # fmt: skip
    # a deployment compiler folds inference batch norm into the conv before it: cost models may skip "norm"
    **dict.fromkeys(("native_batch_norm", "_native_batch_norm_legit_no_training", "batch_norm",
                     "native_layer_norm", "native_group_norm"), "norm"),  # fmt: skip
}
_ARRAY_KEYS = ("m", "k", "n", "groups", "weight_bits", "act_bits", "macs", "weight_elements", "input_elements",
               "output_elements")  # fmt: skip
_GEMM_ATEN = {"mm", "bmm", "matmul", "addmm", "baddbmm"}
_IGNORED = {"fake_quantize_per_tensor_affine", "fake_quantize_per_channel_affine", "detach", "empty_like",
            "zeros_like", "ones_like", "full_like", "arange", "empty", "zeros", "ones", "full", "lift_fresh",
            "_local_scalar_dense", "item", "scalar_tensor", "fill_", "zero_"}  # fmt: skip


@dataclass(frozen=True)
class LayerTable:
    """A model's GEMM layers and element-wise ops for one forward (+ post-processing) of ``input_shape``."""

    gemm: tuple[GemmLayer, ...]
    ops: tuple[ElementOp, ...] = ()
    input_shape: tuple[int, ...] = ()
    model: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __len__(self) -> int:
        return len(self.gemm)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.gemm)

    @cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        """Struct-of-arrays view of the GEMM layers (int64 / float64), for vectorized cost models:
        ``m, k, n, groups, weight_bits, act_bits, weight_sparsity, macs, weight_elements,
        input_elements, output_elements``."""
        cols: dict[str, list[float]] = defaultdict(list)
        for layer in self.gemm:
            for key in _ARRAY_KEYS:
                cols[key].append(getattr(layer, key))
            cols["weight_sparsity"].append(layer.weight_sparsity)
        out = {k: np.asarray(v, dtype=np.int64) for k, v in cols.items() if k != "weight_sparsity"}
        out["weight_sparsity"] = np.asarray(cols["weight_sparsity"], dtype=np.float64)
        if not self.gemm:
            out = {k: np.zeros(0, np.int64) for k in _ARRAY_KEYS}
            out["weight_sparsity"] = np.zeros(0)
        return out

    def with_bits(self, weight_bits: dict[str, int] | int | None = None,
                  act_bits: dict[str, int] | int | None = None) -> LayerTable:  # fmt: skip
        """A copy with other bits, per layer name (a dict) or for every layer (an int)."""

        def pick(choice: dict[str, int] | int | None, name: str, current: int) -> int:
            if choice is None:
                return current
            return choice if isinstance(choice, int) else choice.get(name, current)

        gemm = tuple(replace(g, weight_bits=pick(weight_bits, g.name, g.weight_bits),
                             act_bits=pick(act_bits, g.name, g.act_bits)) for g in self.gemm)  # fmt: skip
        return replace(self, gemm=gemm)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per GEMM layer then per element-wise op, for tables and JSON."""
        out: list[dict[str, Any]] = []
        for g in self.gemm:
            out.append({"name": g.name, "op": g.op, "m": g.m, "k": g.k, "n": g.n, "groups": g.groups,
                        "macs": g.macs, "weight_bits": g.weight_bits, "act_bits": g.act_bits,
                        "weight_sparsity": round(g.weight_sparsity, 4)})  # fmt: skip
        for e in self.ops:
            out.append({"name": e.name, "op": e.op, "elements": e.elements, "bits": e.bits, "calls": e.calls})
        return out


def layer_table(model: nn.Module, example: Tensor | None = None, *, postprocess: bool = True) -> LayerTable:
    """Trace ``model(example)`` once (eval mode, no grad, training flag restored) into a :class:`LayerTable`.

    Args:
        model: any module; a slimdet :class:`~slimdet.models.base.Detector` also has its
            ``postprocess`` (decode, NMS) traced on the raw outputs.
        example: input batch; default ``model.example_inputs()``.
        postprocess: include the detector's post-processing ops.
    """
    if example is None:
        example = model.example_inputs()  # type: ignore[operator]
    names = {m: n for n, m in model.named_modules()}
    act_bits = _default_act_bits(model)
    gemm: list[GemmLayer] = []
    stack: list[nn.Module] = []
    recorder = _OpRecorder(stack, names, act_bits)

    def pre(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        stack.append(module)

    def post(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        stack.pop()
        if isinstance(module, (nn.Conv2d, nn.Linear)) and inputs and isinstance(inputs[0], Tensor):
            with recorder.paused():
                gemm.append(_gemm_row(names.get(module, type(module).__name__), module, inputs[0], output))

    handles = [m.register_forward_pre_hook(pre) for m in model.modules()]
    handles += [m.register_forward_hook(post) for m in model.modules()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            with recorder.recording("forward"):
                raw = model(example)
            if postprocess and hasattr(model, "postprocess"):
                with recorder.recording("postprocess"):
                    model.postprocess(raw)  # type: ignore[operator]
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    gemm = _unique_names(gemm)
    return LayerTable(gemm=tuple(gemm) + tuple(recorder.matmuls), ops=tuple(recorder.merged()),
                      input_shape=tuple(example.shape), model=type(model).__name__)  # fmt: skip


def _gemm_row(name: str, module: nn.Module, x: Tensor, out: Tensor) -> GemmLayer:
    wbits, abits, sparsity = _layer_quant(module)
    if isinstance(module, nn.Conv2d):
        b, c, h, w = x.shape
        oh, ow = out.shape[-2:]
        g = module.groups
        op = "conv" if g == 1 else ("dwconv" if c // g == 1 else "gconv")
        kh, kw = module.kernel_size
        pad = module.padding if isinstance(module.padding, tuple) else (0, 0)  # "same"/"valid" strings: 0
        return GemmLayer(name=name, op=op, m=b * oh * ow, k=(c // g) * kh * kw, n=module.out_channels // g,
                         groups=g, weight_bits=wbits, act_bits=abits, weight_sparsity=sparsity, batch=b,
                         in_chw=(c, h, w), kernel=(kh, kw), stride=tuple(module.stride),  # type: ignore[arg-type]
                         padding=tuple(pad), out_hw=(oh, ow))  # type: ignore[arg-type]  # fmt: skip
    rows = x.numel() // module.in_features  # type: ignore[operator]
    return GemmLayer(name=name, op="linear", m=rows, k=module.in_features, n=module.out_features,  # type: ignore[arg-type]
                     weight_bits=wbits, act_bits=abits, weight_sparsity=sparsity,
                     batch=x.shape[0] if x.dim() > 1 else 1)  # fmt: skip


def _layer_quant(module: nn.Module) -> tuple[int, int, float]:
    """(weight bits, input activation bits, fraction of zero weights) of a float or quantized layer."""
    from slimdet.compress.quant.quantizers import Mode

    weight = module.weight.detach()
    wq, iq = getattr(module, "weight_quant", None), getattr(module, "input_quant", None)
    wbits = wq.bits if wq is not None and wq.mode == Mode.QUANT else FLOAT_BITS
    abits = iq.bits if iq is not None and iq.mode == Mode.QUANT else FLOAT_BITS
    if wq is not None and wq.mode == Mode.QUANT:
        weight = wq(weight)
    sparsity = float((weight == 0).sum()) / max(weight.numel(), 1)
    return wbits, abits, sparsity


def _default_act_bits(model: nn.Module) -> int:
    """The most common activation bit-width of a quantized model's activation quantizers, else float."""
    from slimdet.compress.quant.graph import is_quantized, quantizers
    from slimdet.compress.quant.quantizers import Mode

    if not is_quantized(model):
        return FLOAT_BITS
    bits = [q.bits for q in quantizers(model).values() if q.kind != "weight" and q.mode == Mode.QUANT]
    return max(set(bits), key=bits.count) if bits else FLOAT_BITS


def _unique_names(rows: list[GemmLayer]) -> list[GemmLayer]:
    seen: dict[str, int] = {}
    out = []
    for r in rows:
        seen[r.name] = seen.get(r.name, 0) + 1
        out.append(r if seen[r.name] == 1 else replace(r, name=f"{r.name}#{seen[r.name]}"))
    return out


class _OpRecorder(TorchDispatchMode):
    """Records the aten ops that run outside conv/linear modules, as element-wise ops or matmuls."""

    def __init__(self, stack: list[nn.Module], names: dict[nn.Module, str], bits: int) -> None:
        super().__init__()
        self.stack, self.names, self.bits = stack, names, bits
        self.phase = "forward"
        self.active = True
        self.ops: list[ElementOp] = []
        self.matmuls: list[GemmLayer] = []

    @contextmanager
    def recording(self, phase: str) -> Iterator[None]:
        self.phase = phase
        with self:
            yield

    @contextmanager
    def paused(self) -> Iterator[None]:
        self.active = False
        try:
            yield
        finally:
            self.active = True

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not self.active or any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in self.stack):
            return out
        name = func._schema.name.split("::")[-1].removesuffix("_")  # in-place "silu_" counts as "silu"
        if func._schema.name == "torchvision::nms":
            self.ops.append(ElementOp("postprocess/nms", "nms", int(args[0].shape[0]), FLOAT_BITS))
            return out
        returns = func._schema.returns
        is_view = bool(returns) and returns[0].alias_info is not None and not func._schema.is_mutable
        if name in _IGNORED or name.lstrip("_").startswith("fake_quantize") or is_view:
            return out
        where = self.names.get(self.stack[-1], "") if self.stack else ""
        if self.phase == "postprocess":
            kind, where = "decode", "postprocess"
        elif name in _GEMM_ATEN:
            self._matmul(where or name, name, args)
            return out
        else:
            kind = _KINDS.get(name, "elementwise")
        first = out[0] if isinstance(out, (tuple, list)) else out
        elements = int(first.numel()) if isinstance(first, Tensor) else 0
        if elements:
            self.ops.append(ElementOp(f"{where}/{name}" if where else name, kind, elements,
                                      self.bits if self.phase == "forward" else FLOAT_BITS))  # fmt: skip
        return out

    def _matmul(self, where: str, name: str, args: Any) -> None:
        a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
        batch = int(math.prod(a.shape[:-2])) if a.dim() > 2 else 1
        self.matmuls.append(GemmLayer(name=f"{where}/{name}#{len(self.matmuls) + 1}", op="matmul",
                                      m=int(a.shape[-2]), k=int(a.shape[-1]), n=int(b.shape[-1]),
                                      groups=batch, weight_bits=self.bits, act_bits=self.bits))  # fmt: skip

    def merged(self) -> list[ElementOp]:
        """Ops merged by (name, kind): repeated calls add up their elements."""
        acc: dict[tuple[str, str], list[int]] = {}
        bits: dict[tuple[str, str], int] = {}
        for e in self.ops:
            key = (e.name, e.op)
            tot = acc.setdefault(key, [0, 0])
            tot[0] += e.elements
            tot[1] += 1
            bits[key] = e.bits
        return [ElementOp(name, op, el, bits[(name, op)], calls) for (name, op), (el, calls) in acc.items()]
