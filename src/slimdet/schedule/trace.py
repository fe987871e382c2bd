"""A detector as an :class:`~slimdet.schedule.graph.OpGraph`: its torch.fx graph, priced on each device.

Nodes are the fx graph's modules and functions, plus ``decode`` and ``nms`` for the detector's
post-processing. Views (slicing, reshapes) and quantizers are not nodes: a consumer reads their
producer. With ``fuse`` (default), element-wise epilogues (batch norm, activations, an element-wise
op reading one fused node) join the node they read, as a deployment compiler fuses conv + BN + act.

Costs come from :mod:`slimdet.hw`: GEMMs of a module are the layer table's rows of that module.
On a roofline device (CPU/GPU) a node costs :func:`slimdet.hw.roofline.estimate` of its rows; on a
systolic accelerator its GEMMs cost :func:`slimdet.hw.systolic.simulate` and its element-wise ops
stream through the array's output pipeline at one element per column per cycle (assumption: an
NPU's activation/element-wise unit is as wide as its array, as in Arm Ethos-U). Constraints: an
accelerator runs no ``decode`` / ``nms`` (control flow and sorting) and no op whose operands are
wider than its widest supported bits (float ops on an int8 NPU). The input frame is where the
first op runs (a camera DMAs it there); outputs are carried at their bits.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from slimdet.errors import ConfigError
from slimdet.hw.layers import FLOAT_BITS, ElementOp, GemmLayer, LayerTable, layer_table
from slimdet.hw.spec import HardwareSpec, SystolicSpec, list_presets, load_spec
from slimdet.registry import unknown_name_message
from slimdet.schedule.graph import Device, Link, Node, OpGraph

#: short device names and the preset each stands for
ALIASES = {"npu": "edge-npu", "cpu": "cpu-zen5-2c", "gpu": "gpu-jetson-orin-nano"}
HOST_ONLY = frozenset({"decode", "nms"})
#: fx functions / methods that only move or re-view values: their users read the producer
_VIEWS = {operator.getitem, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose,
          torch.permute, torch.split, torch.chunk, "view", "reshape", "flatten", "permute", "transpose",
          "contiguous", "squeeze", "unsqueeze", "split", "chunk", "__getitem__", "size", "dim"}  # fmt: skip
_FUNC_KIND = {"cat": "concat", "stack": "concat", "sigmoid": "activation", "silu": "activation", "relu": "activation",
              "hardswish": "activation", "softmax": "activation", "interpolate": "resize", "max_pool2d": "reduce",
              "adaptive_avg_pool2d": "reduce", "mean": "reduce", "sum": "reduce"}  # fmt: skip
_MODULE_KIND = ((nn.BatchNorm2d, "norm"), (nn.MaxPool2d, "reduce"), (nn.AvgPool2d, "reduce"),
                (nn.AdaptiveAvgPool2d, "reduce"), (nn.Upsample, "resize"))  # fmt: skip
_EPILOGUE = frozenset({"norm", "activation", "elementwise"})


@dataclass(frozen=True)
class Target:
    """A device and the hardware spec that prices it."""

    device: Device
    spec: HardwareSpec


def resolve_devices(devices: str | Sequence[str]) -> list[Target]:
    """``"npu,cpu"`` or a list of: an alias (npu, cpu, gpu), a preset, a spec YAML, or ``name=preset``.

    Raises:
        ConfigError: an unknown name (with the known ones), or two devices with the same name.
    """
    items = [d.strip() for d in (devices.split(",") if isinstance(devices, str) else devices) if d.strip()]
    if not items:
        raise ConfigError("schedule: --devices needs at least one device, e.g. npu,cpu")
    out: list[Target] = []
    for item in items:
        name, _, spec_name = item.rpartition("=") if "=" in item else ("", "", item)
        preset = ALIASES.get(spec_name, spec_name)
        if preset not in list_presets() and not preset.endswith((".yaml", ".yml")):
            raise ConfigError(unknown_name_message("device", spec_name, [*ALIASES, *list_presets()]))
        spec = load_spec(preset)
        name = name or (spec_name if spec_name in ALIASES else spec.name)
        out.append(Target(Device(name, "systolic" if isinstance(spec, SystolicSpec) else "roofline"), spec))
    names = [t.device.name for t in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"schedule: device names must differ, got {names} (name them: npu=edge-npu,npu2=tpu-v1)")
    return out


def default_link(a: HardwareSpec, b: HardwareSpec, *, latency_s: float = 20e-6) -> Link:
    """A hand-off through shared DRAM at the slower side's DRAM bandwidth, plus a fixed latency
    (assumption: 20 us for a driver call, a cache flush and a completion interrupt)."""
    return Link(bytes_per_s=min(_dram_bytes_per_s(a), _dram_bytes_per_s(b)), latency_s=latency_s)


def _dram_bytes_per_s(spec: HardwareSpec) -> float:
    return spec.dram_bytes_per_cycle * spec.clock_hz if isinstance(spec, SystolicSpec) else spec.mem_bytes_per_s


def model_graph(model: nn.Module, devices: str | Sequence[str] | Sequence[Target], *, bits: int | None = None,
                link: Link | None = None, fuse: bool = True, depth: int | None = None) -> OpGraph:  # fmt: skip
    """The model's operator graph with its cost on every device.

    Args:
        model: a detector torch.fx can trace (a quantized one is read from its quantized graph).
        devices: see :func:`resolve_devices`.
        bits: price every GEMM and tensor at these bits (a float model as it would be deployed
            quantized); default: the model's own (32 for a float model: an int NPU runs none of it).
        link: the link between any two devices; default :func:`default_link` of each pair.
        fuse: fuse element-wise epilogues into the node they read.
        depth: coarser nodes: fuse each call of a module ``depth`` levels deep (``2``: ``backbone.stage1``).
    """
    given = [] if isinstance(devices, str) else list(devices)
    targets = given if given and all(isinstance(d, Target) for d in given) else resolve_devices(devices)  # type: ignore[arg-type]
    graph, gm = _fx_graph(model)
    example = model.example_inputs(1)  # type: ignore[operator]
    was_training = model.training
    model.eval()
    try:
        _shapes(gm, example)
        table = layer_table(model, example)
    finally:
        model.train(was_training)
    if bits is not None:  # priced as deployed at ``bits``: GEMMs and tensors, not the float post-processing
        table = table.with_bits(bits, bits)
        table = LayerTable(table.gemm, tuple(e if e.op in HOST_ONLY else ElementOp(e.name, e.op, e.elements, bits,
                                                                                     e.calls) for e in table.ops),
                           table.input_shape, table.model)  # fmt: skip
    nodes, rows = _nodes(model, graph, table, bits)
    cost = np.asarray([[_cost(r, t.spec) for t in targets] for r in rows])
    links = {(a.device.name, b.device.name): link or default_link(a.spec, b.spec)
             for a in targets for b in targets if a is not b}  # fmt: skip
    first = next(iter(links.values()), Link(1e9))
    out = OpGraph(tuple(nodes), tuple(t.device for t in targets), cost, first, links)
    if fuse:
        out = out.contract(_epilogue_groups(out))
    if depth is not None:
        out = out.contract(_depth_groups(out, depth))
    return out


def _shapes(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Output shapes of every node (``meta["tensor_meta"]``), on fake tensors: no arithmetic."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.shape_prop import ShapeProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with torch.no_grad():
        ShapeProp(gm, fake_mode=mode).propagate(mode.from_tensor(example))


def _fx_graph(model: nn.Module) -> tuple[fx.Graph, fx.GraphModule]:
    from slimdet.compress.graph_install import installed_graph
    from slimdet.compress.graph_trace import GraphTracer

    gm = getattr(model, "_quant_graph", None)  # a quantized model runs this graph
    if gm is None and (inst := installed_graph(model)) is not None:
        gm = inst.gm
    if gm is not None:
        return gm.graph, gm
    try:
        graph = GraphTracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure: the model has no static graph
        raise ConfigError(f"schedule: cannot build the operator graph of {type(model).__name__}: torch.fx cannot "
                          f"trace its forward ({type(exc).__name__}: {str(exc).strip()[:200]})") from None  # fmt: skip
    return graph, fx.GraphModule(model, graph)


def _nodes(model: nn.Module, graph: fx.Graph, table: LayerTable, bits: int | None):
    """Schedule nodes and, per node, the (GEMM rows, element ops) that price it."""
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    done: dict[str, int] = {}
    rep: dict[fx.Node, str] = {}  # fx node -> the schedule node whose output it is
    nodes: list[Node] = []
    rows: list[tuple[list[GemmLayer], list[ElementOp]]] = []
    used: set[str] = set()

    def out_bits(n: fx.Node) -> int:
        if bits is not None:
            return bits
        for u in n.users:
            q = modules.get(u.target) if u.op == "call_module" and str(u.target).startswith("quant.") else None
            if q is not None and str(getattr(q, "mode", "")) == "quant":
                return int(q.bits)
        return FLOAT_BITS

    for n in graph.nodes:
        if n.op in ("get_attr", "output"):
            continue
        target = str(n.target) if n.op == "call_module" else ""
        fname = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        ins = list(dict.fromkeys(rep[a] for a in n.all_input_nodes if a in rep))
        if target.startswith("quant.") or (n.op != "call_module" and n.target in _VIEWS):
            if ins:
                rep[n] = ins[0]
            continue
        elements = _numel(n.meta.get("tensor_meta"))
        b = out_bits(n)
        if n.op == "placeholder":
            name, kind, gemm, ops = "input", "input", [], []
        elif n.op == "call_module":
            name, share, ci = target, calls[target], done.get(target, 0)
            done[target] = ci + 1
            # the layer table names a module's k-th call "name#k"; a module called several times
            # has its merged element ops shared evenly between the calls
            named = [g for g in table.gemm if g.name.split("#")[0] == target or g.name.startswith(target + ".")]
            gemm = named[ci : ci + 1] if len(named) == share else named if ci == 0 else []
            ops = [_split(e, share) for e in table.ops if e.name.startswith((target + "/", target + "."))]
            mod = modules.get(target)
            kind = "conv" if named else next((k for t, k in _MODULE_KIND if isinstance(mod, t)), "activation")
        else:
            kind = _FUNC_KIND.get(fname, "elementwise")
            name = f"{n.meta.get('scope') or ''}/{fname}".lstrip("/")
            gemm, ops = [], [ElementOp(f"{name}", kind, elements, b)]
        name = _unique(name, used)
        rep[n] = name
        nodes.append(Node(name, kind, tuple(ins), elements * b / 8.0))
        rows.append((gemm, ops))
    post = [e for e in table.ops if e.op in HOST_ONLY]
    out_node = next(n for n in graph.nodes if n.op == "output")
    heads = list(dict.fromkeys(rep[a] for a in out_node.all_input_nodes if a in rep))
    decode = [e for e in post if e.op == "decode"]
    nms = [e for e in post if e.op == "nms"]
    if decode or nms:
        boxes = sum(e.elements for e in nms) or sum(e.elements for e in decode) // 4
        nodes.append(Node("decode", "decode", tuple(heads), boxes * 5 * 4.0))  # boxes + scores, fp32
        rows.append(([], decode))
        if nms:
            nodes.append(Node("nms", "nms", ("decode",), 100 * 6 * 4.0))  # max_det boxes, scores, labels
            rows.append(([], nms))
    return nodes, rows


def _numel(meta) -> int:
    shape = getattr(meta, "shape", None)  # TensorMetadata is itself a tuple: look for a shape first
    if shape is not None:
        return int(math.prod(shape))
    return sum(_numel(m) for m in meta) if isinstance(meta, (tuple, list)) else 0


def _split(op: ElementOp, calls: int) -> ElementOp:
    """One call's share of an op the layer table merged over a module's ``calls`` calls."""
    return op if calls <= 1 else ElementOp(op.name, op.op, op.elements // calls, op.bits, max(op.calls // calls, 1))


def _unique(name: str, used: set[str]) -> str:
    out, k = name, 1
    while out in used:
        k += 1
        out = f"{name}#{k}"
    used.add(out)
    return out


def _cost(rows: tuple[list[GemmLayer], list[ElementOp]], spec: HardwareSpec) -> float:
    """Modelled seconds of one node's rows on ``spec`` (inf: the device cannot run them)."""
    gemm, ops = rows
    if isinstance(spec, SystolicSpec):
        widest = max(spec.bits)
        if any(e.op in HOST_ONLY or e.bits > widest for e in ops if e.op != "norm") or any(
            max(g.weight_bits, g.act_bits) > widest for g in gemm
        ):
            return math.inf
        from slimdet.hw.systolic import simulate

        gemm_s = float(simulate(gemm, spec).layer_latency_s.sum()) if gemm else 0.0
        # inference batch norm is folded into the conv before it; other ops: one element per column per cycle
        cycles = sum(math.ceil(e.elements / spec.cols) for e in ops if e.op != "norm")
        return gemm_s + cycles / spec.clock_hz
    from slimdet.hw.roofline import estimate

    if not gemm and not ops:
        return 0.0
    return estimate(LayerTable(gemm=tuple(gemm), ops=tuple(ops)), spec).total_latency_s


def _epilogue_groups(graph: OpGraph) -> dict[str, str]:
    """Element-wise nodes whose inputs all come from one fused node join it (conv + BN + act)."""
    group: dict[str, str] = {}
    for node in graph.nodes:
        heads = {group.get(p, p) for p in node.inputs}
        if node.op in _EPILOGUE and len(heads) == 1:
            head = heads.pop()
            if graph.nodes[graph.index[head]].op not in ("input", "decode", "nms"):
                group[node.name] = head
                group.setdefault(head, head)
    return group


def _depth_groups(graph: OpGraph, depth: int) -> dict[str, str]:
    """Each call of a module ``depth`` levels deep becomes one node (calls are runs of consecutive nodes)."""
    group: dict[str, str] = {}
    seen: dict[str, int] = {}
    prev = None
    for node in graph.nodes:
        scope = node.name.split("/")[0].split("#")[0].split(".")
        if len(scope) < depth or node.op in ("input", "decode", "nms"):
            prev = None
            continue
        key = ".".join(scope[:depth])
        if key != prev:
            seen[key] = seen.get(key, 0) + 1
            prev = key
        group[node.name] = key if seen[key] == 1 else f"{key}#{seen[key]}"
    return group
