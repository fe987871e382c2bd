"""Graph passes that only rewrite the traced graph: dead code, identities, constants, duplicates.

Each pass is ``fn(ctx) -> list[str]``, registered by name in :data:`GRAPH_PASSES`; it changes
``ctx.graph`` (and, where it folds or removes a module, ``ctx.root``) and returns one line per
change. The passes that rewrite modules (BatchNorm folding, conv + activation fusion, parallel
branch merging) live in :mod:`slimdet.compress.graph_fuse`.

In-place operations (``SiLU(inplace=True)``, ``x.add_(y)``) make two tensors that hold equal
values different things: merging them, or dropping an op that copies, could let one write show
through the other. So ``cse`` never merges a tensor that is written in place (or a view of one),
``dead_code`` keeps every write, and ``identity`` drops only ops that return their input or a view
of it, which share memory with it already.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from slimdet.compress.graph_trace import Folded, annotate_shapes
from slimdet.registry import Registry

__all__ = ["GRAPH_PASSES", "PassContext", "register_pass"]


@dataclass
class PassContext:
    """What a pass works on: the traced module (``root``, the model or one of its submodules) and its graph."""

    root: nn.Module
    graph: fx.Graph
    #: the root's path in the model ("" for the model itself), prefixed to names in change lines
    prefix: str = ""
    #: example argument tuples of ``root`` (two batch sizes) for shape checks; empty: no shape checks
    inputs: list[tuple[Any, ...]] = field(default_factory=list)

    def modules(self) -> dict[str, nn.Module]:
        return dict(self.root.named_modules())

    def name(self, target: str) -> str:
        """A module path relative to the model."""
        return f"{self.prefix}.{target}" if self.prefix else target

    def shapes(self) -> bool:
        """Annotate the current graph with output shapes per input (``node.meta["slim_shapes"]``)."""
        return annotate_shapes(self.root, self.graph, self.inputs)


GraphPass = Callable[[PassContext], list[str]]
GRAPH_PASSES: Registry[GraphPass] = Registry("graph pass")


def register_pass(name: str) -> Callable[[GraphPass], GraphPass]:
    """Register ``fn(ctx) -> list[str]`` as graph pass ``name``."""
    return GRAPH_PASSES.register(name)


# ----------------------------------------------------------------------------------------------
# in-place writes and aliases

_ALIAS_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "permute", "transpose", "contiguous",
                  "squeeze", "unsqueeze", "expand", "expand_as", "split", "chunk", "unbind", "narrow", "t",
                  "__getitem__", "detach"}  # fmt: skip
_ALIAS_FUNCS = {operator.getitem, torch.reshape, torch.flatten, torch.permute, torch.transpose, torch.squeeze,
                torch.unsqueeze, torch.split, torch.chunk, torch.unbind, torch.narrow, torch.t, torch.detach,
                F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}  # fmt: skip
_ALIAS_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)
_SIDE_EFFECTS = {operator.setitem, torch._assert}
_RANDOM = ("rand", "normal", "bernoulli", "multinomial", "poisson", "dropout", "alpha_dropout", "feature_")
_INPLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.imatmul, operator.ilshift, operator.irshift}  # fmt: skip


def writes_in_place(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` writes into its first argument."""
    if node.op == "call_module":
        return bool(getattr(modules.get(node.target), "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        if node.kwargs.get("inplace") is True or node.target in _INPLACE_OPERATORS:
            return True
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.startswith("_")  # torch.relu_, F.relu_, ...
    return False


def aliases(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node``'s result may share memory with its first argument (a view, or the input itself)."""
    if writes_in_place(node, modules):
        return True
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _ALIAS_MODULES)
    if node.op == "call_method":
        return node.target in _ALIAS_METHODS
    return node.op == "call_function" and node.target in _ALIAS_FUNCS


def written(graph: fx.Graph, modules: dict[str, nn.Module]) -> set[fx.Node]:
    """Nodes whose tensor is written in place, directly or through a view or alias of it."""
    out: set[fx.Node] = set()
    for node in graph.nodes:
        if writes_in_place(node, modules) and node.args and isinstance(node.args[0], fx.Node):
            stack = [node.args[0]]
            while stack:  # the write reaches every tensor this one is an alias of, and their aliases
                n = stack.pop()
                if n in out:
                    continue
                out.add(n)
                if aliases(n, modules) and n.args and isinstance(n.args[0], fx.Node):
                    stack.append(n.args[0])
                stack.extend(u for u in n.users if aliases(u, modules) and u.args and u.args[0] is n)
    return out


def _effects(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Inputs, the output, writes and side effects: what a graph must keep even when nothing reads it."""
    if node.op in ("placeholder", "output") or writes_in_place(node, modules):
        return True
    return node.op == "call_function" and node.target in _SIDE_EFFECTS


def _impure(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Effects and random numbers: never merged or computed ahead."""
    if _effects(node, modules):
        return True
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.modules.dropout._DropoutNd)
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return node.op in ("call_function", "call_method") and name.startswith(_RANDOM)


# ----------------------------------------------------------------------------------------------
# dead_code


@register_pass("dead_code")
def dead_code(ctx: PassContext) -> list[str]:
    """Remove nodes whose results never reach an output; a module left with no call is replaced by
    a :class:`Folded` placeholder (its parameters leave the model)."""
    modules = ctx.modules()
    calls: dict[str, int] = {}
    for node in ctx.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    live: set[fx.Node] = set()
    stack = [n for n in ctx.graph.nodes if _effects(n, modules)]
    while stack:
        n = stack.pop()
        if n not in live:
            live.add(n)
            stack.extend(n.all_input_nodes)
    removed: list[str] = []
    dead_calls: dict[str, int] = {}
    for node in reversed(list(ctx.graph.nodes)):
        if node in live:
            continue
        if node.op == "call_module":
            dead_calls[node.target] = dead_calls.get(node.target, 0) + 1
        removed.append(node.name)
        ctx.graph.erase_node(node)
    changes = [f"removed {len(removed)} dead nodes: {', '.join(reversed(removed))}"] if removed else []
    for target, n in dead_calls.items():
        module = modules[target]
        if n == calls[target] and not isinstance(module, Folded) and _has_state(module):
            ctx.root.set_submodule(target, Folded())
            changes.append(f"{ctx.name(target)}: never reaches an output, removed")
    return changes


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


# ----------------------------------------------------------------------------------------------
# identity


_DROPOUT_FUNCS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                  torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout}  # fmt: skip
_SHAPE_OPS = {"view", "reshape", "flatten", "expand", "view_as", "reshape_as", "expand_as"}
_SHAPE_FUNCS = {torch.reshape, torch.flatten, torch.permute, torch.transpose}


@register_pass("identity")
def identity(ctx: PassContext) -> list[str]:
    """Remove nodes that return their input: nn.Identity, dropout (the graph is for inference), and
    reshapes, views, flattens, expands, permutes, transposes and ``contiguous`` that change nothing.

    A shape op counts as a no-op only when its output shape equals its input shape at every
    example batch size (so it does not depend on the batch); without example inputs only the ops
    that are no-ops by their arguments (identity permutations) are removed.
    """
    has_shapes = ctx.shapes()
    modules = ctx.modules()
    changes = []
    for node in list(ctx.graph.nodes):
        why = _no_op(node, modules, has_shapes)
        if why is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        node.replace_all_uses_with(node.args[0])
        ctx.graph.erase_node(node)
        what = f"call of {ctx.name(node.target)}" if node.op == "call_module" else node.name
        changes.append(f"removed {what} ({why})")
    return changes


def _no_op(node: fx.Node, modules: dict[str, nn.Module], has_shapes: bool) -> str | None:
    if node.op == "call_module":
        m = modules.get(node.target)
        if isinstance(m, nn.modules.dropout._DropoutNd):
            return "dropout"
        if type(m) is nn.Identity or isinstance(m, Folded):
            return "identity"
        if isinstance(m, nn.Flatten) and _same_shape(node, has_shapes):
            return "flatten to the same shape"
        return None
    if node.op == "call_function" and node.target in _DROPOUT_FUNCS:
        return "dropout"
    if node.op == "call_method":
        op = node.target
    elif node.op == "call_function" and node.target in _SHAPE_FUNCS:
        op = node.target.__name__
    else:
        return None
    if op == "permute":
        dims = _permute_dims(node)
        if all(isinstance(d, int) for d in dims) and list(dims) == list(range(len(dims))):
            return "identity permutation"
    elif op == "transpose":
        dims = [*node.args[1:3], node.kwargs.get("dim0"), node.kwargs.get("dim1")]
        d0, d1 = [d for d in dims if d is not None][:2]
        rank = _rank(node)
        if isinstance(d0, int) and isinstance(d1, int) and rank and d0 % rank == d1 % rank:
            return "transpose of a dimension with itself"
    elif op == "contiguous":
        src = node.args[0] if node.args else None
        flags = src.meta.get("slim_contiguous") if isinstance(src, fx.Node) and has_shapes else None
        if flags and all(flags):
            return "input already contiguous"
    elif op in _SHAPE_OPS and _same_shape(node, has_shapes):
        return f"{op} to the same shape"
    return None


def _permute_dims(node: fx.Node) -> tuple[Any, ...]:
    if "dims" in node.kwargs:
        return tuple(node.kwargs["dims"])
    rest = node.args[1:]
    return tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else tuple(rest)


def _same_shape(node: fx.Node, has_shapes: bool) -> bool:
    src = node.args[0] if node.args else None
    if not has_shapes or not isinstance(src, fx.Node):
        return False
    ins, outs = src.meta.get("slim_shapes"), node.meta.get("slim_shapes")
    return bool(ins) and ins == outs and all(s is not None for s in ins)


def _rank(node: fx.Node) -> int | None:
    src = node.args[0] if node.args else None
    shapes = src.meta.get("slim_shapes") if isinstance(src, fx.Node) else None
    return len(shapes[0]) if shapes and shapes[0] is not None else None


# ----------------------------------------------------------------------------------------------
# const_fold


@register_pass("const_fold")
def const_fold(ctx: PassContext) -> list[str]:
    """Compute once what depends only on parameters, buffers and literals; the result becomes a
    buffer of the traced module (``_graph_const_<node>``, saved with the state dict).

    Constants are taken at their values now: like BatchNorm folding this is for inference, and a
    parameter trained later does not reach the folded constant.
    """
    modules = ctx.modules()
    const: set[fx.Node] = set()
    for node in ctx.graph.nodes:
        if node.op == "get_attr":
            const.add(node)
        elif (node.op in ("call_function", "call_method", "call_module") and node.all_input_nodes
              and all(a in const for a in node.all_input_nodes) and not _impure(node, modules)):  # fmt: skip
            const.add(node)
    values: dict[fx.Node, Any] = {}
    changes = []
    with torch.no_grad():
        for node in list(ctx.graph.nodes):
            if node not in const:
                continue
            values[node] = _evaluate(node, values, ctx.root, modules)
            frontier = any(u not in const for u in node.users)
            if node.op == "get_attr" or not frontier or not isinstance(values[node], torch.Tensor):
                continue
            name = f"_graph_const_{node.name}"
            ctx.root.register_buffer(name, values[node].detach().clone())
            with ctx.graph.inserting_before(node):
                new = ctx.graph.get_attr(name)
            new.meta.update(node.meta)
            node.replace_all_uses_with(new, delete_user_cb=lambda u: u not in const)
            changes.append(f"{node.name} -> constant {tuple(values[node].shape)}")
    for node in reversed(list(ctx.graph.nodes)):  # what fed only the folded constants
        if node in const and not node.users:
            ctx.graph.erase_node(node)
    return changes


def _evaluate(node: fx.Node, values: dict[fx.Node, Any], root: nn.Module, modules: dict[str, nn.Module]) -> Any:
    args = fx.node.map_arg(node.args, values.__getitem__)
    kwargs = fx.node.map_arg(node.kwargs, values.__getitem__)
    if node.op == "get_attr":
        obj: Any = root
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj
    if node.op == "call_module":
        return modules[node.target](*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# cse


@register_pass("cse")
def cse(ctx: PassContext) -> list[str]:
    """Merge duplicated computations: the same op on the same inputs with the same arguments is
    computed once. Ops with side effects or randomness, and tensors written in place, are left alone."""
    modules = ctx.modules()
    dirty = written(ctx.graph, modules)
    seen: dict[Any, fx.Node] = {}
    changes = []
    for node in list(ctx.graph.nodes):
        if _impure(node, modules) or node in dirty:
            continue
        try:
            key = (node.op, node.target, _freeze(node.args), _freeze(node.kwargs))
            hash(key)
        except TypeError:
            continue
        first = seen.get(key)
        if first is None:
            seen[key] = node
            continue
        node.replace_all_uses_with(first)
        ctx.graph.erase_node(node)
        changes.append(f"{node.name} = {first.name}")
    return changes


def _freeze(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return ("node", value)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, *(_freeze(v) for v in value))
    if isinstance(value, dict):
        return ("dict", *sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice", _freeze(value.start), _freeze(value.stop), _freeze(value.step))
    if isinstance(value, float) and value != value:  # NaN equals nothing
        raise TypeError("nan")
    if isinstance(value, torch.Tensor):
        raise TypeError("tensor literal")
    return (type(value).__name__, value)
