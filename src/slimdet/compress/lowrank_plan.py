"""Rank selection for :func:`slimdet.compress.lowrank.decompose`: per-layer kept energy, or a global MACs budget.

The budget is met greedily, as in rate-distortion bit allocation (Shoham & Gersho, IEEE TASSP 1988):
every layer's rank choices that lower its MACs are priced as (MACs saved, squared relative weight
error); steps along each layer's lower convex hull of those points are taken in order of least error
added per MAC saved, over all layers, until the saving reaches the budget; the last layer touched then
takes the least-error choice among all of its own that still meets the budget.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from slimdet.compress.lowrank_factors import Factorizer, Geometry, dense_macs
from slimdet.errors import ConfigError

if TYPE_CHECKING:
    from slimdet.compress.lowrank import LayerOverride, LowRankConfig

__all__ = ["KEPT", "choose_ranks", "hull_steps"]

KEPT = "kept: the budget is met without it"


def choose_ranks(
    facs: dict[str, Factorizer],
    overrides: dict[str, LayerOverride | None],
    geo: dict[str, Geometry],
    cfg: LowRankConfig,
    *,
    total_macs: int,
    skipped: dict[str, str],
    check: Callable[[Factorizer, tuple[int, ...], str], tuple[int, ...]],
) -> dict[str, tuple[int, ...]]:
    """Ranks per layer: fixed by an override, by the kept energy, or by the greedy MACs budget.

    Layers left as they are get their reason in ``skipped``. ``check(fac, ranks, name)`` validates an
    override's explicit ranks.
    """
    chosen: dict[str, tuple[int, ...]] = {}
    searched = []
    for name, fac in facs.items():
        o = overrides[name]
        if o is not None and o.ranks is not None:
            chosen[name] = check(fac, o.ranks, name)
            continue
        energy = o.energy if o is not None and o.energy is not None else cfg.energy
        if energy is None:
            searched.append(name)
            continue
        ranks = fac.energy_ranks(energy, cfg.round_to)
        dense, after = dense_macs(fac.layer, geo[name]), _macs(fac, ranks, geo[name])
        if after < dense:
            chosen[name] = ranks
        else:
            skipped[name] = (f"{fac.name} ranks {list(ranks)} keep {energy:g} of the energy but not fewer MACs "
                             f"({after:,} >= {dense:,})")  # fmt: skip
    if cfg.macs_reduction is not None:
        fixed = sum(dense_macs(facs[n].layer, geo[n]) - _macs(facs[n], r, geo[n]) for n, r in chosen.items())
        greedy = _greedy({n: facs[n] for n in searched}, geo, cfg.round_to,
                         budget=cfg.macs_reduction * total_macs - fixed, skipped=skipped)  # fmt: skip
        if greedy is None:
            reachable = fixed + sum(_max_saving(facs[n], geo[n], cfg.round_to) for n in searched)
            raise ConfigError(f"lowrank: macs_reduction {cfg.macs_reduction:g} cannot be met: factorising every "
                              f"eligible layer at its smallest ranks removes at most {reachable / total_macs:.3f} "
                              f"of the MACs")  # fmt: skip
        chosen.update(greedy)
    return chosen


def hull_steps(saved: np.ndarray, err: np.ndarray) -> list[tuple[int, float]]:
    """Vertices of the lower convex hull of the points (saved, err), walked from the origin: the index
    of each vertex and the slope (error added per MAC saved) of the edge reaching it."""
    # Pareto front first: a choice matters only if it has less error than every choice saving more
    order = np.lexsort((err, -saved))
    best, front = np.inf, []
    for i in order:
        if err[i] < best:
            best = err[i]
            front.append(int(i))
    hull: list[tuple[float, float, int]] = [(0.0, 0.0, -1)]
    for i in reversed(front):  # increasing saving, increasing error
        x, y = float(saved[i]), float(err[i])
        while len(hull) >= 2:
            (x0, y0, _), (x1, y1, _) = hull[-2], hull[-1]
            if (y1 - y0) * (x - x0) < (y - y0) * (x1 - x0):
                break
            hull.pop()  # hull[-1] lies on or above the chord from hull[-2] to this point
        hull.append((x, y, i))
    return [(i, (y - y0) / (x - x0)) for (x0, y0, _), (x, y, i) in zip(hull, hull[1:], strict=False)]


def _greedy(facs: dict[str, Factorizer], geo: dict[str, Geometry], round_to: int, *, budget: float,
            skipped: dict[str, str]) -> dict[str, tuple[int, ...]] | None:  # fmt: skip
    """Ranks removing at least ``budget`` MACs with the least added squared error; None if out of reach."""
    options: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for name, fac in facs.items():
        ranks = fac.candidates(round_to)
        saved = (dense_macs(fac.layer, geo[name]) - fac.macs(ranks, geo[name])).astype(np.float64)
        keep = saved > 0  # only choices that really lower the layer's MACs
        if keep.any():
            options[name] = (ranks[keep], saved[keep], fac.err2(ranks[keep]))
        else:
            skipped[name] = f"no {fac.name} ranks lower its MACs"
    if budget > sum(float(o[1].max()) for o in options.values()):
        return None
    steps = sorted((slope, order, j, name, idx) for order, (name, (_, saved, err)) in enumerate(options.items())
                   for j, (idx, slope) in enumerate(hull_steps(saved, err)))  # fmt: skip
    pick: dict[str, int] = {}
    total, last = 0.0, None
    for *_, name, idx in steps:
        if total >= budget:
            break
        total += options[name][1][idx] - (options[name][1][pick[name]] if name in pick else 0.0)
        pick[name], last = idx, name
    if last is not None:  # the last layer touched: least error among its choices that still meet the budget
        _, saved, err = options[last]
        meets = np.flatnonzero(total - saved[pick[last]] + saved >= budget)
        pick[last] = int(meets[np.argmin(err[meets])])
    for name in options:
        if name not in pick:
            skipped[name] = KEPT
    return {name: tuple(int(r) for r in options[name][0][idx]) for name, idx in pick.items()}


def _macs(fac: Factorizer, ranks: tuple[int, ...], geo: Geometry) -> int:
    return int(fac.macs(np.array([ranks]), geo)[0])


def _max_saving(fac: Factorizer, geo: Geometry, round_to: int) -> float:
    return max(0.0, float((dense_macs(fac.layer, geo) - fac.macs(fac.candidates(round_to), geo)).max()))
