"""Mixed-precision bit allocation: the bit-width per layer that loses least within resource budgets.

``allocate_bits`` solves the integer program of HAWQ-v2/v3 (Dong et al., NeurIPS 2020; Yao et al.,
ICML 2021): binary ``x[layer, bits]``, exactly one bit-width per layer, minimise the summed
sensitivity subject to ``sum cost[resource] <= budget[resource]`` for every budget. It is solved
exactly with HiGHS through ``scipy.optimize.milp``; ``brute_force_bits`` enumerates every choice
for checks on small cases. ``hutchinson_trace`` gives the HAWQ-v2 sensitivity: the Hessian trace of
the loss with respect to each layer's weights.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp

from slimdet.errors import ConfigError
from slimdet.io import atomic_write
from slimdet.registry import closest

Sensitivity = dict[str, dict[int, float]]  # layer -> bits -> expected loss increase
Costs = dict[str, dict[str, dict[int, float]]]  # resource -> layer -> bits -> cost
MAX_COMBINATIONS = 1_000_000  # brute_force_bits refuses more
_MAX_CUTS = 50  # re-solves after a solution that broke a budget within the solver's tolerance


@dataclass(frozen=True)
class BitAllocation:
    """The bit-width chosen per layer, its summed sensitivity and the resources it uses."""

    bits: dict[str, int]
    objective: float  # sum of the chosen sensitivities
    usage: dict[str, float]  # resource -> summed cost of the choice (every cost table, budgeted or not)
    budgets: dict[str, float]
    status: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Problem:
    layers: list[str]
    options: list[list[int]]  # allowed bit-widths per layer, ascending
    sens: list[np.ndarray]  # per layer, aligned with options
    cost: dict[str, list[np.ndarray]]  # resource -> per layer, aligned with options
    budgets: dict[str, float]

    def result(self, choice: list[int], status: str) -> BitAllocation:
        """The allocation that picks option ``choice[k]`` for layer k."""
        bits = {layer: self.options[k][c] for k, (layer, c) in enumerate(zip(self.layers, choice, strict=True))}
        objective = math.fsum(float(self.sens[k][c]) for k, c in enumerate(choice))
        usage = {r: math.fsum(float(t[k][c]) for k, c in enumerate(choice)) for r, t in self.cost.items()}
        return BitAllocation(bits=bits, objective=objective, usage=usage, budgets=dict(self.budgets), status=status)

    def over_budget(self, choice: list[int]) -> list[str]:
        usage = self.result(choice, "").usage
        return [r for r, b in self.budgets.items() if usage[r] > b]

    def infeasible(self) -> ConfigError:
        """The error for budgets no choice meets (checked per resource first: names the culprit)."""
        least = {r: math.fsum(float(c.min()) for c in self.cost[r]) for r in self.budgets}
        for r, b in self.budgets.items():
            if least[r] > b:
                return ConfigError(
                    f"bit budget {r}={b:g} cannot be met: the smallest reachable {r} is {least[r]:g} "
                    "(every layer at its cheapest allowed bit-width); raise the budget or allow fewer bits"
                )
        each = ", ".join(f"{r}={b:g} (alone reachable down to {least[r]:g})" for r, b in self.budgets.items())
        return ConfigError(f"bit budgets cannot be met together: {each}")


def _problem(
    sensitivity: Sensitivity, costs: Costs, budgets: dict[str, float], fixed: dict[str, int] | None
) -> _Problem:
    """Check the inputs and align them into arrays; every error names the layer, resource or bits."""
    if not sensitivity:
        raise ConfigError("allocate_bits: no layers in the sensitivity table")
    layers = list(sensitivity)
    fixed = dict(fixed or {})
    for layer, b in fixed.items():
        if layer not in sensitivity:
            hint = closest(layer, layers)
            raise ConfigError(
                f"fixed bits for unknown layer {layer!r}" + (f" (did you mean {hint!r}?)" if hint else "")
            )
        if b not in sensitivity[layer]:
            raise ConfigError(
                f"fixed bits {layer}={b}: no sensitivity for {b} bits (have {sorted(sensitivity[layer])})"
            )
    for resource, budget in budgets.items():
        if resource not in costs:
            hint = closest(resource, list(costs))
            raise ConfigError(
                f"budget {resource!r} has no cost table; cost tables: {', '.join(sorted(costs)) or 'none'}"
                + (f" (did you mean {hint!r}?)" if hint else "")
            )
        if not math.isfinite(float(budget)):
            raise ConfigError(f"budget {resource}={budget} is not a finite number")
    options = []
    for layer in layers:
        opts = [fixed[layer]] if layer in fixed else sorted(sensitivity[layer])
        if not opts:
            raise ConfigError(f"sensitivity table of layer {layer!r} has no bit-widths")
        options.append(opts)
    sens = [
        np.array([_finite(sensitivity[layer][b], f"sensitivity[{layer!r}][{b}]") for b in o])
        for layer, o in zip(layers, options, strict=True)
    ]
    cost: dict[str, list[np.ndarray]] = {}
    for resource, table in costs.items():
        cost[resource] = []
        for layer, opts in zip(layers, options, strict=True):
            if layer not in table:
                raise ConfigError(f"cost table {resource!r} has no entry for layer {layer!r}")
            missing = [b for b in opts if b not in table[layer]]
            if missing:
                raise ConfigError(f"cost table {resource!r}, layer {layer!r}: no cost for bits {missing}")
            cost[resource].append(
                np.array([_finite(table[layer][b], f"costs[{resource!r}][{layer!r}][{b}]") for b in opts])
            )
    return _Problem(layers, options, sens, cost, {r: float(b) for r, b in budgets.items()})


def _finite(value: float, where: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{where} is {value}; expected a finite number")
    return value


def allocate_bits(
    sensitivity: Sensitivity, costs: Costs, budgets: dict[str, float], *, fixed: dict[str, int] | None = None
) -> BitAllocation:
    """The bit-width per layer minimising the summed sensitivity within every budget (exact MILP).

    Args:
        sensitivity: ``[layer][bits]`` expected loss increase with that layer at that bit-width
            (lower is better); its bit-widths are the options a layer may take.
        costs: ``[resource][layer][bits]`` the layer's cost in that resource (e.g. ``weight_bytes``,
            ``bitops``); every table must cover every layer and option.
        budgets: ``[resource]`` upper limit of the summed cost; each needs a cost table.
        fixed: layers pinned to one bit-width.

    Raises:
        ConfigError: a missing cost entry, a budget without a cost table, or budgets no choice meets
            (the message names the resource, its budget and the smallest reachable value).
    """
    prob = _problem(sensitivity, costs, budgets, fixed)
    sizes = [len(o) for o in prob.options]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n = int(offsets[-1])
    # each layer's sensitivity minus its minimum, scaled to <= 1: same optimum, better conditioned
    rel = np.concatenate([s - s.min() for s in prob.sens])
    c = rel / max(float(rel.max()), 1e-300)
    one_per_layer = np.zeros((len(sizes), n))
    for k, (a, b) in enumerate(itertools.pairwise(offsets)):
        one_per_layer[k, a:b] = 1.0
    rows = [LinearConstraint(one_per_layer, 1.0, 1.0)]
    for r, budget in prob.budgets.items():
        coef = np.concatenate(prob.cost[r])
        scale = max(float(np.abs(coef).max()), abs(budget), 1e-300)
        rows.append(LinearConstraint(coef[None, :] / scale, -np.inf, budget / scale))
    cuts: list[np.ndarray] = []
    for _ in range(_MAX_CUTS):
        cut_rows = [LinearConstraint(np.array(cuts), -np.inf, len(sizes) - 1.0)] if cuts else []
        gap = {"mip_rel_gap": 0.0}  # exact optimum, not HiGHS' default 1e-4 relative gap
        res = milp(c, constraints=rows + cut_rows, integrality=np.ones(n), bounds=Bounds(0, 1), options=gap)
        if res.status == 2:
            raise prob.infeasible()
        if res.x is None:
            raise ConfigError(f"bit allocation failed: {res.message}")
        choice = [int(np.argmax(res.x[a:b])) for a, b in itertools.pairwise(offsets)]
        if not prob.over_budget(choice):
            return prob.result(choice, str(res.message))
        # within HiGHS' feasibility tolerance but over a budget: exclude exactly this choice, solve again
        cut = np.zeros(n)
        cut[offsets[:-1] + np.array(choice)] = 1.0
        cuts.append(cut)
    raise ConfigError(f"bit allocation: no choice within the budgets after {_MAX_CUTS} re-solves")


def brute_force_bits(
    sensitivity: Sensitivity, costs: Costs, budgets: dict[str, float], *, fixed: dict[str, int] | None = None
) -> BitAllocation:
    """``allocate_bits`` by trying every combination (at most ``MAX_COMBINATIONS``); for checks."""
    prob = _problem(sensitivity, costs, budgets, fixed)
    combos = math.prod(len(o) for o in prob.options)
    if combos > MAX_COMBINATIONS:
        raise ConfigError(f"brute_force_bits: {combos} combinations exceed {MAX_COMBINATIONS}; use allocate_bits")
    k = len(prob.layers)

    def total(per_layer: list[np.ndarray]) -> np.ndarray:  # summed over layers for every combination
        out = np.zeros([1] * k)
        for axis, v in enumerate(per_layer):
            out = out + v.reshape([-1 if a == axis else 1 for a in range(k)])
        return out.ravel()

    objective = total(prob.sens)
    ok = np.ones(combos, dtype=bool)
    for r, budget in prob.budgets.items():
        ok &= total(prob.cost[r]) <= budget
    if not ok.any():
        raise prob.infeasible()
    best = int(np.flatnonzero(ok)[np.argmin(objective[ok])])
    choice = [int(i) for i in np.unravel_index(best, [len(o) for o in prob.options])]
    return prob.result(choice, f"brute force: {combos} combinations, {int(ok.sum())} within the budgets")


def hutchinson_trace(
    loss_fn: Callable[[], torch.Tensor], params: dict[str, torch.Tensor], *, samples: int = 16, seed: int = 0
) -> dict[str, float]:
    """Hutchinson estimate of the Hessian trace of the loss with respect to each parameter tensor.

    ``tr(H_pp) ~ mean_v v_p^T (H v)_p`` with Rademacher ``v`` (Hutchinson 1990; HAWQ-v2, Dong et al.
    2020). One Hessian-vector product per sample serves every parameter: the cross-block terms
    ``v_p^T H_pq v_q`` have zero mean, so the estimates stay unbiased (at some extra variance).

    Args:
        loss_fn: computes the scalar loss (called once; the graph is kept for all samples).
        params: name -> tensor with ``requires_grad``; e.g. each quantizable layer's weight.
        samples: Rademacher vectors averaged.
        seed: seed of a private generator (the global RNG is left alone).
    """
    if samples < 1:
        raise ConfigError(f"hutchinson_trace: samples must be >= 1, got {samples}")
    if not params:
        raise ConfigError("hutchinson_trace: no parameters given")
    names, tensors = list(params), list(params.values())
    for name, p in params.items():
        if not p.requires_grad:
            raise ConfigError(f"hutchinson_trace: parameter {name!r} does not require grad")
    loss = loss_fn()
    if loss.numel() != 1:
        raise ConfigError(f"hutchinson_trace: loss_fn must return a scalar, got shape {tuple(loss.shape)}")
    grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
    for name, g in zip(names, grads, strict=True):
        if g is None:
            raise ConfigError(f"hutchinson_trace: the loss does not depend on parameter {name!r}")
    live = [k for k, g in enumerate(grads) if g.requires_grad]  # a gradient without a graph: zero Hessian rows
    gen = torch.Generator().manual_seed(seed)
    total = [0.0] * len(tensors)
    for _ in range(samples if live else 0):
        vs = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.device, p.dtype) for p in tensors]
        hvs = torch.autograd.grad(
            [grads[k] for k in live], tensors, grad_outputs=[vs[k] for k in live], retain_graph=True, allow_unused=True
        )
        for k, (v, hv) in enumerate(zip(vs, hvs, strict=True)):
            if hv is not None:
                total[k] += float((v * hv).sum())
    return {name: t / samples for name, t in zip(names, total, strict=True)}


def plot_bits(bits: dict[str, int], path: str | Path, *, title: str = "bits per layer") -> Path:
    """Horizontal bars of the bit-width per layer, layers top to bottom in the given order; PNG/SVG/PDF."""
    if not bits:
        raise ConfigError("plot_bits: no layers to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    layers = list(bits)
    fig, ax = plt.subplots(figsize=(7.0, max(2.5, 0.22 * len(layers) + 1.2)))
    ys = np.arange(len(layers))
    values = [bits[layer] for layer in layers]
    ax.barh(ys, values, color=[plt.cm.viridis(min(b, 8) / 8.0) for b in values])
    for y, b in zip(ys, values, strict=True):
        ax.text(b, y, f" {b}", va="center", fontsize=7)
    ax.set_yticks(ys, layers, fontsize=7 if len(layers) < 40 else 5)
    ax.invert_yaxis()
    ax.set_xticks(sorted(set(values)))
    ax.set_xlim(0, max(values) * 1.12)
    ax.set_xlabel("weight bits")
    ax.set_title(title)
    fig.tight_layout()
    fmt = path.suffix.lstrip(".").lower() or "png"
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=120))
    finally:
        plt.close(fig)
