"""Torch-Pruning's dependency graph, adapted to slimdet's detectors.

:class:`PruneGraph` traces a detector with ``torch_pruning.DependencyGraph`` and lists its prunable
*groups*: sets of layers whose channels must be removed together (a conv, its norm, every consumer
of its output, residual partners, concat slices). Layers named as protected (the detector's output
layers, the user's ignored layers) and every group that would change their input or output channels are
left out. The graph also estimates the MACs and parameters of a candidate plan without applying it,
and applies a plan, keeping Torch-Pruning's pruning history (root layer, out/in, channel indices),
which :func:`replay_history` redoes on a freshly built architecture.

One thing Torch-Pruning does not know about our models is fixed here: ``torch.cat`` of channel
slices (C2f's ``y[:, :h]``, ``y[:, h:]``): Torch-Pruning infers the concat sizes through the slices
and gets them wrong; the real sizes are recorded while tracing. (C2f reads its split point from its
convs, so nothing else needs re-synchronising after a prune.)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from slimdet.errors import ConfigError
from slimdet.models.base import Detector
from slimdet.profiling.macs import LayerProfile, layer_table

ROOT_TYPES = (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)
#: one pruning operation as Torch-Pruning records it: root layer name, out-channel pruning?, indices
HistoryEntry = list[Any]


@dataclass
class Group:
    """A set of coupled channels, pruned together in units of ``channels // ch_groups``."""

    name: str  # the root layer (a conv or linear whose output channels the group removes)
    root: nn.Module
    channels: int  # output channels of the root layer now
    ch_groups: int  # channel grouping (GroupNorm groups): a unit removes one channel per group
    members: list[str]  # layers whose output channels the group removes
    #: per touched layer: (name, "out" | "in", unit index of each touched channel)
    touches: list[tuple[str, str, Tensor]] = field(repr=False, default_factory=list)

    @property
    def units(self) -> int:
        return self.channels // self.ch_groups


class _CatSizes(TorchFunctionMode):
    """Records the channel sizes of every channel-dimension ``torch.cat`` during a trace."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[Any, list[int]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (torch.cat, torch.concat, torch.concatenate) and isinstance(out, Tensor):
            tensors = args[0] if args else kwargs.get("tensors", [])
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            dim = dim % out.ndim if out.ndim else 0
            # Torch-Pruning links a concat to the inputs that carry a grad_fn, in argument order
            if out.grad_fn is not None and dim == 1 and all(t.grad_fn is not None for t in tensors):
                self.sizes[out.grad_fn] = [int(t.shape[1]) for t in tensors]
        return out


def graph_forward(model: nn.Module) -> Callable[[nn.Module, Tensor], Any] | None:
    """The function the graph is traced with; None means ``model(images)``.

    Faster R-CNN's forward samples proposals and runs NMS, and its RPN outputs are detached before
    they reach the result, so the RPN head would be invisible to the trace. It is traced on a path
    that reaches every layer instead: backbone and FPN, RPN head, and the box head on fixed boxes.
    """
    from slimdet.models.torchvision import FasterRCNNAdapter

    if isinstance(model, FasterRCNNAdapter):
        return _faster_rcnn_trace
    return None


def _faster_rcnn_trace(model: nn.Module, images: Tensor) -> tuple[Tensor, ...]:
    net = model.net
    mean = torch.tensor(net.transform.image_mean, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(net.transform.image_std, dtype=images.dtype).view(1, 3, 1, 1)
    features = net.backbone((images - mean) / std)
    objectness, deltas = net.rpn.head(list(features.values()))
    b, _, h, w = images.shape
    boxes = torch.tensor([[0.0, 0.0, w / 2, h / 2], [w / 4, h / 4, w - 1.0, h - 1.0]], dtype=images.dtype)
    pooled = net.roi_heads.box_roi_pool(features, [boxes] * b, [(h, w)] * b)
    scores, box_deltas = net.roi_heads.box_predictor(net.roi_heads.box_head(pooled))
    return (*objectness, *deltas, scores, box_deltas)


def build_dependency_graph(model: nn.Module, example_inputs: Tensor) -> tp.DependencyGraph:
    """Trace ``model`` (in eval mode, restored afterwards) and fix the concat sizes."""
    was_training = model.training
    recorder = _CatSizes()
    try:
        with torch.enable_grad(), recorder:
            dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_inputs, forward_fn=graph_forward(model), verbose=False
            )
    finally:
        model.train(was_training)
    for node in dg.module2node.values():
        sizes = recorder.sizes.get(node.grad_fn) if node.type == tp.ops.OPTYPE.CONCAT else None
        if sizes is not None and len(sizes) == len(node.inputs):
            node.module.concat_sizes = sizes
    tp.dependency.index_mapping.update_index_mapping(dg)
    return dg


def replay_history(model: Detector, rounds: Sequence[Sequence[HistoryEntry]]) -> Detector:
    """Redo recorded pruning rounds on ``model`` (a fresh build of the original architecture)."""
    for history in rounds:
        dg = build_dependency_graph(model, model.example_inputs(1))
        names = dict(model.named_modules())
        for name, is_out, idxs in history:
            if name not in names:
                raise ConfigError(f"pruning record names layer {name!r}, which model {type(model).__name__} lacks")
            module = names[name]
            pruner = dg.get_pruner_of_module(module)
            fn = pruner.prune_out_channels if is_out else pruner.prune_in_channels
            dg.get_pruning_group(module, fn, [int(i) for i in idxs]).prune(record_history=False)
    return model


def resolve_names(model: nn.Module, patterns: Sequence[str], *, what: str) -> list[str]:
    """Module names matching each pattern (an exact name, else a full-match regex); a pattern that
    matches nothing is an error."""
    import re

    names = [n for n, _ in model.named_modules() if n]
    found: list[str] = []
    for pattern in patterns:
        if pattern in names:
            hits = [pattern]
        else:
            try:
                regex = re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"{what}: {pattern!r} is neither a layer name nor a valid regex ({exc})") from None
            hits = [n for n in names if regex.fullmatch(n)]
        if not hits:
            raise ConfigError(f"{what}: {pattern!r} matches no layer of {type(model).__name__}")
        found.extend(h for h in hits if h not in found)
    return found


class PruneGraph:
    """The prunable groups of a detector and the means to estimate and apply a pruning plan."""

    def __init__(self, model: Detector, example_inputs: Tensor, *, protected: Sequence[str] = ()) -> None:
        self.model = model
        self.dg = build_dependency_graph(model, example_inputs)
        self.names = {m: n for n, m in model.named_modules()}
        modules = dict(model.named_modules())
        self.protected = list(protected)
        self._ignored = [m for n in self.protected for m in modules[n].modules()]
        self._check_traced()
        self.example_inputs = example_inputs
        self.params = sum(p.numel() for p in model.parameters())

    @functools.cached_property
    def groups(self) -> list[Group]:
        """The prunable groups, in Torch-Pruning's discovery order."""
        found = self.dg.get_all_groups(ignored_layers=self._ignored, root_module_types=ROOT_TYPES)
        groups = [g for g in map(self._describe, found) if g is not None]
        # a protected layer stays untouched: no group may cut its inputs either
        untouchable = {self.names[m] for m in self._ignored}
        return [g for g in groups if not any(name in untouchable for name, _, _ in g.touches)]

    @functools.cached_property
    def by_name(self) -> dict[str, Group]:
        return {g.name: g for g in self.groups}

    @functools.cached_property
    def table(self) -> list[LayerProfile]:
        """The model's layer table before this round (for MAC estimates)."""
        return layer_table(self.model, self.example_inputs[:1])

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.table)

    def _check_traced(self) -> None:
        missing = [
            n
            for n, m in self.model.named_modules()
            if isinstance(m, ROOT_TYPES) and m not in self.dg.module2node and any(True for _ in m.parameters())
        ]
        if missing:
            raise ConfigError(
                f"cannot prune {type(self.model).__name__}: the dependency trace does not reach "
                f"{len(missing)} layers (first: {missing[0]!r})"
            )

    def _describe(self, full: Any) -> Group | None:
        dg = self.dg
        root = full[0].dep.target.module
        channels = dg.get_out_channels(root)
        ch_groups = 1
        members: list[str] = []
        touches: list[tuple[str, str, Tensor]] = []
        for item in full:
            module, handler = item.dep.target.module, item.dep.handler
            name = self.names.get(module)
            if name is None:  # an operation (add, concat, ...), not a layer
                continue
            pruner = dg.get_pruner_of_module(module)
            direction = "out" if dg.is_out_channel_pruning_fn(handler) else "in"
            if direction == "out":
                members.append(name)
            depthwise = isinstance(module, tp.ops.TORCH_CONV) and module.groups == module.out_channels
            if not depthwise:
                groups_fn = pruner.get_out_channel_groups if direction == "out" else pruner.get_in_channel_groups
                ch_groups = max(ch_groups, groups_fn(module))
            touches.append((name, direction, torch.as_tensor(item.root_idxs, dtype=torch.long)))
        if channels is None or channels % ch_groups:
            return None
        units = channels // ch_groups
        touches = [(n, d, idx % units) for n, d, idx in touches]
        return Group(self.names[root], root, channels, ch_groups, members, touches)

    # -- importance ---------------------------------------------------------------------------

    def importance(self, group: Group, criterion: Callable[[Any], Tensor | None]) -> Tensor | None:
        """Per-unit importance (length ``group.units``), or None when the criterion has no opinion."""
        fn = self.dg.get_pruner_of_module(group.root).prune_out_channels
        full = self.dg.get_pruning_group(group.root, fn, list(range(group.channels)))
        with torch.no_grad():
            imp = criterion(full)
        if imp is None:
            return None
        imp = imp.detach().float().cpu().reshape(group.ch_groups, group.units).mean(dim=0)
        return torch.nan_to_num(imp, nan=0.0)

    # -- estimates ----------------------------------------------------------------------------

    def removed_channels(self, removed: dict[str, Tensor]) -> dict[tuple[str, str], int]:
        """Channels each layer loses (per direction) when each group drops its ``removed`` units."""
        lost: dict[tuple[str, str], int] = {}
        for name, units in removed.items():
            if units.numel() == 0:
                continue
            group = self.by_name[name]
            mask = torch.zeros(group.units, dtype=torch.bool)
            mask[units] = True
            for layer, direction, unit_idx in group.touches:
                key = (layer, direction)
                lost[key] = lost.get(key, 0) + int(mask[unit_idx].sum())
        return lost

    def estimate(self, removed: dict[str, Tensor]) -> tuple[int, int]:
        """(MACs, parameters) of the model after the plan ``removed`` (group name -> unit indices).

        Exact for conv and linear layers (MACs are bilinear in their in and out channels) and for
        norm layers' parameters; MACs at batch 1, as in ``slimdet.profiling.macs``.
        """
        lost = self.removed_channels(removed)
        if not lost:
            return self.macs, self.params
        modules = dict(self.model.named_modules())
        factor: dict[str, float] = {}
        for layer in {k[0] for k in lost}:
            factor[layer] = _keep_factor(modules[layer], lost.get((layer, "out"), 0), lost.get((layer, "in"), 0))
        macs = sum(r.macs * factor.get(r.name.split("#")[0], 1.0) for r in self.table)
        params = self.params
        for layer, f in factor.items():
            module = modules[layer]
            out_lost = lost.get((layer, "out"), 0)
            for pname, p in module.named_parameters(recurse=False):
                if pname == "weight" and isinstance(module, ROOT_TYPES):
                    params -= p.numel() - round(p.numel() * f)
                elif p.ndim >= 1 and out_lost:  # biases and norm scales follow the output channels
                    params -= out_lost * (p.numel() // p.shape[0])
        return round(macs), params

    # -- applying -----------------------------------------------------------------------------

    def apply(self, removed: dict[str, Tensor]) -> list[HistoryEntry]:
        """Prune the planned units; returns the pruning history of this round (plain data)."""
        start = len(self.dg.pruning_history())
        for group in self.groups:
            units = removed.get(group.name)
            if units is not None and units.numel() > 0:
                self.prune_units(group.name, units, ch_groups=group.ch_groups)
        history = self.dg.pruning_history()[start:]
        return [[str(n), bool(o), [int(i) for i in idx]] for n, o, idx in history]

    def prune_units(self, name: str, units: Tensor, *, ch_groups: int = 1) -> None:
        """Prune units of the group rooted at layer ``name`` (without listing every group)."""
        root = dict(self.model.named_modules())[name]
        fn = self.dg.get_pruner_of_module(root).prune_out_channels
        width = self.dg.get_out_channels(root) // ch_groups
        idxs = sorted(int(u) + g * width for g in range(ch_groups) for u in units.tolist())
        pruning_group = self.dg.get_pruning_group(root, fn, idxs)
        if not self.dg.check_pruning_group(pruning_group):
            raise RuntimeError(f"pruning group {name!r} would remove every channel of a layer")
        pruning_group.prune()


def _keep_factor(module: nn.Module, out_lost: int, in_lost: int) -> float:
    """Fraction of a layer's weights (and MACs) that stay when it loses channels."""
    if isinstance(module, tp.ops.TORCH_CONV):
        out_ch, in_ch = module.out_channels, module.in_channels
        if module.groups == out_ch and out_ch == in_ch:  # depthwise: in and out channels are the same
            return (out_ch - max(out_lost, in_lost)) / out_ch
        return (out_ch - out_lost) / out_ch * (in_ch - in_lost) / in_ch
    if isinstance(module, tp.ops.TORCH_LINEAR):
        out_f, in_f = module.out_features, module.in_features
        return (out_f - out_lost) / out_f * (in_f - in_lost) / in_f
    return 1.0


def channel_step(round_to: int | None, ch_groups: int) -> int:
    """Units per rounding step so that kept channels are multiples of ``round_to``."""
    if not round_to:
        return 1
    return round_to // math.gcd(round_to, ch_groups)
