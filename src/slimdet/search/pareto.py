"""Pareto fronts over several objectives, each to be minimised or maximised."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from slimdet.errors import ConfigError


def pareto_mask(values: np.ndarray, senses: Sequence[str]) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``values`` (points x objectives).

    ``senses[j]`` is ``"min"`` or ``"max"``. A point is dominated when another is at least as good on
    every objective and strictly better on one; equal points are all kept.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != len(senses):
        raise ConfigError(f"pareto_mask: expected points x {len(senses)} objectives, got shape {values.shape}")
    bad = [s for s in senses if s not in ("min", "max")]
    if bad:
        raise ConfigError(f"pareto_mask: senses must be 'min' or 'max', got {bad}")
    cost = values * np.where(np.asarray(senses) == "max", -1.0, 1.0)  # everything minimised
    keep = np.ones(len(cost), dtype=bool)
    for i in range(len(cost)):
        if not keep[i]:
            continue
        no_worse = np.all(cost <= cost[i], axis=1)
        better = np.any(cost < cost[i], axis=1)
        if np.any(no_worse & better):
            keep[i] = False
            continue
        # i dominates every point that is no better anywhere and worse somewhere
        dominated = np.all(cost >= cost[i], axis=1) & np.any(cost > cost[i], axis=1)
        keep &= ~dominated
    return keep


def pareto_front(points: Sequence[Mapping[str, float]], objectives: Mapping[str, str]) -> list[int]:
    """Indices of the non-dominated ``points`` (dicts) under ``objectives`` {key: "min" | "max"}."""
    if not points:
        return []
    keys = list(objectives)
    missing = [k for k in keys if k not in points[0]]
    if missing:
        raise ConfigError(f"pareto_front: the points have no {missing}; they have {sorted(points[0])}")
    values = np.array([[float(p[k]) for k in keys] for p in points])
    return np.flatnonzero(pareto_mask(values, [objectives[k] for k in keys])).tolist()
