"""Pruning to a modelled latency on a device: ``PruneConfig(target=Latency(ms=2.0, device="edge-npu"))``.

The cost of a pruning plan is read from the device's cost model (:mod:`slimdet.hw.cost`: the
systolic-array simulator or a roofline) on the model's layer table with the plan's channel counts,
not from MACs. Two ways to spend a latency budget:

* ``allocation="latency"`` (the default with a latency target): every group is first cut alike a quarter
  deeper than the target needs, then channels are given back, greedily, where they restore the most
  per unit of modelled latency they cost, while the latency stays within the target: first the ones
  that cost nothing (pruning 100 -> 97 channels on a 16-wide array saves nothing, so 97 goes back to
  100), then by the damage they undo per microsecond. The damage of a width is read from a
  sensitivity scan when calibration batches are given (the detection loss measured with that group
  alone pruned at a few ratios, interpolated), else from the channels' importance scores. Starting
  from an even cut keeps the allocation from emptying the layers that are cheap to cut in cycles
  (a pure cutting greedy, as in NetAdapt, Yang et al. ECCV 2018, but without its fine-tuning between
  steps, thinned a few layers to 10% and lost 6 mAP points to uniform pruning);
* ``uniform`` / ``global`` allocations: the usual knob of :mod:`slimdet.compress.prune_plan`, set by
  bisection on the modelled latency.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm

from slimdet.compress.prune_graph import PruneGraph
from slimdet.compress.prune_plan import Planner, search
from slimdet.errors import ConfigError
from slimdet.hw.cost import channel_granularity, gemm_costs, model_cost
from slimdet.hw.layers import GemmLayer, LayerTable, layer_table
from slimdet.hw.spec import HardwareSpec, load_spec

if TYPE_CHECKING:
    from slimdet.search.sensitivity import SensitivityResult

Lost = dict[tuple[str, str], int]  # (layer, "in" | "out") -> channels lost


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

    def __init__(self, planner: Planner, spec: HardwareSpec, scan: SensitivityResult | None = None) -> None:
        graph: PruneGraph = planner.graph
        self.spec = spec
        self.table = layer_table(graph.model, graph.example_inputs[:1], postprocess=False)
        #: the layer of each GEMM row ("name#2" is the second call of layer "name")
        self.layer = [row.name.split("#")[0] for row in self.table.gemm]
        self.rows: dict[str, list[int]] = {}
        for i, layer in enumerate(self.layer):
            self.rows.setdefault(layer, []).append(i)
        base = gemm_costs(self.table, spec)
        self.base_s = base.latency_s
        self.other_s = base.other_latency_s
        # group -> [(layer, direction, prefix sums of channels lost)], and prefix sums of importance lost
        self.cuts: dict[str, list[tuple[str, str, np.ndarray]]] = {}
        self.importance: dict[str, np.ndarray] = {}
        curves = damage_curves(scan, {g.name: g.units for g in graph.groups}) if scan is not None else {}
        for group in graph.groups:
            order = planner.order[group.name].numpy()
            touches = []
            for layer, direction, unit_idx in group.touches:
                per_unit = np.bincount(unit_idx.numpy(), minlength=group.units)
                touches.append((layer, direction, np.concatenate([[0], np.cumsum(per_unit[order])])))
            self.cuts[group.name] = touches
            scores = planner.scores[group.name].numpy().astype(np.float64)
            prefix = np.concatenate([[0.0], np.cumsum(np.maximum(scores[order], 0.0))])
            if curves:  # measured damage; the channel scores only order the cuts within a group
                tie = prefix / max(prefix[-1], 1e-12) * 1e-9
                self.importance[group.name] = curves.get(group.name, curves["__median__"]) + tie
            else:
                self.importance[group.name] = prefix

    @property
    def base_latency_s(self) -> float:
        return float(self.base_s.sum()) + self.other_s

    def lost(self, plan: dict[str, int]) -> Lost:
        """Channels lost per (layer, "in" | "out") when each group drops its first ``plan[group]`` units."""
        out: Lost = {}
        for name, k in plan.items():
            if k:
                self.move(out, name, 0, k)
        return out

    def move(self, lost: Lost, name: str, k_from: int, k_to: int) -> Lost:
        """``lost`` updated in place for group ``name`` going from ``k_from`` to ``k_to`` units removed."""
        for layer, direction, cum in self.cuts.get(name, ()):
            lost[(layer, direction)] = lost.get((layer, direction), 0) + int(cum[k_to] - cum[k_from])
        return lost

    def rows_cost_s(self, layers: set[str], lost: dict[tuple[str, str], int]) -> float:
        """Modelled latency of the GEMM rows of ``layers`` after losing ``lost`` channels."""
        idx = [i for layer in layers for i in self.rows.get(layer, ())]
        if not idx:
            return 0.0
        rows = tuple(_shrink(self.table.gemm[i], lost.get((self.layer[i], "out"), 0),
                             lost.get((self.layer[i], "in"), 0)) for i in idx)  # fmt: skip
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


def greedy_plan(
    planner: Planner,
    cost: PlanCost,
    target_s: float,
    *,
    start: dict[str, int] | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Units each group loses so that the modelled latency is at most ``target_s``.

    From ``start`` (default: nothing cut), cuts are taken while the latency is above the target, each the
    one with the most latency saved per unit of damage; then channels are given back while the latency
    stays within the target, each time where they restore the most per unit of latency they cost
    (first those that cost nothing: the widths the array pads to anyway).

    Raises:
        ConfigError: the target is out of reach with every group at its limit (names the best reachable).
    """
    fixed = planner.plan(0.0)  # overrides set their groups' cuts; the rest start uncut
    plan = {g.name: fixed.get(g.name, 0) for g in planner.graph.groups}
    free = [g.name for g in planner.graph.groups if g.name not in (planner.fixed or {})]
    plan.update({n: start.get(n, 0) for n in free} if start else {})
    layers_of = {name: {layer for layer, _, _ in cost.cuts[name]} for name in free}
    limit = {name: planner.graph.by_name[name].units - planner._bounds(name)[0] for name in free}
    window = max(2 * channel_granularity(cost.spec), 2)
    current = cost.latency_s(plan)

    def steps(name: str, extras: range) -> Iterator[tuple[int, float, float]]:
        """(extra, latency change, damage change) of moving group ``name`` by each of ``extras`` units
        (negative: give back), the other groups staying where they are."""
        lost = cost.lost(plan)
        before = cost.rows_cost_s(layers_of[name], lost)
        imp, k = cost.importance[name], plan[name]
        for extra in extras:
            after = cost.rows_cost_s(layers_of[name], cost.move(dict(lost), name, k, k + extra))
            yield extra, after - before, float(imp[k + extra] - imp[k])

    def cut_offer(name: str) -> tuple[float, int] | None:
        for extra, d_lat, d_dmg in steps(name, range(1, min(window, limit[name] - plan[name]) + 1)):
            if d_lat < -1e-15:
                return -d_lat / max(d_dmg, 1e-12), extra
        return None

    def give_offer(name: str) -> tuple[float, int] | None:
        best: tuple[float, int] | None = None
        for back, d_lat, d_dmg in steps(name, range(-1, -min(window, plan[name]) - 1, -1)):
            extra = -back
            if current + d_lat > target_s:
                break
            value = (float("inf"), extra) if d_lat <= 1e-15 else (-d_dmg / d_lat, extra)
            best = value if best is None or value > best else best
        return best

    bar = tqdm(desc="prune to latency", unit="move", disable=not progress)
    for phase, offer in (("cut", cut_offer), ("give back", give_offer)):
        offers: dict[str, tuple[float, int] | None] = {}
        stale = set(free)
        while (current > target_s) if phase == "cut" else True:
            for name in stale:
                offers[name] = offer(name)
            choices = {n: o for n, o in offers.items() if o is not None}
            if not choices:
                if phase == "cut":
                    bar.close()
                    raise ConfigError(
                        f"PruneConfig.target: {target_s * 1e3:.4g} ms is out of reach on {cost.spec.name}: with every "
                        f"group at its limit (max_pruning_ratio={planner.max_ratio}, protected layers kept) the "
                        f"modelled latency is {current * 1e3:.4g} ms (from {cost.base_latency_s * 1e3:.4g} ms)"
                    )
                break
            name = max(choices, key=lambda n: choices[n])
            plan[name] += choices[name][1] if phase == "cut" else -choices[name][1]
            current = cost.latency_s(plan)
            # a move changes the offers of every group that shares a layer with it, and (giving back)
            # the latency left for all of them
            stale = set(free) if phase == "give back" else {n for n in free if layers_of[n] & layers_of[name]}
            bar.update(1)
            bar.set_postfix(phase=phase, ms=f"{current * 1e3:.4g}")
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


def damage_curves(scan: SensitivityResult, units: dict[str, int]) -> dict[str, np.ndarray]:
    """Per group, the measured damage (relative loss increase) of removing 0..units of its units:
    the scan's points joined linearly, made non-decreasing, extended past the last ratio with the
    last slope. ``"__median__"`` is for groups the scan has no row for."""
    curves: dict[str, np.ndarray] = {}
    for row in scan.rows:
        if row.group not in units:
            continue
        ratios = np.array([0.0, *sorted(row.change)])
        values = np.maximum.accumulate(np.maximum([0.0, *(row.change[r] for r in sorted(row.change))], 0.0))
        slope = max((values[-1] - values[-2]) / max(ratios[-1] - ratios[-2], 1e-9), 1e-6)
        x = np.arange(units[row.group] + 1) / units[row.group]
        curve = np.interp(x, ratios, values)
        beyond = x > ratios[-1]
        curve[beyond] = values[-1] + slope * (x[beyond] - ratios[-1])
        curves[row.group] = curve
    if curves:
        finals = np.median([c[-1] for c in curves.values()])
        n = max(units.values())
        curves["__median__"] = np.linspace(0.0, finals, n + 1)
    return curves


def plan_to_latency(
    planner: Planner, cost: PlanCost, target_s: float, *, greedy: bool, progress: bool
) -> dict[str, int]:
    """The plan that meets ``target_s`` on the pruned model: every group cut alike by bisection, or
    (``greedy``) cut alike a quarter deeper than needed and the latency then given back where it buys
    the most (:func:`greedy_plan`; its cut phase takes over when even that start is out of reach)."""

    def uniform_at(goal_s: float) -> dict[str, int]:
        return planner.plan(search(lambda x: cost.latency_s(planner.plan(x)), goal_s))

    def plan_at(goal_s: float) -> dict[str, int]:
        if not greedy:
            return uniform_at(goal_s)
        deeper = goal_s - 0.25 * max(cost.base_latency_s - goal_s, 0.0)
        start = uniform_at(deeper) if cost.latency_s(planner.plan(1.0)) <= deeper else None
        return greedy_plan(planner, cost, goal_s, start=start, progress=progress)

    return fit_latency(planner, cost, plan_at, target_s)
