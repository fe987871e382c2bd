"""How many channels each prunable group gives up: one knob, many ways to spend it.

A *plan* maps each group of a :class:`~slimdet.compress.prune_graph.PruneGraph` to the number of
units (channels, or channel groups under GroupNorm) it loses, always its least important ones.
Every allocation is driven by one knob ``x`` in [0, 1] and removes more as ``x`` grows, so a MACs
or parameter target is met by bisection on ``x`` over the exact estimates of the graph:

* ``layer`` scope: every group loses the fraction ``x`` of its channels;
* ``global`` scope: the fraction ``x`` of all prunable channels goes, the least important first
  across groups (Torch-Pruning's per-group mean normalization makes the scores comparable);
* ``sensitivity`` weights: group ``i`` loses ``min(c * x * w_i, max)``, with ``w_i`` small for
  groups whose pruning hurt most in a sensitivity scan (``c`` puts every group at ``max`` at x = 1).

Counts are measured against each group's width *before the first round*, so iterative pruning in
several rounds ends where one round would; no group loses more than ``max_ratio`` of its original
width, and with ``round_to`` every group keeps a multiple of ``round_to`` channels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from slimdet.compress.prune_graph import PruneGraph, channel_step


@dataclass
class Planner:
    """The groups of one round with their scores, and the rules a plan must follow."""

    graph: PruneGraph
    order: dict[str, Tensor]  # unit indices of each group, least important first
    scores: dict[str, Tensor]  # importance of each unit (normalized within the group)
    original_units: dict[str, int]  # group width in units before the first round
    max_ratio: float
    round_to: int | None = None
    fixed: dict[str, float] | None = None  # group -> ratio set by an override (this round's share)
    weights: dict[str, float] | None = None  # group -> sensitivity weight (sensitivity allocation)
    global_scope: bool = False

    def _bounds(self, name: str) -> tuple[int, int, int]:
        """(fewest units the group may keep, units it has, rounding step in units)."""
        group = self.graph.by_name[name]
        original = self.original_units.get(name, group.units)
        least = max(1, math.ceil(original * (1 - self.max_ratio) - 1e-9))
        return least, group.units, channel_step(self.round_to, group.ch_groups)

    def _keep(self, name: str, keep: float) -> int:
        least, units, step = self._bounds(name)
        keep = min(max(keep, least), units)
        if step <= 1 or units < step:
            return int(min(max(round(keep), least), units))
        lo, hi = math.ceil(least / step) * step, (units // step) * step
        return int(min(max(math.floor(keep / step + 0.5) * step, min(lo, hi)), hi))

    def plan(self, x: float) -> dict[str, int]:
        """Units each group loses at knob ``x``."""
        fixed = self.fixed or {}
        keep: dict[str, float] = {}
        for group in self.graph.groups:
            original = self.original_units.get(group.name, group.units)
            if group.name in fixed:
                keep[group.name] = original * (1 - fixed[group.name])
            elif self.weights is not None:
                ratio = min(x * self._span * self.weights.get(group.name, 1.0), self.max_ratio)
                keep[group.name] = original * (1 - ratio)
            elif not self.global_scope:
                keep[group.name] = original * (1 - x)
        if self.global_scope and self.weights is None:
            keep.update(self._global_keep(x, exclude=set(fixed)))
        return {name: self.graph.by_name[name].units - self._keep(name, k) for name, k in keep.items()}

    def _global_keep(self, x: float, *, exclude: set[str]) -> dict[str, float]:
        names = [g.name for g in self.graph.groups if g.name not in exclude]
        if not names:
            return {}
        width = {n: self.graph.by_name[n].ch_groups for n in names}
        original = sum(self.original_units.get(n, self.graph.by_name[n].units) * width[n] for n in names)
        current = sum(self.graph.by_name[n].units * width[n] for n in names)
        to_remove = current - original * (1 - x)  # in channels
        keep = {n: float(self.graph.by_name[n].units) for n in names}
        floor = {n: self._bounds(n)[0] for n in names}
        # every unit of every group, least important first
        score = torch.cat([self.scores[n] for n in names])
        owner = torch.cat([torch.full((self.graph.by_name[n].units,), i) for i, n in enumerate(names)])
        for i in torch.argsort(score, stable=True).tolist():
            if to_remove <= 0:
                break
            n = names[int(owner[i])]
            if keep[n] > floor[n]:
                keep[n] -= 1
                to_remove -= width[n]
        return keep

    @property
    def _span(self) -> float:
        """Scale of the knob under sensitivity weights: at x = 1 even the least-weighted group is at
        ``max_ratio``, so x = 1 is always the most pruning allowed."""
        least = min((w for w in (self.weights or {}).values() if w > 0), default=1.0)
        return self.max_ratio / least

    def removed(self, plan: dict[str, int]) -> dict[str, Tensor]:
        """Unit indices each group loses under ``plan`` (its least important ones)."""
        return {n: self.order[n][:k] for n, k in plan.items() if k > 0}

    def channels_removed(self, plan: dict[str, int]) -> float:
        """Fraction of the original prunable channels gone after ``plan``."""
        original = now = 0
        for g in self.graph.groups:
            original += self.original_units.get(g.name, g.units) * g.ch_groups
            now += (g.units - plan.get(g.name, 0)) * g.ch_groups
        return 1 - now / original if original else 0.0


def search(measure: Callable[[float], float], target: float, *, iterations: int = 30) -> float:
    """Smallest knob in [0, 1] whose ``measure`` (non-increasing in the knob) is <= ``target``."""
    lo, hi = 0.0, 1.0
    if measure(lo) <= target:
        return lo
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if measure(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi
