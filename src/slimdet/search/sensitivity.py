"""Pruning sensitivity: how much each prunable group hurts when it alone is pruned.

``sensitivity_scan`` prunes every group of the dependency graph on its own (on a copy of the
model, its least important channels by the chosen criterion) at a few ratios and measures a fast
proxy on calibration batches: the detector's loss, or the distortion of its raw outputs, and
optionally COCO mAP on a dataset. ``allocate`` turns the scan into per-group pruning ratios that
give sensitive groups less pruning (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017,
sec. 4.1, prune the insensitive layers harder).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from slimdet.compress.importance import Calib, calib_loss, eval_mode, make_importance
from slimdet.compress.prune_graph import PruneGraph
from slimdet.errors import ConfigError
from slimdet.models.base import Detector
from slimdet.search.parallel import TrialRunner


@dataclass(frozen=True)
class SensitivityRow:
    """One group: its width, its share of the model's MACs, and the proxy change per ratio."""

    group: str  # root layer of the group
    channels: int
    macs_share: float  # fraction of the model's MACs in layers whose channels this group changes
    change: dict[float, float]  # ratio -> relative proxy change ((pruned - base) / base)
    map_drop: dict[float, float] | None = None  # ratio -> mAP lost (base - pruned), on request


@dataclass(frozen=True)
class SensitivityResult:
    """A sensitivity table: one row per prunable group, in graph order."""

    proxy: str
    importance: str
    ratios: tuple[float, ...]
    baseline: float  # the proxy of the unpruned model (loss; 0 for distortion)
    rows: tuple[SensitivityRow, ...]
    baseline_map: float | None = None

    def scores(self) -> dict[str, float]:
        """Sensitivity of each group: mean proxy increase over the ratios (decreases count as 0)."""
        return {r.group: sum(max(v, 0.0) for v in r.change.values()) / len(r.change) for r in self.rows}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratios"] = list(self.ratios)
        for row in d["rows"]:
            row["change"] = {str(k): v for k, v in row["change"].items()}
            if row["map_drop"] is not None:
                row["map_drop"] = {str(k): v for k, v in row["map_drop"].items()}
        d["scores"] = self.scores()
        return d

    def table(self) -> str:
        """The table as text, most sensitive first."""
        scores = self.scores()
        head = f"{'group':<44} {'ch':>5} {'MACs%':>6} " + " ".join(f"{f'@{r:g}':>9}" for r in self.ratios)
        lines = [f"{self.proxy} change when one group is pruned ({self.importance} importance)", head]
        for row in sorted(self.rows, key=lambda r: -scores[r.group]):
            cells = " ".join(f"{row.change[r]:>+9.2e}" for r in self.ratios)
            lines.append(f"{row.group[:44]:<44} {row.channels:>5} {100 * row.macs_share:>6.2f} {cells}")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Proxy change per group (x, graph order) and ratio (one line each); writes a PNG/SVG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(self.rows) + 2), 4.0))
        xs = range(len(self.rows))
        for ratio in self.ratios:
            ax.plot(xs, [row.change[ratio] for row in self.rows], marker="o", ms=3, label=f"{ratio:.0%} pruned")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xticks(list(xs), [row.group for row in self.rows], rotation=90, fontsize=6)
        ax.set_ylabel(f"relative {self.proxy} change")
        ax.set_title(f"pruning sensitivity per group ({self.importance} importance)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def sensitivity_scan(
    model: Detector,
    *,
    calib: Calib,
    ratios: Sequence[float] = (0.25, 0.5, 0.75),
    importance: str = "l1",
    proxy: str = "loss",
    map_dataset: Any = None,
    protected: Sequence[str] | None = None,
    example_inputs: Tensor | None = None,
    progress: bool = True,
    runner: TrialRunner | None = None,
) -> SensitivityResult:
    """Prune each prunable group alone at each ratio and measure the proxy change.

    Args:
        model: left unchanged (every trial prunes a deep copy).
        calib: (images, targets) batches the proxy is measured on.
        ratios: fractions of a group's channels removed, each in (0, 1).
        importance: criterion choosing which channels go (see ``slimdet.compress.IMPORTANCE``).
        proxy: "loss" (the detector's loss) or "distortion" (squared error of the raw outputs
            relative to their energy).
        map_dataset: a dataset to also measure COCO mAP on (slow: one evaluation per trial).
        protected: layers never pruned; the model's output layers when None.
        example_inputs: the batch the graph is traced with; ``model.example_inputs(1)`` when None.
        progress: show a progress bar over the trials.
        runner: where the (group, ratio) trials run, e.g. ``TrialRunner("ray")`` for Ray tasks; None runs
            them here with this process's thread count. Any runner with the same ``threads`` gives the
            same table, bit for bit.
    """
    from slimdet.compress.prune import protected_layers

    if proxy not in ("loss", "distortion"):
        raise ConfigError(f"sensitivity proxy must be 'loss' or 'distortion', got {proxy!r}")
    if not calib:
        raise ConfigError("sensitivity_scan needs calibration batches (calib=[(images, targets), ...])")
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise ConfigError(f"sensitivity ratios must be in (0, 1), got {list(ratios)}")
    protected = protected_layers(model) if protected is None else list(protected)
    example = model.example_inputs(1) if example_inputs is None else example_inputs
    graph = PruneGraph(model, example, protected=protected)
    criterion = make_importance(importance)
    if getattr(criterion, "needs_calib", False):
        criterion.prepare(model, calib)
    order = {g.name: torch.argsort(_importance(graph, g, criterion), stable=True) for g in graph.groups}
    model.zero_grad(set_to_none=True)
    reference = _raw_outputs(model, calib) if proxy == "distortion" else None
    baseline = calib_loss(model, calib) if proxy == "loss" else 0.0
    base_map = _map(model, map_dataset) if map_dataset is not None else None

    inputs = _ScanInputs(model, calib, example, protected, proxy, reference, baseline, map_dataset, base_map)
    trials = [_Trial(g.name, ratio, order[g.name][: _units_removed(g.units, ratio)], g.ch_groups)
              for g in graph.groups for ratio in ratios]  # fmt: skip
    runner = runner if runner is not None else TrialRunner(threads=None)
    outcomes = iter(runner.run(_scan_trial, trials, shared=inputs, progress=progress, desc="sensitivity"))
    rows = []
    for group in graph.groups:
        change, drop = {}, {}
        for ratio in ratios:
            change[ratio], drop[ratio] = next(outcomes)
        macs_after, _ = graph.estimate({group.name: torch.arange(group.units)})
        share = 1 - macs_after / graph.macs if graph.macs else 0.0
        rows.append(SensitivityRow(group.name, group.channels, share, change, drop if base_map is not None else None))
    return SensitivityResult(proxy, importance, tuple(ratios), baseline, tuple(rows), base_map)


def sensitivity_weights(scores: dict[str, float], *, floor: float = 1e-3) -> dict[str, float]:
    """Pruning weight of each group, mean 1: ``w_i ~ 1 / sqrt(s_i + eps)``, so a group 4x as
    sensitive is pruned half as hard. ``eps`` (a tenth of the median score, at least ``floor``)
    keeps groups with no measurable effect from taking everything."""
    if not scores:
        return {}
    values = sorted(max(v, 0.0) for v in scores.values())
    eps = max(floor, 0.1 * values[len(values) // 2])
    raw = {k: 1 / math.sqrt(max(v, 0.0) + eps) for k, v in scores.items()}
    mean = sum(raw.values()) / len(raw)
    return {k: v / mean for k, v in raw.items()}


def allocate(scores: dict[str, float], base_ratio: float, *, max_ratio: float = 0.9) -> dict[str, float]:
    """Per-group pruning ratios ``min(base_ratio * w_i, max_ratio)`` from sensitivity scores; the
    pruner searches ``base_ratio`` so that the whole model meets its target."""
    return {k: min(base_ratio * w, max_ratio) for k, w in sensitivity_weights(scores).items()}


@dataclass(frozen=True)
class _ScanInputs:
    """What every trial reads (with Ray, stored once in the object store)."""

    model: Detector
    calib: Calib
    example: Tensor
    protected: list[str]
    proxy: str
    reference: list[list[Tensor]] | None  # raw outputs of the unpruned model (distortion proxy)
    baseline: float
    map_dataset: Any
    base_map: float | None


@dataclass(frozen=True)
class _Trial:
    group: str
    ratio: float
    units: Tensor  # the least important units of the group, removed in this trial
    ch_groups: int


def _scan_trial(inputs: _ScanInputs, trial: _Trial) -> tuple[float, float | None]:
    """(relative proxy change, mAP drop or None) with one group pruned at one ratio."""
    model = _structure_copy(inputs.model)
    graph = PruneGraph(model, inputs.example, protected=inputs.protected)
    if trial.units.numel() > 0:
        graph.prune_units(trial.group, trial.units, ch_groups=trial.ch_groups)
    if inputs.proxy == "loss":
        change = (calib_loss(model, inputs.calib) - inputs.baseline) / max(abs(inputs.baseline), 1e-12)
    else:
        change = _distortion(_raw_outputs(model, inputs.calib), inputs.reference)
    drop = inputs.base_map - _map(model, inputs.map_dataset) if inputs.base_map is not None else None
    return change, drop


def _units_removed(units: int, ratio: float) -> int:
    """At least one unit, never all of them."""
    return min(max(1, round(units * ratio)), units - 1)


def _structure_copy(model: Detector) -> Detector:
    """A copy of the module tree that shares the parameter and buffer tensors: pruning replaces
    tensors (index_select into new ones) and never writes into them, so the original stays intact."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _importance(graph: PruneGraph, group: Any, criterion: Any) -> Tensor:
    imp = graph.importance(group, criterion)
    return imp if imp is not None else graph.importance(group, make_importance("l1"))


@torch.no_grad()
def _raw_outputs(model: Detector, calib: Calib) -> list[list[Tensor]]:
    with eval_mode(model):
        outs = [model(images) for images, _ in calib]
    return [list(o) if isinstance(o, (tuple, list)) else [o] for o in outs]


def _distortion(outputs: list[list[Tensor]], reference: list[list[Tensor]] | None) -> float:
    err = energy = 0.0
    for out, ref in zip(outputs, reference or [], strict=True):
        for o, r in zip(out, ref, strict=True):
            err += float((o.float() - r.float()).pow(2).sum())
            energy += float(r.float().pow(2).sum())
    return err / max(energy, 1e-12)


def _map(model: Detector, dataset: Any) -> float:
    from slimdet.evaluate import evaluate

    return evaluate(model, dataset, progress=False).map
