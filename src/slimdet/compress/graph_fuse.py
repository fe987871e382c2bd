"""Graph passes that rewrite modules: BatchNorm folding, conv + activation fusion, branch merging.

Every rewrite is made on the modules in place, so that parameter objects (held by optimizers,
pruning records) stay the same, and leaves the model's own ``forward`` correct: a folded module
becomes a :class:`~slimdet.compress.graph_trace.Folded` placeholder (returns its input), a merged
branch a :class:`~slimdet.compress.graph_trace.ZeroBranch` (adds zero). The arithmetic is done in
float64 and rounded once to the weights' dtype.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from slimdet.compress.graph_passes import PassContext, register_pass
from slimdet.compress.graph_trace import Folded, ZeroBranch, _is_add

__all__ = ["ACTIVATIONS", "ConvAct2d", "fold_batchnorm", "unfuse_activations"]

BATCHNORMS = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)
#: activation modules a conv can absorb (parameter-free, elementwise)
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.GELU,
               nn.LeakyReLU, nn.Hardtanh, nn.Mish, nn.ELU)  # fmt: skip
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_FOR = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: (nn.BatchNorm2d, FrozenBatchNorm2d), nn.Conv3d: nn.BatchNorm3d}


class ConvAct2d(nn.Conv2d):
    """A Conv2d that applies its activation in the same call.

    Made by ``fuse_conv_act`` by switching the class of an existing Conv2d (its parameters, hooks
    and state-dict names stay); the activation module is kept as a plain attribute (``act``, not a
    child: it has no state) and the path it came from as ``absorbed`` (where a Folded placeholder
    now stands), so :func:`unfuse_activations` can put it back.
    """

    act: nn.Module
    absorbed: str

    def forward(self, x: Tensor) -> Tensor:
        return self.act(super().forward(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act!r}"


# ----------------------------------------------------------------------------------------------
# BatchNorm folding


def bn_affine(bn: nn.Module) -> tuple[Tensor, Tensor] | None:
    """(scale, shift) of a BatchNorm in inference, ``y = scale * x + shift`` per channel (float64);
    None for a BatchNorm that normalizes with batch statistics (no running statistics)."""
    mean, var = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
    if mean is None or var is None:
        return None
    # Ioffe & Szegedy (2015), Algorithm 2: y = gamma * (x - mean) / sqrt(var + eps) + beta
    scale = 1.0 / torch.sqrt(var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def _weight_name(layer: nn.Module) -> str | None:
    """The parameter that holds the layer's weight: ``weight``, or ``weight_orig`` under a pruning
    mask (``weight = weight_orig * weight_mask``); None for any other reparametrization."""
    if isinstance(layer._parameters.get("weight_orig"), nn.Parameter) and "weight_mask" in layer._buffers:
        return "weight_orig"
    return "weight" if isinstance(layer._parameters.get("weight"), nn.Parameter) else None


@torch.no_grad()
def _scale_layer(layer: nn.Module, scale: Tensor, shift: Tensor) -> None:
    """``layer(x) -> scale * layer(x) + shift`` per output channel (dim 0 of the weight)."""
    w = layer._parameters[_weight_name(layer)]
    w.copy_((w.double() * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
    bias = shift if layer.bias is None else layer.bias.double() * scale + shift
    _set_bias(layer, bias)
    if "weight_mask" in layer._buffers:  # refresh the masked weight the forward uses
        layer.weight = layer.weight_orig * layer.weight_mask


def _set_bias(layer: nn.Module, bias: Tensor) -> None:
    w = layer.weight
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.to(device=w.device, dtype=w.dtype))
    else:
        layer.bias.copy_(bias.to(layer.bias.dtype))


def _foldable(layer: nn.Module, bn: nn.Module, node: fx.Node, two_d_only: bool) -> bool:
    if bn_affine(bn) is None or _weight_name(layer) is None:
        return False
    if type(layer) in _BN_FOR or (isinstance(layer, nn.Conv2d) and not isinstance(layer, ConvAct2d)):
        expected = _BN_FOR.get(type(layer), _BN_FOR[nn.Conv2d])
        return isinstance(bn, expected) and _channels(bn) == layer.out_channels
    if isinstance(layer, nn.Linear):  # BatchNorm1d normalizes dim 1: the features only for a 2-D input
        shapes = node.meta.get("slim_shapes")
        two_d = bool(shapes) and all(s is not None and len(s) == 2 for s in shapes)
        return not two_d_only and two_d and isinstance(bn, nn.BatchNorm1d) and _channels(bn) == layer.out_features
    return False


def _channels(bn: nn.Module) -> int:
    return bn.running_mean.numel()


def _fold_pairs(root: nn.Module, graph: fx.Graph, *, linear: bool) -> list[tuple[str, str]]:
    modules = dict(root.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    folded = []
    for node in list(graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, BATCHNORMS) or calls[node.target] != 1 or not node.args:
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1
                and calls[prev.target] == 1):  # fmt: skip
            continue
        layer = modules[prev.target]
        if not _foldable(layer, bn, prev, two_d_only=not linear):
            continue
        _scale_layer(layer, *bn_affine(bn))
        node.replace_all_uses_with(prev)
        graph.erase_node(node)
        root.set_submodule(node.target, Folded())
        folded.append((prev.target, node.target))
    return folded


def fold_batchnorm(model: nn.Module, graph: fx.Graph) -> list[str]:
    """Fold every BatchNorm whose input is a conv used only by it; returns the folded BatchNorm names.

    The conv takes the BatchNorm's scale and shift (``W' = W * s``, ``b' = s * b + t``), the
    BatchNorm becomes a Folded placeholder (an nn.Identity) and leaves the graph.
    """
    return [bn for _, bn in _fold_pairs(model, graph, linear=False)]


@register_pass("fold_bn")
def fold_bn(ctx: PassContext) -> list[str]:
    """Fold BatchNorm into the preceding conv (or linear, on 2-D inputs) when nothing else reads the conv's output."""
    modules = ctx.modules()
    if any(isinstance(modules.get(n.target), nn.BatchNorm1d) and isinstance(n.args[0], fx.Node)
           and isinstance(modules.get(n.args[0].target), nn.Linear) for n in ctx.graph.nodes
           if n.op == "call_module" and n.args):  # fmt: skip
        ctx.shapes()  # a linear's BatchNorm folds only on 2-D inputs
    return [f"{ctx.name(bn)} -> {ctx.name(layer)}" for layer, bn in _fold_pairs(ctx.root, ctx.graph, linear=True)]


# ----------------------------------------------------------------------------------------------
# conv + activation


@register_pass("fuse_conv_act")
def fuse_conv_act(ctx: PassContext) -> list[str]:
    """Conv2d (+ BatchNorm) + activation -> one :class:`ConvAct2d` call: the BatchNorm is folded, the
    activation runs inside the conv's call, and both leave the graph.

    An activation module called from several places (ResNet's one ``relu`` per block) stays where
    it is; it is fused only when applying it twice changes nothing (ReLU, ReLU6, Hardtanh), so the
    model's own forward, which still calls it after the conv, stays correct.
    """
    modules = ctx.modules()
    calls = Counter(n.target for n in ctx.graph.nodes if n.op == "call_module")
    changes = []
    for node in list(ctx.graph.nodes):
        act = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(act, ACTIVATIONS) or not node.args:
            continue
        shared = calls[node.target] != 1
        if shared and not _idempotent(act):
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1):
            continue
        conv = modules.get(prev.target)
        if isinstance(conv, ConvAct2d) and shared and _same_act(conv.act, act):  # the model's forward applies it twice
            node.replace_all_uses_with(prev)
            ctx.graph.erase_node(node)
            continue
        bn_node = None
        if isinstance(conv, BATCHNORMS):
            bn_node, prev = prev, prev.args[0]
            if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1):
                continue
            conv = modules.get(prev.target)
        if type(conv) is not nn.Conv2d or calls[prev.target] != 1:
            continue
        done = []
        if bn_node is not None:
            bn = modules[bn_node.target]
            if calls[bn_node.target] != 1 or not _foldable(conv, bn, prev, two_d_only=True):
                continue
            _scale_layer(conv, *bn_affine(bn))
            bn_node.replace_all_uses_with(prev)
            ctx.graph.erase_node(bn_node)
            ctx.root.set_submodule(bn_node.target, Folded())
            done.append(ctx.name(bn_node.target))
        conv.__class__ = ConvAct2d
        object.__setattr__(conv, "act", act)  # not a child: no state, and not seen by hooks on leaf modules
        object.__setattr__(conv, "absorbed", node.target)
        node.replace_all_uses_with(prev)
        ctx.graph.erase_node(node)
        if not shared:
            ctx.root.set_submodule(node.target, Folded())
        done.append(f"{ctx.name(node.target)} ({type(act).__name__}{', shared' if shared else ''})")
        changes.append(f"{' + '.join(done)} -> {ctx.name(prev.target)}")
    return changes


def _idempotent(act: nn.Module) -> bool:
    return type(act) in (nn.ReLU, nn.ReLU6, nn.Hardtanh)


def _same_act(a: nn.Module, b: nn.Module) -> bool:
    if a is b:
        return True
    limits = ("min_val", "max_val")
    return type(a) is type(b) and all(getattr(a, k, None) == getattr(b, k, None) for k in limits)


def unfuse_activations(model: nn.Module, graph: fx.Graph) -> list[str]:
    """Undo conv + activation fusion in ``model`` and ``graph`` (quantization puts a quantizer
    between the conv and its activation); returns the convs split."""
    modules = dict(model.named_modules())
    split = []
    for node in list(graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(conv, ConvAct2d):
            continue
        act, path = conv.__dict__.pop("act"), conv.__dict__.pop("absorbed")
        conv.__class__ = nn.Conv2d
        if isinstance(modules.get(path), Folded):  # else a shared activation that stayed in place
            model.set_submodule(path, act)
        with graph.inserting_after(node):
            new = graph.call_module(path, (node,))
        new.meta["scope"] = path
        node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        split.append(node.target)
    return split


# ----------------------------------------------------------------------------------------------
# parallel branches (RepVGG)


@register_pass("rep_branches")
def rep_branches(ctx: PassContext) -> list[str]:
    """Merge parallel branches on the same input that are summed: kxk conv, 1x1 conv (each with an
    optional BatchNorm) and an identity BatchNorm become one kxk conv (Ding et al., RepVGG, CVPR 2021).

    The sum of convolutions of the same input is the convolution with the sum of the kernels, each
    zero-padded to the largest size (all centred: padding k // 2, stride and groups equal); the
    identity is the kernel with a 1 at the centre of channel ``o``'s own input channel. A bare
    ``x`` term (a residual without BatchNorm) is not merged: the model's own forward still adds it.
    """
    modules = ctx.modules()
    calls = Counter(n.target for n in ctx.graph.nodes if n.op == "call_module")
    changes: list[str] = []
    for node in list(ctx.graph.nodes):
        root: fx.Node | None = node
        while root is not None and not root._erased and _is_add(root) and not _inner_add(root):
            root = _merge_one(ctx, root, modules, calls, changes)
    return changes


def _merge_one(ctx: PassContext, root: fx.Node, modules: dict[str, nn.Module], calls: Counter,
               changes: list[str]) -> fx.Node | None:  # fmt: skip
    """Merge one group of branches of the sum at ``root``; returns the node now holding the sum, or None."""
    internal, terms = _add_tree(root)
    groups: dict[fx.Node, list[_Branch]] = {}
    for term in terms:
        branch = _branch(term, modules, calls)
        if branch is not None:
            groups.setdefault(branch.x, []).append(branch)
    for branches in groups.values():
        if len(branches) < 2 or not any(b.conv for b in branches) or not _compatible(branches, modules):
            continue
        main = _merge(branches, modules)
        for b in branches:
            for target in b.targets():
                if target != main.conv:
                    ctx.root.set_submodule(target, Folded() if b is main else ZeroBranch())
        names = ", ".join(ctx.name(t) for b in branches for t in b.targets())
        changes.append(f"{names} -> {ctx.name(main.conv)} {tuple(modules[main.conv].kernel_size)}")
        return _rewrite(ctx.graph, root, internal, terms, branches, main)
    return None


class _Branch:
    """One summed term: ``bn(conv(x))``, ``conv(x)`` or ``bn(x)`` (identity)."""

    def __init__(self, term: fx.Node, x: fx.Node, conv: str | None, bn: str | None, conv_node: fx.Node | None):
        self.term, self.x, self.conv, self.bn, self.conv_node = term, x, conv, bn, conv_node

    def targets(self) -> list[str]:
        return [t for t in (self.conv, self.bn) if t is not None]


def _inner_add(node: fx.Node) -> bool:
    return len(node.users) == 1 and _is_add(next(iter(node.users)))


def _add_tree(root: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    internal, terms, stack = [], [], [root]
    while stack:
        node = stack.pop()
        internal.append(node)
        for arg in node.args:
            if isinstance(arg, fx.Node) and _is_add(arg) and len(arg.users) == 1:
                stack.append(arg)
            else:
                terms.append(arg)
    return internal, terms


def _branch(term: object, modules: dict[str, nn.Module], calls: Counter) -> _Branch | None:
    if not (isinstance(term, fx.Node) and term.op == "call_module" and len(term.users) == 1
            and calls[term.target] == 1 and term.args and isinstance(term.args[0], fx.Node)):  # fmt: skip
        return None
    m = modules[term.target]
    if type(m) is nn.Conv2d:
        return _Branch(term, term.args[0], term.target, None, term)
    if type(m) is not nn.BatchNorm2d or bn_affine(m) is None:
        return None
    inner = term.args[0]
    if (inner.op == "call_module" and type(modules.get(inner.target)) is nn.Conv2d and len(inner.users) == 1
            and calls[inner.target] == 1 and inner.args and isinstance(inner.args[0], fx.Node)):  # fmt: skip
        return _Branch(term, inner.args[0], inner.target, term.target, inner)
    return _Branch(term, inner, None, term.target, None)


def _compatible(branches: list[_Branch], modules: dict[str, nn.Module]) -> bool:
    convs = [modules[b.conv] for b in branches if b.conv]
    first = convs[0]
    largest = (max(c.kernel_size[0] for c in convs), max(c.kernel_size[1] for c in convs))
    if largest not in [tuple(c.kernel_size) for c in convs]:  # the merged kernel must be one of them
        return False
    for c in convs:
        if _weight_name(c) != "weight" or c.padding_mode != "zeros" or c.dilation != (1, 1):
            return False
        if (c.in_channels, c.out_channels, c.stride, c.groups) != (first.in_channels, first.out_channels, first.stride,
                                                                    first.groups):  # fmt: skip
            return False
        if any(k % 2 == 0 for k in c.kernel_size) or c.padding != tuple(k // 2 for k in c.kernel_size):
            return False
    for b in branches:
        if b.bn is not None and _channels(modules[b.bn]) != first.out_channels:
            return False
        if b.conv is None and (first.in_channels != first.out_channels or first.stride != (1, 1)):
            return False
    return True


@torch.no_grad()
def _merge(branches: list[_Branch], modules: dict[str, nn.Module]) -> _Branch:
    """Sum the branches into the conv with the largest kernel; returns that branch."""
    main = max((b for b in branches if b.conv), key=lambda b: modules[b.conv].weight[0, 0].numel())
    conv = modules[main.conv]
    kh, kw = conv.kernel_size
    out_ch, in_per_group = conv.weight.shape[:2]
    weight = torch.zeros(out_ch, in_per_group, kh, kw, dtype=torch.float64, device=conv.weight.device)
    bias = torch.zeros(out_ch, dtype=torch.float64, device=conv.weight.device)
    for b in branches:
        if b.conv is not None:
            layer = modules[b.conv]
            w = layer.weight.double()
            bb = layer.bias.double() if layer.bias is not None else torch.zeros_like(bias)
        else:  # identity: a 1x1 kernel picking channel o's own input channel in its group
            w = torch.zeros(out_ch, in_per_group, 1, 1, dtype=torch.float64, device=weight.device)
            w[torch.arange(out_ch), torch.arange(out_ch) % in_per_group] = 1.0
            bb = torch.zeros_like(bias)
        if b.bn is not None:
            scale, shift = bn_affine(modules[b.bn])
            w = w * scale.reshape(-1, 1, 1, 1).to(w.device)
            bb = bb * scale.to(w.device) + shift.to(w.device)
        ph, pw = (kh - w.shape[2]) // 2, (kw - w.shape[3]) // 2
        weight += F.pad(w, (pw, pw, ph, ph))
        bias += bb
    conv.weight.copy_(weight.to(conv.weight.dtype))
    _set_bias(conv, bias)
    return main


def _rewrite(graph: fx.Graph, root_add: fx.Node, internal: list[fx.Node], terms: Iterable[object],
             branches: list[_Branch], main: _Branch) -> fx.Node:  # fmt: skip
    merged = {b.term for b in branches}
    acc: object = main.conv_node
    with graph.inserting_before(root_add):
        for term in terms:
            if term not in merged:
                acc = graph.call_function(root_add.target, (acc, term))
                acc.meta["scope"] = root_add.meta.get("scope", "")
    root_add.replace_all_uses_with(acc)
    for node in internal:  # root first, then its inner adds: each is unused once its user is gone
        graph.erase_node(node)
    for b in branches:
        for node in (b.term, b.conv_node):
            if node is not None and node is not main.conv_node and not node.users:
                graph.erase_node(node)
    return acc
