"""Pruning to a modelled latency on a device: ``PruneConfig(target=Latency(ms=2.0, device="edge-npu"))``.

The cost of a pruning plan is read from the device's cost model (:mod:`slimdet.hw.cost`: the
systolic-array simulator or a roofline) on the model's layer table with the plan's channel counts,
not from MACs. Two ways to spend a latency budget:

* ``allocation="latency"`` (the default with a latency target): greedy, as in NetAdapt (Yang et al.,
  ECCV 2018) but driven by a cost model instead of measurements: at every step each group offers the
  smallest cut that lowers the modelled latency (pruning 100 -> 97 channels on a 16-wide array saves
  nothing, 100 -> 96 does), and the cut with the most latency saved per unit of importance lost is
  taken, until the target is met;
* ``uniform`` / ``global`` allocations: the usual knob of :mod:`slimdet.compress.prune_plan`, set by
  bisection on the modelled latency.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm

from slimdet.compress.prune_graph import PruneGraph
from slimdet.compress.prune_plan import Planner
from slimdet.errors import ConfigError
from slimdet.hw.cost import channel_granularity, gemm_costs, model_cost
from slimdet.hw.layers import GemmLayer, LayerTable, layer_table
from slimdet.hw.spec import HardwareSpec, load_spec


class Latency(BaseModel):
    """A modelled latency target: ``ms`` milliseconds at batch 1 on ``device`` (a preset name or a spec YAML)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ms: float = Field(gt=0)
    device: str

    @field_validator("device")
    @classmethod
    def _loads(cls, value: str) -> str:
        try:
            _spec(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @property
    def spec(self) -> HardwareSpec:
        return _spec(self.device)


@functools.lru_cache(maxsize=32)
def _spec(device: str) -> HardwareSpec:
    return load_spec(device)


def modelled_latency_ms(model: Any, spec: HardwareSpec, example: torch.Tensor | None = None) -> float:
    """Modelled batch-1 latency of ``model`` on ``spec`` (forward only: the post-processing is the host's)."""
    ex = model.example_inputs(1) if example is None else example[:1]
    return model_cost(layer_table(model, ex, postprocess=False), spec)[0] * 1e3


class PlanCost:
    """Modelled latency of pruning plans of one round, from the layer table before the round.

    Each group's cut is precomputed as prefix sums over its removal order (least important unit
    first): channels lost per touched layer and importance lost, for every number of units removed.
    """

    def __init__(self, planner: Planner, spec: HardwareSpec) -> None:
        graph: PruneGraph = planner.graph
        self.planner, self.spec = planner, spec
        self.table = layer_table(graph.model, graph.example_inputs[:1], postprocess=False)
        self.rows: dict[str, list[int]] = {}
        for i, row in enumerate(self.table.gemm):
            self.rows.setdefault(row.name.split("#")[0], []).append(i)
        base = gemm_costs(self.table, spec)
        self.base_s = base.latency_s
        self.other_s = base.other_latency_s
        # group -> [(layer, direction, prefix sums of channels lost)], and prefix sums of importance lost
        self.cuts: dict[str, list[tuple[str, str, np.ndarray]]] = {}
        self.importance: dict[str, np.ndarray] = {}
        for group in graph.groups:
            order = planner.order[group.name].numpy()
            touches = []
            for layer, direction, unit_idx in group.touches:
                per_unit = np.bincount(unit_idx.numpy(), minlength=group.units)
                touches.append((layer, direction, np.concatenate([[0], np.cumsum(per_unit[order])])))
            self.cuts[group.name] = touches
            scores = planner.scores[group.name].numpy().astype(np.float64)
            self.importance[group.name] = np.concatenate([[0.0], np.cumsum(np.maximum(scores[order], 0.0))])

    @property
    def base_latency_s(self) -> float:
        return float(self.base_s.sum()) + self.other_s

    def lost(self, plan: dict[str, int]) -> dict[tuple[str, str], int]:
        """Channels lost per (layer, "in" | "out") when each group drops its first ``plan[group]`` units."""
        out: dict[tuple[str, str], int] = {}
        for name, k in plan.items():
            for layer, direction, cum in self.cuts.get(name, ()):
                if k:
                    out[(layer, direction)] = out.get((layer, direction), 0) + int(cum[k])
        return out

    def rows_cost_s(self, layers: set[str], lost: dict[tuple[str, str], int]) -> float:
        """Modelled latency of the GEMM rows of ``layers`` after losing ``lost`` channels."""
        idx = [i for layer in layers for i in self.rows.get(layer, ())]
        if not idx:
            return 0.0
        rows = tuple(_shrink(self.table.gemm[i], lost.get((self.table.gemm[i].name.split("#")[0], "out"), 0),
                             lost.get((self.table.gemm[i].name.split("#")[0], "in"), 0)) for i in idx)  # fmt: skip
        return float(gemm_costs(LayerTable(gemm=rows), self.spec).latency_s.sum())

    def latency_s(self, plan: dict[str, int]) -> float:
        """Modelled latency of the model after ``plan`` (group -> units removed)."""
        lost = self.lost(plan)
        layers = {layer for layer, _ in lost}
        idx = [i for layer in layers for i in self.rows.get(layer, ())]
        return self.base_latency_s - float(self.base_s[idx].sum()) + self.rows_cost_s(layers, lost)


def _shrink(row: GemmLayer, out_lost: int, in_lost: int) -> GemmLayer:
    """The GEMM of ``row`` after its layer loses ``out_lost`` output and ``in_lost`` input channels."""
    if not (out_lost or in_lost):
        return row
    if row.op == "dwconv":  # in and out channels are the same channels: one GEMM per channel
        channels = row.groups - max(out_lost, in_lost)
        return replace(row, groups=channels, in_chw=(channels, *row.in_chw[1:]))
    if row.op in ("conv", "gconv"):
        cin, cout = row.in_chw[0] - in_lost, row.out_channels - out_lost
        kh, kw = row.kernel
        return replace(row, k=max(cin // row.groups, 1) * kh * kw, n=max(cout // row.groups, 1),
                       in_chw=(cin, *row.in_chw[1:]))  # fmt: skip
    return replace(row, k=row.k - in_lost, n=row.n - out_lost)


def greedy_plan(planner: Planner, cost: PlanCost, target_s: float, *, progress: bool = True) -> dict[str, int]:
    """Units each group loses so that the modelled latency is at most ``target_s``, cut by cut, each
    cut the one with the most latency saved per unit of importance lost.

    Raises:
        ConfigError: the target is out of reach with every group at its limit (names the best reachable).
    """
    fixed = planner.plan(0.0)  # overrides set their groups' cuts; the rest start uncut
    plan = {g.name: fixed.get(g.name, 0) for g in planner.graph.groups}
    free = [g.name for g in planner.graph.groups if g.name not in (planner.fixed or {})]
    layers_of = {name: {layer for layer, _, _ in cost.cuts[name]} for name in free}
    limit = {name: planner.graph.by_name[name].units - planner._bounds(name)[0] for name in free}
    scan = max(2 * channel_granularity(cost.spec), 2)
    current = cost.latency_s(plan)
    offers: dict[str, tuple[float, int, float] | None] = {}  # group -> (saving per importance, units, new latency)

    def offer(name: str) -> tuple[float, int, float] | None:
        lost = cost.lost(plan)
        before = cost.rows_cost_s(layers_of[name], lost)
        for extra in range(1, min(scan, limit[name] - plan[name]) + 1):
            trial = {**plan, name: plan[name] + extra}
            after = cost.rows_cost_s(layers_of[name], cost.lost({n: trial[n] for n in trial}))
            if after < before * (1 - 1e-9):
                imp = cost.importance[name]
                lost_imp = float(imp[trial[name]] - imp[plan[name]])
                return (before - after) / max(lost_imp, 1e-12), extra, current - (before - after)
        return None

    bar = tqdm(desc="prune to latency", unit="cut", disable=not progress)
    stale = set(free)
    while current > target_s:
        for name in stale:
            offers[name] = offer(name)
        choices = {n: o for n, o in offers.items() if o is not None}
        if not choices:
            bar.close()
            raise ConfigError(
                f"PruneConfig.target: {target_s * 1e3:.4g} ms is out of reach on {cost.spec.name}: with every group "
                f"at its limit (max_pruning_ratio={planner.max_ratio}, protected layers kept) the modelled "
                f"latency is {current * 1e3:.4g} ms (from {cost.base_latency_s * 1e3:.4g} ms)"
            )
        name = max(choices, key=lambda n: choices[n][0])
        _, extra, _ = choices[name]
        plan[name] += extra
        current = cost.latency_s(plan)
        stale = {n for n in free if layers_of[n] & layers_of[name]}
        bar.update(1)
        bar.set_postfix(ms=f"{current * 1e3:.4g}")
    bar.close()
    return plan


def true_latency_s(planner: Planner, plan: dict[str, int], spec: HardwareSpec) -> float:
    """Modelled latency of the model actually pruned by ``plan`` (on a copy): the layer table is traced
    again, so the ops between the GEMMs (activations, concats on a roofline device) shrink as they do."""
    graph = planner.graph
    model = copy.deepcopy(graph.model)
    PruneGraph(model, graph.example_inputs, protected=graph.protected).apply(planner.removed(plan))
    return modelled_latency_ms(model, spec, graph.example_inputs) / 1e3


def fit_latency(
    planner: Planner,
    cost: PlanCost,
    plan_at: Callable[[float], dict[str, int]],
    target_s: float,
    *,
    tolerance: float = 0.02,
    tries: int = 6,
) -> dict[str, int]:
    """The plan whose latency, measured on the pruned model, is closest to ``target_s``.

    ``plan_at(goal_s)`` plans with the fast per-layer estimate of :class:`PlanCost`, which keeps the
    ops between the GEMMs fixed; the goal is corrected by the ratio of target to true latency until the
    pruned model is within ``tolerance`` of the target (a few re-plans).
    """
    goal_s, best, best_s = target_s, None, float("inf")
    for _ in range(tries):
        plan = plan_at(goal_s)
        true_s = true_latency_s(planner, plan, cost.spec)
        if abs(true_s - target_s) < abs(best_s - target_s):
            best, best_s = plan, true_s
        if abs(true_s - target_s) <= tolerance * target_s:
            break
        goal_s *= target_s / true_s
    return best  # type: ignore[return-value]
