"""Tracing a module for the graph passes: a torch.fx graph with scopes, placeholders and shapes.

The graph passes change a model in two places at once: its modules (a conv takes a folded
BatchNorm's scale, the BatchNorm becomes a :class:`Folded` placeholder) and its traced graph (the
BatchNorm's node is gone). The placeholders keep the model's own ``forward`` correct, so the
model can always be traced again: :func:`trace_module` drops :class:`Folded` nodes and the sums
with a :class:`ZeroBranch` (a branch merged into another one), and gives back the optimized graph.

Every node records the module path it was created in (``node.meta["scope"]``); quantization
labels its tensors with it.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["Folded", "GraphTracer", "ScopeTracer", "ZeroBranch", "annotate_shapes", "count_nodes", "trace_module"]

_FX_CONSTANT = re.compile(r"_tensor_constant\d+")


class Folded(nn.Identity):
    """Stands where a module was folded into another one (a BatchNorm into its conv, an
    activation into a fused conv): returns its first input unchanged."""

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return x


class ZeroBranch(nn.Module):
    """Stands where a parallel branch was merged into another one: contributes zero to the sum."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return x.new_zeros(())


class ScopeTracer(fx.Tracer):
    """Records the module path every node is created in (``node.meta["scope"]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.slim_scope = ""

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        outer, self.slim_scope = self.slim_scope, self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.slim_scope = outer

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["scope"] = self.slim_scope
        return node


def _leaf_types() -> tuple[type, ...]:
    from torchvision.ops.misc import FrozenBatchNorm2d

    from slimdet.compress.graph_fuse import ConvAct2d

    # FrozenBatchNorm2d (torchvision's fixed-statistics BN) stays one node so that fold_bn sees it
    return (Folded, ZeroBranch, ConvAct2d, FrozenBatchNorm2d)


class GraphTracer(ScopeTracer):
    """ScopeTracer that keeps slimdet's placeholder and fused modules (and FrozenBatchNorm2d) as single nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _leaf_types()) or super().is_leaf_module(m, module_qualified_name)


def trace_module(module: nn.Module) -> fx.Graph:
    """The module's own ``forward`` (its class's, never an installed graph) as an FX graph, traced in
    eval mode, with :class:`Folded` and :class:`ZeroBranch` placeholders removed.

    Raises whatever torch.fx raises for a forward it cannot trace (data-dependent control flow).
    """
    for name in [n for n in module._non_persistent_buffers_set if _FX_CONSTANT.fullmatch(n)]:
        del module._buffers[name]  # made by the previous trace (see _register_constants); made again below
        module._non_persistent_buffers_set.discard(name)
    was_training = module.training
    module.eval()
    try:
        graph = GraphTracer().trace(module)
    finally:
        module.train(was_training)
    _drop_placeholders(module, graph)
    _register_constants(module, graph)
    return graph


def _register_constants(root: nn.Module, graph: fx.Graph) -> None:
    """torch.fx keeps a tensor computed while tracing (``buffer.sum()``) as a plain attribute of the
    root; as a non-persistent buffer it follows ``.to()`` and stays out of the state dict."""
    for node in graph.nodes:
        if node.op != "get_attr" or "." in node.target:
            continue
        value = root.__dict__.get(node.target)
        if isinstance(value, Tensor) and not isinstance(value, nn.Parameter):
            del root.__dict__[node.target]
            root.register_buffer(node.target, value, persistent=False)


def _drop_placeholders(root: nn.Module, graph: fx.Graph) -> None:
    modules = dict(root.named_modules())
    for node in list(graph.nodes):
        if node.op == "call_module" and isinstance(modules.get(node.target), Folded) and node.args:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    for node in reversed(list(graph.nodes)):  # a merged branch: every node of it is a ZeroBranch
        if node.op != "call_module" or not isinstance(modules.get(node.target), ZeroBranch):
            continue
        if all(_is_add(u) for u in node.users):
            for add in list(node.users):
                other = add.args[1] if add.args[0] is node else add.args[0]
                add.replace_all_uses_with(other)
                graph.erase_node(add)
            graph.erase_node(node)


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.add, torch.add) and len(node.args) == 2
            and not node.kwargs)  # fmt: skip


def count_nodes(graph: fx.Graph) -> int:
    """Nodes that compute or fetch something (inputs and the output node are not counted)."""
    return sum(1 for n in graph.nodes if n.op not in ("placeholder", "output"))


def annotate_shapes(root: nn.Module, graph: fx.Graph, inputs: Sequence[tuple[Any, ...]]) -> bool:
    """Run the graph on every input tuple and store each node's output shapes, one per run, in
    ``node.meta["slim_shapes"]`` (None for a non-tensor) and whether each was contiguous in
    ``node.meta["slim_contiguous"]``; ``tensor_meta`` is that of the first run.

    Returns False (and annotates nothing) when there are no inputs.
    """
    if not inputs:
        for node in graph.nodes:
            node.meta.pop("slim_shapes", None)
            node.meta.pop("slim_contiguous", None)
        return False
    gm = fx.GraphModule(root, graph)
    runs: list[dict[fx.Node, Any]] = []
    was_training = root.training
    root.eval()
    try:
        with torch.no_grad():
            for args in reversed(list(inputs)):  # the first input last: its tensor_meta stays
                ShapeProp(gm).propagate(*args)
                runs.append({n: _describe(n.meta.get("tensor_meta")) for n in graph.nodes})
    finally:
        root.train(was_training)
    for node in graph.nodes:
        node.meta["slim_shapes"] = [run[node][0] for run in reversed(runs)]
        node.meta["slim_contiguous"] = [run[node][1] for run in reversed(runs)]
    return True


def _describe(meta: Any) -> tuple[tuple[int, ...] | None, bool]:
    shape = getattr(meta, "shape", None)
    if shape is None:
        return None, False
    return tuple(shape), getattr(meta, "memory_format", None) == torch.contiguous_format
