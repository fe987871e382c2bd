"""Where the quantizers go: an FX trace of the detector, BN folded, a fake quantizer on every tensor.

The model's ``forward`` is traced with ``torch.fx`` (the scope of every functional op is recorded,
so a ``torch.cat`` inside ``heads.0`` is labelled ``heads.0/cat``). Then:

* every Conv2d followed only by a BatchNorm is folded with it (the BN becomes an Identity), by
  the BatchNorm folding of :mod:`slimdet.compress.graph_fuse`;
* SiLU is split into its Sigmoid and its product, each quantized, as integer runtimes run it
  (ONNX Runtime: QLinearSigmoid and QLinearMul);
* the graph input and the output of every op that computes (conv, linear, activations, add, mul,
  concat, ...) get an activation quantizer; ops that only move values (slicing, max-pool, nearest
  upsampling, reshapes) keep their input's grid and get a quantizer that shares it, so the
  exported graph marks them as integer ops too;
* convs and linears are swapped for :class:`QuantConv2d` / :class:`QuantLinear`, which quantize
  their weight (and their bias to the int32 grid ``s_in * s_w`` that an integer kernel adds).

The detector keeps its class, its parameters and its state-dict names; its ``forward`` is replaced
by the traced graph. Each quantizer can be switched off (kept in float) without rebuilding.
"""

from __future__ import annotations

import operator
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from slimdet.compress.graph_fuse import fold_batchnorm
from slimdet.compress.graph_trace import ScopeTracer as _ScopeTracer
from slimdet.compress.quant.quantizers import Mode, Quantizer
from slimdet.errors import ConfigError
from slimdet.models.base import Detector

_PASS_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.Identity, nn.Dropout, nn.Flatten, nn.Unflatten)
_PASS_FUNCS = {operator.getitem, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose,
               torch.permute, F.max_pool2d, F.dropout, torch.split, torch.chunk}  # fmt: skip
_PASS_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze", "split",
                 "chunk", "__getitem__"}  # fmt: skip


@dataclass(frozen=True)
class Point:
    """One quantized tensor: an activation (op output) or a layer's weight."""

    key: str  # name in model.quant
    label: str  # readable: module name, or "<scope>/<op>" for functional ops
    kind: str  # "act" | "weight" | "shared" (grid of ``source``)
    layer: str | None = None  # weight points: the conv/linear module
    source: str | None = None  # shared points: key of the grid they share
    shape: tuple[int, ...] = ()


class QuantConv2d(nn.Conv2d):
    """Conv2d whose weight (and bias, on the int32 grid) is fake-quantized."""

    weight_quant: Quantizer

    @classmethod
    def wrap(cls, conv: nn.Conv2d, weight_quant: Quantizer) -> QuantConv2d:
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode)  # fmt: skip
        new.weight, new.bias = conv.weight, conv.bias
        new.weight_quant = weight_quant
        object.__setattr__(new, "input_quant", None)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, *_weight_bias(self))


class QuantLinear(nn.Linear):
    """Linear whose weight (and bias, on the int32 grid) is fake-quantized."""

    weight_quant: Quantizer

    @classmethod
    def wrap(cls, linear: nn.Linear, weight_quant: Quantizer) -> QuantLinear:
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.weight, new.bias = linear.weight, linear.bias
        new.weight_quant = weight_quant
        object.__setattr__(new, "input_quant", None)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, *_weight_bias(self))


def _weight_bias(layer: QuantConv2d | QuantLinear) -> tuple[Tensor, Tensor | None]:
    frozen = getattr(layer, "frozen", None)
    if frozen is None:
        return layer.weight_quant(layer.weight), _bias(layer)
    w, b = frozen
    wq = layer.weight_quant
    if wq.mode == Mode.QUANT and _integer_grid(wq):  # a constant on the grid, behind a plain Q/DQ pair
        w = wq._fake(w)  # binary weights too: alpha * sign(w) is on the per-channel grid alpha
    return w, b


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Quantized weights, biases and step sizes as constants: for ONNX export.

    Inside, every quantized layer computes with its weight already on the grid (and its bias on
    the int32 grid), and every per-tensor quantizer with Python-number step sizes, so the exported
    graph is Q/DQ pairs on constants instead of the rounding arithmetic.
    """
    layers = [m for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    qs = list(quantizers(model).values())
    with torch.no_grad():
        for layer in layers:
            object.__setattr__(layer, "frozen", (layer.weight_quant(layer.weight).detach().clone(),
                                                 None if layer.bias is None else _bias(layer).detach().clone()))
    for q in qs:
        q.frozen = True
    try:
        with warnings.catch_warnings():  # the tracer warns that step sizes become constants: intended
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            yield
    finally:
        for layer in layers:
            object.__setattr__(layer, "frozen", None)
        for q in qs:
            q.frozen = False


def _bias(layer: QuantConv2d | QuantLinear) -> Tensor | None:
    """The bias on the grid ``s_in * s_w`` (int32 in an integer kernel) when both sides are quantized."""
    b, wq, iq = layer.bias, layer.weight_quant, layer.input_quant
    if b is None or iq is None or iq.mode != Mode.QUANT or wq.mode != Mode.QUANT or not _integer_grid(wq, iq):
        return b
    step = (iq.scale.detach() * wq.scale.detach()).expand(b.shape)
    q = b / step
    q = (q.round() - q).detach() + q if layer.training else q.round()
    return q.clamp(-(2**31), 2**31 - 1) * step


def _integer_grid(*qs: Quantizer) -> bool:
    return all(q.scale_type in ("uniform", "pow2", "binary") and not q.fp16 for q in qs)


def trace(model: Detector) -> fx.Graph:
    """The detector's forward as an FX graph; a clear error for models FX cannot trace.

    A model with graph passes installed (:func:`slimdet.compress.graph.optimize_graph`) starts
    from that optimized graph, with fused activations split again so that a quantizer fits
    between a conv and its activation.
    """
    from slimdet.compress.graph import take_installed_graph

    graph = take_installed_graph(model)
    if graph is not None:
        return graph
    try:
        return _ScopeTracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: not quantizable this way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"cannot quantize {model.model_config.get('name', type(model).__name__)!r}: its forward is not "
            f"traceable by torch.fx ({type(exc).__name__}: {first}); quantization needs a static graph"
        ) from None


def _split_silu(model: nn.Module, graph: fx.Graph) -> None:
    modules = dict(model.named_modules())
    for node in list(graph.nodes):
        is_silu = (node.op == "call_module" and isinstance(modules.get(node.target), nn.SiLU)) or (
            node.op == "call_function" and node.target is F.silu
        )
        if not is_silu:
            continue
        label = node.target if node.op == "call_module" else _functional_label(node)
        x = node.args[0]
        with graph.inserting_before(node):
            sig = graph.call_function(torch.sigmoid, (x,))
            mul = graph.call_function(operator.mul, (x, sig))
        sig.meta.update(scope=node.meta.get("scope", ""), label=f"{label}:sigmoid")
        mul.meta.update(scope=node.meta.get("scope", ""), label=label)
        node.replace_all_uses_with(mul)
        graph.erase_node(node)


def _node_label(node: fx.Node) -> str:
    if node.op == "placeholder":
        return "input"
    return node.target if node.op == "call_module" else _functional_label(node)


def _functional_label(node: fx.Node) -> str:
    op = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    op = {"getitem": "slice", "add": "add", "mul": "mul"}.get(op, op)
    scope = node.meta.get("scope", "")
    return f"{scope}/{op}" if scope else op


def _is_passthrough(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        m = modules.get(node.target)
        return isinstance(m, _PASS_MODULES) or (isinstance(m, nn.Upsample) and m.mode == "nearest")
    if node.op == "call_function":
        if node.target is F.interpolate:
            return node.kwargs.get("mode", "nearest") == "nearest"
        return node.target in _PASS_FUNCS
    return node.op == "call_method" and node.target in _PASS_METHODS


def _is_float_tensor(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "dtype") and meta.dtype.is_floating_point


def build(
    model: Detector, make_quantizer: Callable[[Point], Quantizer]
) -> tuple[list[Point], list[str]]:
    """Fold BN, place quantizers (made by ``make_quantizer``) and install the traced forward.

    Returns the quantization points in graph order and the names of the folded BN layers.
    """
    if is_quantized(model):
        raise ConfigError(f"{model.model_config.get('name', type(model).__name__)!r} is already quantized")
    graph = trace(model)
    folded = fold_batchnorm(model, graph)
    _split_silu(model, graph)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ShapeProp(fx.GraphModule(model, graph)).propagate(model.example_inputs(1))
    model.train(was_training)

    modules = dict(model.named_modules())
    quant = nn.ModuleDict()
    points: list[Point] = []
    grid: dict[fx.Node, str] = {}  # tensor -> key of the quantizer whose grid it is on
    used: set[str] = set()

    def add(point: Point, after: fx.Node) -> None:
        q = make_quantizer(point)
        q.label, q.kind = point.label, point.kind
        if point.source is not None:
            object.__setattr__(q, "source", quant[point.source])
        quant[point.key] = q
        points.append(point)
        with graph.inserting_after(after):
            qnode = graph.create_node("call_module", f"quant.{point.key}", (after,))
        after.replace_all_uses_with(qnode, delete_user_cb=lambda user: user is not qnode)
        grid[qnode] = point.source or point.key

    for node in list(graph.nodes):
        if node.op in ("output", "get_attr"):
            continue
        passthrough = _is_passthrough(node, modules)
        src = next((a for a in node.all_input_nodes if a in grid), None)
        if not _is_float_tensor(node):
            if passthrough and src is not None:  # split / chunk: a tuple of tensors on the same grid
                grid[node] = grid[src]
            continue
        label = node.meta.get("label") or _node_label(node)
        label = _unique(label, used)
        shape = tuple(node.meta["tensor_meta"].shape)
        mod = modules.get(node.target) if node.op == "call_module" else None
        if type(mod) in (nn.Conv2d, nn.Linear):
            wkey = _key(label + ".weight", quant)
            wpoint = Point(wkey, node.target, "weight", layer=node.target, shape=tuple(mod.weight.shape))
            wq = make_quantizer(wpoint)
            wq.label, wq.kind = node.target, "weight"
            quant[wkey] = wq
            points.append(wpoint)
            wrapped = (QuantConv2d if isinstance(mod, nn.Conv2d) else QuantLinear).wrap(mod, wq)
            model.set_submodule(node.target, wrapped)
            modules[node.target] = wrapped
            if src is not None:
                object.__setattr__(wrapped, "input_quant", quant[grid[src]])
        if passthrough:
            if src is not None:
                add(Point(_key(label, quant), label, "shared", source=grid[src], shape=shape), node)
            continue
        if node.op != "placeholder" and src is None:
            continue  # computed from float tensors only (constants, shapes): stays float
        add(Point(_key(label, quant), label, "act", shape=shape), node)

    model.quant = quant
    gm = fx.GraphModule(model, graph)
    graph.lint()
    object.__setattr__(model, "_quant_graph", gm)
    object.__setattr__(model, "forward", gm.forward)
    return points, folded


def quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """The model's quantizers by key (empty for a float model)."""
    quant = getattr(model, "quant", None)
    return dict(quant.items()) if isinstance(quant, nn.ModuleDict) else {}


def output_keys(model: nn.Module) -> set[str]:
    """Keys of the quantizers of the detector's raw predictions.

    These are the graph's outputs and the tensors that reach them only through concatenation or
    ops that move values (a head's box and class maps before they are concatenated): their values
    are what the float decoder reads.
    """
    gm = getattr(model, "_quant_graph", None)
    if gm is None:
        return set()
    modules = dict(gm.named_modules())
    found: set[str] = set()
    frontier = list(next(n for n in gm.graph.nodes if n.op == "output").all_input_nodes)
    seen: set[fx.Node] = set()
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and str(node.target).startswith("quant."):
            found.add(node.target.split(".", 1)[1])
            frontier.extend(node.all_input_nodes)
        elif node.target is torch.cat or _is_passthrough(node, modules):
            frontier.extend(node.all_input_nodes)
    return found


def grid_root(q: Quantizer) -> Quantizer:
    """The quantizer whose grid ``q`` is on (itself, or the source at the end of a shared chain)."""
    while q.source is not None:
        q = q.source
    return q


def concatenations(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Every concatenation of the quantized graph: (key of its output's quantizer, keys of the grids its
    inputs are on), in graph order. Inputs on no grid (float tensors) are left out."""
    gm = getattr(model, "_quant_graph", None)
    if gm is None:
        return []
    qs = quantizers(model)
    key_of = {id(q): k for k, q in qs.items()}

    def grid_key(node: object) -> str | None:
        if isinstance(node, fx.Node) and node.op == "call_module" and str(node.target).startswith("quant."):
            return key_of[id(grid_root(qs[node.target.split(".", 1)[1]]))]
        return None

    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.cat or len(node.users) != 1:
            continue
        out = grid_key(next(iter(node.users)))
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        if out is not None:
            found.append((out, [k for k in map(grid_key, tensors) if k is not None]))
    return found


def silu_inputs(model: nn.Module) -> list[tuple[str, str]]:
    """Every split SiLU whose input feeds nothing else: (key of the input's quantizer, key of the product's)."""
    gm = getattr(model, "_quant_graph", None)
    if gm is None:
        return []

    def key(node: fx.Node) -> str | None:
        if node.op == "call_module" and str(node.target).startswith("quant."):
            return node.target.split(".", 1)[1]
        return None

    found = []
    for node in gm.graph.nodes:
        if key(node) is None or len(node.users) != 2:
            continue
        sig = next((u for u in node.users if u.target is torch.sigmoid), None)
        mul = next((u for u in node.users if u.target is operator.mul), None)
        if sig is None or mul is None or len(sig.users) != 1:
            continue
        sig_q = next(iter(sig.users))
        if key(sig_q) is None or set(mul.args) != {node, sig_q} or len(mul.users) != 1:
            continue
        out = key(next(iter(mul.users)))
        if out is not None:
            found.append((key(node), out))
    return found


def is_quantized(model: nn.Module) -> bool:
    """True for a model whose forward runs the quantized graph of :func:`build`."""
    return getattr(model, "_quant_graph", None) is not None


@contextmanager
def float_mode(model: nn.Module) -> Iterator[dict[str, Quantizer]]:
    """Every quantizer off for the block (the folded float model); their modes are restored after."""
    qs = quantizers(model)
    saved = {k: q.mode for k, q in qs.items()}
    for q in qs.values():
        q.mode = Mode.OFF
    try:
        yield qs
    finally:
        for k, q in qs.items():
            q.mode = saved[k]


def set_mode(model: nn.Module, mode: Mode, *, kinds: tuple[str, ...] = ("act", "weight", "shared")) -> None:
    for q in quantizers(model).values():
        if getattr(q, "kind", "act") in kinds:
            q.mode = mode


def _key(label: str, taken: nn.ModuleDict) -> str:
    base = re.sub(r"[^0-9A-Za-z_]", "_", label).strip("_") or "t"
    key, i = base, 1
    while key in taken:
        i += 1
        key = f"{base}_{i}"
    return key


def _unique(label: str, used: set[str]) -> str:
    out, i = label, 1
    while out in used:
        i += 1
        out = f"{label}_{i}"
    used.add(out)
    return out
