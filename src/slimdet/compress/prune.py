"""Structured pruning of detectors: ``prune(model, PruneConfig(...), example_inputs) -> PruneResult``.

Torch-Pruning's dependency graph does the surgery (which layers are coupled, how to cut them);
what is decided here is *what* to cut in a detector and how to prove the result:

* the layers that fix the output format (``model.output_layers()``: class and box predictions)
  and every group coupled to their output channels are never pruned, on every registered model;
* channels are ranked by a criterion from :data:`~slimdet.compress.importance.IMPORTANCE` and
  allocated uniformly, globally or by a sensitivity scan (see :mod:`slimdet.compress.prune_plan`);
* a MACs or parameter target is met by bisection over exact estimates, then measured; a target
  that cannot be met with the protected layers kept fails with the best reachable value;
* the model records what was cut (Torch-Pruning's pruning history, per round) in
  ``model.model_config["transforms"]``, so ``load_model`` rebuilds it from the original
  architecture; no module is pickled.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn
from tqdm.auto import tqdm

from slimdet.compress.importance import IMPORTANCE, Calib, make_importance
from slimdet.compress.prune_graph import ROOT_TYPES, PruneGraph, replay_history, resolve_names
from slimdet.compress.prune_hw import Latency, PlanCost, modelled_latency_ms, plan_to_latency
from slimdet.compress.prune_plan import Planner, search
from slimdet.errors import CheckpointError, ConfigError
from slimdet.models.base import Detector
from slimdet.models.registry import record_transform, refuse_after_final, register_replay
from slimdet.profiling.macs import total_macs
from slimdet.registry import unknown_name_message

if TYPE_CHECKING:
    from slimdet.search.sensitivity import SensitivityResult


class Scope(StrEnum):
    GLOBAL = "global"  # rank channels across all groups
    LAYER = "layer"  # every group loses the same fraction


class Allocation(StrEnum):
    UNIFORM = "uniform"  # the scope decides
    SENSITIVITY = "sensitivity"  # per-group ratios from a sensitivity scan: sensitive groups lose less
    LATENCY = "latency"  # even cut, then channels given back by damage undone per modelled µs (target=Latency)


class PruneConfig(BaseModel):
    """What to prune and how far. Give exactly one target: ``ratio``, ``macs_ratio``, ``params_ratio``
    or ``target=Latency(ms, device=...)`` (a modelled latency on a device; allocation "latency" by default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: channel-importance criterion: l1, l2, bn_scale, taylor, hessian, random
    importance: str = "l2"
    scope: Scope = Scope.GLOBAL
    #: fraction of the prunable channels to REMOVE
    ratio: float | None = Field(None, gt=0, lt=1)
    #: fraction of the model's MACs to KEEP (0.5: the pruned model does half the MACs)
    macs_ratio: float | None = Field(None, gt=0, lt=1)
    #: fraction of the model's parameters to KEEP
    params_ratio: float | None = Field(None, gt=0, lt=1)
    #: modelled batch-1 latency on a device (preset or spec file), e.g. {ms: 2.0, device: edge-npu}
    target: Latency | None = None
    #: pruned groups keep a multiple of this many channels (SIMD lanes, accelerator array width)
    round_to: int | None = Field(None, ge=1)
    #: how the target is spread over groups; "sensitivity" runs a scan on the calibration batches
    allocation: Allocation = Allocation.UNIFORM
    #: prune in this many rounds (with fine-tuning between them when a callback is given)
    iterative_steps: int = Field(1, ge=1)
    #: layer name or regex -> fraction of that group's channels to remove (overrides the target)
    overrides: dict[str, float] = Field(default_factory=dict)
    #: layer names or regexes never pruned, on top of the detector's output layers
    ignore: list[str] = Field(default_factory=list)
    #: calibration batches used by taylor, hessian and the sensitivity scan
    calib_batches: int = Field(4, ge=1)
    #: no group loses more than this fraction of its channels
    max_pruning_ratio: float = Field(0.9, gt=0, lt=1)
    #: sensitivity scan: pruning ratios tried per group and the proxy measured
    sensitivity_ratios: tuple[float, ...] = Field((0.25, 0.5, 0.75), min_length=1)
    sensitivity_proxy: Literal["loss", "distortion"] = "loss"
    seed: int = 0  # for the random criterion

    @field_validator("importance")
    @classmethod
    def _known_importance(cls, value: str) -> str:
        if value not in IMPORTANCE:
            raise ValueError(unknown_name_message("importance criterion", value, IMPORTANCE.names()))
        return value

    @field_validator("overrides")
    @classmethod
    def _override_ratios(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not 0 <= v < 1}
        if bad:
            raise ValueError(f"override ratios must be in [0, 1), got {bad}")
        return value

    @field_validator("sensitivity_ratios")
    @classmethod
    def _fractions(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < r < 1 for r in value):
            raise ValueError(f"sensitivity ratios must be in (0, 1), got {list(value)}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _latency_allocation(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("target") is not None and "allocation" not in data:
            return {**data, "allocation": Allocation.LATENCY}
        return data

    @model_validator(mode="after")
    def _one_target(self) -> PruneConfig:
        given = [k for k in ("ratio", "macs_ratio", "params_ratio", "target") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one target of ratio, macs_ratio, params_ratio, target (latency); got {given or 'none'}"
            )
        if self.ratio is not None and self.ratio > self.max_pruning_ratio:
            raise ValueError(f"ratio={self.ratio} exceeds max_pruning_ratio={self.max_pruning_ratio}")
        if self.allocation == Allocation.LATENCY and self.target is None:
            raise ValueError("allocation 'latency' needs target: {ms: ..., device: ...}")
        return self

    @property
    def goal(self) -> tuple[str, float]:
        """The target as (quantity, value): ratio, macs_ratio, params_ratio or latency_ms."""
        if self.target is not None:
            return "latency_ms", float(self.target.ms)
        for key in ("ratio", "macs_ratio", "params_ratio"):
            if getattr(self, key) is not None:
                return key, float(getattr(self, key))
        raise AssertionError("unreachable: validated")


@dataclass(frozen=True)
class PruneResult:
    """What pruning changed. MACs at batch 1 (``slimdet.profiling.macs``)."""

    importance: str
    target: dict[str, float]  # the requested target, e.g. {"macs_ratio": 0.5} or {"latency_ms": 2.0}
    achieved: float  # the same quantity measured on the pruned model
    #: conv/linear layer -> output channels (before, after), for the layers that changed
    channels: dict[str, tuple[int, int]]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    channels_removed: float  # fraction of the prunable channels removed
    protected: tuple[str, ...]  # layers kept intact (output layers and ignored layers)
    num_groups: int  # prunable groups found in the first round
    rounds: int
    time_s: float
    #: the transform entries appended to model.model_config["transforms"], one per round
    records: tuple[dict[str, Any], ...]
    sensitivity: SensitivityResult | None = None  # the scan behind allocation="sensitivity"
    #: latency target: the device and the modelled latency before and after, in ms
    hardware: dict[str, Any] | None = None

    @property
    def macs_kept(self) -> float:
        return self.macs_after / self.macs_before

    @property
    def params_kept(self) -> float:
        return self.params_after / self.params_before

    def to_dict(self) -> dict[str, Any]:
        d = asdict(replace(self, sensitivity=None))
        d["channels"] = {k: list(v) for k, v in self.channels.items()}
        d["protected"] = list(self.protected)
        d["records"] = list(self.records)
        d["sensitivity"] = self.sensitivity.to_dict() if self.sensitivity is not None else None
        d.update(macs_kept=self.macs_kept, params_kept=self.params_kept)
        return d

    def to_text(self) -> str:
        lines = [
            f"pruned with {self.importance} to {self.target} (reached {self.achieved:.3f}): "
            f"MACs {self.macs_before:,} -> {self.macs_after:,} "
            f"({self.macs_kept:.1%}), params {self.params_before:,} -> {self.params_after:,} "
            f"({self.params_kept:.1%}), {self.channels_removed:.1%} of prunable channels removed",
            f"{'layer':<48} {'before':>7} {'after':>7}",
        ]
        lines += [f"{n[:48]:<48} {b:>7} {a:>7}" for n, (b, a) in self.channels.items()]
        return "\n".join(lines)


Finetune = Callable[[Detector, int], None]


def prune(
    model: Detector,
    cfg: PruneConfig,
    example_inputs: Tensor | None = None,
    *,
    calib: Calib | None = None,
    finetune: Finetune | None = None,
    progress: bool = True,
) -> PruneResult:
    """Prune ``model`` in place to the target of ``cfg`` and record how (for ``load_model``).

    Args:
        model: a registered detector (its ``output_layers()`` are protected).
        cfg: criterion, target, allocation and constraints.
        example_inputs: a batch to trace the graph with; ``model.example_inputs(1)`` when None.
            Replaying the record on load always traces with ``model.example_inputs(1)``.
        calib: (images, targets) batches; needed by taylor, hessian and sensitivity allocation
            (the first ``cfg.calib_batches`` are used).
        finetune: called as ``finetune(model, round)`` after every round but the last.
        progress: show a progress bar over rounds (and the sensitivity scan).
    """
    refuse_after_final(model, "prune")
    start = time.perf_counter()
    example = model.example_inputs(1) if example_inputs is None else example_inputs
    calib = list(calib)[: cfg.calib_batches] if calib else None
    criterion = make_importance(cfg.importance, seed=cfg.seed)
    if getattr(criterion, "needs_calib", False) and not calib:
        raise ConfigError(f"importance {cfg.importance!r} needs calibration batches: pass calib=[(images, targets)]")
    protected = protected_layers(model, cfg.ignore)
    before = _widths(model)
    spec = cfg.target.spec if cfg.target is not None else None
    latency_before = modelled_latency_ms(model, spec, example) if spec is not None else None
    macs_before = total_macs(model, example[:1])
    params_before = sum(p.numel() for p in model.parameters())
    scanned = cfg.allocation == Allocation.SENSITIVITY or (cfg.allocation == Allocation.LATENCY and bool(calib))
    scan = _sensitivity(model, cfg, calib, protected, example, progress) if scanned else None
    weights = _weights(scan) if scan is not None and cfg.allocation == Allocation.SENSITIVITY else None

    records: list[dict[str, Any]] = []
    original_units: dict[str, int] = {}
    first_groups = 0
    for k in tqdm(range(1, cfg.iterative_steps + 1), desc="prune", unit="round", disable=not progress):
        graph = PruneGraph(model, example, protected=protected)
        if k == 1:
            original_units = {g.name: g.units for g in graph.groups}
            first_groups = len(graph.groups)
            if not graph.groups:
                raise ConfigError(f"nothing to prune in {type(model).__name__}: every layer is protected or ignored")
        planner = _planner(graph, cfg, criterion, calib, original_units, weights, share=k / cfg.iterative_steps)
        cost = PlanCost(planner, spec, scan if cfg.allocation == Allocation.LATENCY else None) if spec else None
        if k == 1:
            _check_reachable(planner, cfg, macs_before, params_before, cost)
        plan = _plan_for_target(planner, cfg, macs_before, params_before, share=k / cfg.iterative_steps, cost=cost,
                                latency0_ms=latency_before, progress=progress)  # fmt: skip
        history = graph.apply(planner.removed(plan))
        model.zero_grad(set_to_none=True)
        if history:  # one record per round: a checkpoint saved while fine-tuning between rounds loads
            records.append({"kind": "prune", "importance": cfg.importance, "rounds": [history]})
            record_transform(model, records[-1])
        if finetune is not None and k < cfg.iterative_steps:
            finetune(model, k)
    if not records:
        raise ConfigError(f"PruneConfig {dict([cfg.goal])}: removes no channel of {type(model).__name__} "
                          f"(finer than the channel granularity, round_to={cfg.round_to})")  # fmt: skip

    after = _widths(model)
    prunable = sum(before[n] for n in original_units)
    removed = sum(before[n] - after[n] for n in original_units) / prunable if prunable else 0.0
    params_after, macs_after = sum(p.numel() for p in model.parameters()), total_macs(model, example[:1])
    key, value = cfg.goal
    achieved = {"ratio": removed, "macs_ratio": macs_after / macs_before, "params_ratio": params_after / params_before}
    hardware = None
    if spec is not None:
        achieved["latency_ms"] = modelled_latency_ms(model, spec, example)
        hardware = {"device": spec.name, "latency_ms_before": latency_before, "latency_ms_after": achieved[key]}
        if abs(achieved[key] - value) > 0.05 * value:
            warnings.warn(f"latency target {value} ms on {spec.name} missed: modelled {achieved[key]:.4g} ms "
                          "(the cuts are whole channel groups)", stacklevel=2)  # fmt: skip
    elif abs(achieved[key] - value) > 0.02:
        reason = f"channel rounding (round_to={cfg.round_to}), the per-group limit or data-dependent layers"
        warnings.warn(f"pruning target {key}={value} missed: reached {achieved[key]:.3f} ({reason})", stacklevel=2)
    return PruneResult(
        importance=cfg.importance,
        target={key: value},
        achieved=achieved[key],
        channels={n: (before[n], after[n]) for n in before if after.get(n) != before[n]},
        params_before=params_before,
        params_after=params_after,
        macs_before=macs_before,
        macs_after=macs_after,
        channels_removed=removed,
        protected=tuple(protected),
        num_groups=first_groups,
        rounds=cfg.iterative_steps,
        time_s=time.perf_counter() - start,
        records=tuple(records),
        sensitivity=scan,
        hardware=hardware,
    )


@register_replay("prune")
def replay_prune(model: Detector, entry: dict[str, Any]) -> Detector:
    """Rebuild a pruned architecture from its record (used by ``load_model``)."""
    try:
        return replay_history(model, entry["rounds"])
    except (ConfigError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise CheckpointError(f"pruning record does not fit model {model.model_config.get('name')!r}: {exc}") from None


def protected_layers(model: Detector, ignore: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The detector's output layers plus the ignored layers (names or regexes) it has."""
    outputs = list(model.output_layers())
    names = dict(model.named_modules())
    missing = [n for n in outputs if n not in names]
    if missing:
        raise ConfigError(f"{type(model).__name__}.output_layers() names layers it does not have: {missing}")
    extra = resolve_names(model, list(ignore), what="ignore") if ignore else []
    return outputs + [n for n in extra if n not in outputs]


def _planner(
    graph: PruneGraph,
    cfg: PruneConfig,
    criterion: Any,
    calib: Calib | None,
    original_units: dict[str, int],
    weights: dict[str, float] | None,
    *,
    share: float,
) -> Planner:
    if getattr(criterion, "needs_calib", False):
        criterion.prepare(graph.model, calib)
    scores, order = {}, {}
    fallback = make_importance("l1")
    for group in graph.groups:
        imp = graph.importance(group, criterion)
        if imp is None:  # the criterion has nothing to score in this group
            imp = graph.importance(group, fallback)
        scores[group.name] = imp
        order[group.name] = torch.argsort(imp, stable=True)
    fixed = _override_ratios(graph, cfg, share)
    return Planner(graph, order, scores, original_units, cfg.max_pruning_ratio, cfg.round_to, fixed=fixed,
                   weights=weights,  # the latency allocation starts from every group cut alike
                   global_scope=cfg.scope == Scope.GLOBAL and cfg.allocation != Allocation.LATENCY)  # fmt: skip


def _override_ratios(graph: PruneGraph, cfg: PruneConfig, share: float) -> dict[str, float]:
    fixed: dict[str, float] = {}
    for pattern, ratio in cfg.overrides.items():
        layers = set(resolve_names(graph.model, [pattern], what="overrides"))
        hits = [g.name for g in graph.groups if layers & {g.name, *g.members}]
        if not hits:
            raise ConfigError(f"overrides: {pattern!r} matches only layers that are protected or tied to them")
        fixed.update({name: ratio * share for name in hits})
    return fixed


def _plan_for_target(
    planner: Planner,
    cfg: PruneConfig,
    macs0: int,
    params0: int,
    *,
    share: float,
    cost: PlanCost | None = None,
    latency0_ms: float | None = None,
    progress: bool = False,
) -> dict[str, int]:
    key, value = cfg.goal
    if key == "latency_ms" and cost is not None and latency0_ms is not None:
        # the rounds share the way down from the original latency (before round 1) to the target
        target_ms = latency0_ms - (latency0_ms - value) * min(1.0, share)
        return plan_to_latency(planner, cost, target_ms / 1e3, greedy=cfg.allocation == Allocation.LATENCY,
                               progress=progress)  # fmt: skip
    if key == "ratio":
        if planner.weights is None:
            return planner.plan(value * share)
        x = search(lambda x: -planner.channels_removed(planner.plan(x)), -value * share)
        return planner.plan(x)
    keep = 1 - (1 - value) * share  # this round's share of the reduction
    index, total = (0, macs0) if key == "macs_ratio" else (1, params0)
    x = search(lambda x: planner.graph.estimate(planner.removed(planner.plan(x)))[index], keep * total)
    return planner.plan(x)


def _check_reachable(planner: Planner, cfg: PruneConfig, macs0: int, params0: int, cost: PlanCost | None) -> None:
    key, value = cfg.goal
    if key == "ratio" or (key == "latency_ms" and cfg.allocation == Allocation.LATENCY):
        return  # the greedy latency plan reports an unreachable target itself
    if key == "latency_ms" and cost is not None:
        best_ms = cost.latency_s(planner.plan(1.0)) * 1e3
        if best_ms > value:
            raise ConfigError(
                f"PruneConfig.target: {value:g} ms is out of reach on {cost.spec.name} with allocation "
                f"{cfg.allocation.value!r}: pruning every group to its limit gives {best_ms:.4g} ms "
                f"(from {cost.base_latency_s * 1e3:.4g} ms)"
            )
        return
    index, total, what = (0, macs0, "MACs") if key == "macs_ratio" else (1, params0, "parameters")
    best = planner.graph.estimate(planner.removed(planner.plan(1.0)))[index]
    if best > value * total:
        raise ConfigError(
            f"PruneConfig.{key}={value}: unreachable for {type(planner.graph.model).__name__}; with its "
            f"{len(planner.graph.protected)} protected layers kept and at most {cfg.max_pruning_ratio:.0%} of each "
            f"group's channels removed, the best reachable is {best:,} {what} ({key}={best / total:.3f} of {total:,})"
        )


def _sensitivity(
    model: Detector, cfg: PruneConfig, calib: Calib | None, protected: list[str], example: Tensor, progress: bool
) -> SensitivityResult:
    from slimdet.search.sensitivity import sensitivity_scan

    if not calib:
        raise ConfigError("allocation 'sensitivity' needs calibration batches: pass calib=[(images, targets)]")
    return sensitivity_scan(model, calib=calib, ratios=cfg.sensitivity_ratios, importance=cfg.importance,
                            proxy=cfg.sensitivity_proxy, protected=protected, example_inputs=example,
                            progress=progress)  # fmt: skip


def _weights(scan: SensitivityResult) -> dict[str, float]:
    from slimdet.search.sensitivity import sensitivity_weights

    return sensitivity_weights(scan.scores())


def _widths(model: nn.Module) -> dict[str, int]:
    return {n: (m.out_channels if hasattr(m, "out_channels") else m.out_features)
            for n, m in model.named_modules() if isinstance(m, ROOT_TYPES)}  # fmt: skip
