"""Pareto fronts: checked against brute force on random points."""

from __future__ import annotations

import numpy as np
import pytest

from slimdet.errors import ConfigError
from slimdet.search.pareto import pareto_front, pareto_mask


def _brute(values, senses):
    cost = values * np.where(np.asarray(senses) == "max", -1, 1)
    n = len(cost)
    return np.array([not any(np.all(cost[j] <= cost[i]) and np.any(cost[j] < cost[i]) for j in range(n))
                     for i in range(n)])  # fmt: skip


@pytest.mark.parametrize("seed", range(5))
def test_mask_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 6, size=(60, 3)).astype(float)  # many ties and duplicates
    senses = ["max", "min", "min"]
    assert pareto_mask(values, senses).tolist() == _brute(values, senses).tolist()


def test_front_by_hand():
    points = [
        {"map": 0.9, "latency_ms": 2.0},
        {"map": 0.8, "latency_ms": 1.0},
        {"map": 0.8, "latency_ms": 1.5},  # dominated by the second
        {"map": 0.95, "latency_ms": 3.0},
        {"map": 0.9, "latency_ms": 2.0},  # equal to the first: both kept
    ]
    assert pareto_front(points, {"map": "max", "latency_ms": "min"}) == [0, 1, 3, 4]
    assert pareto_front([], {"map": "max"}) == []


def test_bad_input():
    with pytest.raises(ConfigError, match="have no"):
        pareto_front([{"map": 1.0}], {"energy": "min"})
    with pytest.raises(ConfigError, match="'min' or 'max'"):
        pareto_mask(np.zeros((2, 1)), ["up"])
