"""Pruning to a modelled latency on a device (PruneConfig(target=Latency(...)))."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from slimdet.compress import PruneConfig, prune
from slimdet.compress.prune_hw import Latency, _shrink, modelled_latency_ms
from slimdet.errors import ConfigError
from slimdet.hw.cost import model_cost
from slimdet.hw.layers import GemmLayer, layer_table
from slimdet.hw.spec import load_spec
from slimdet.models import create_model

SIZE = 64
TARGETS = [
    {"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0]]), "labels": torch.tensor([1])},
    {"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0], [2.0, 2.0, 20.0, 30.0]]), "labels": torch.tensor([0, 2])},
]


def _calib():
    g = torch.Generator().manual_seed(3)
    return [(torch.rand(2, 3, SIZE, SIZE, generator=g), TARGETS)]


def _model(name: str = "yolo-test"):
    torch.manual_seed(0)
    return create_model(name, num_classes=3, input_size=SIZE).eval()


def test_latency_target_config_round_trips_and_picks_the_latency_allocation():
    cfg = PruneConfig(target={"ms": 0.5, "device": "edge-npu"})
    assert cfg.allocation == "latency" and cfg.goal == ("latency_ms", 0.5)
    again = PruneConfig.model_validate(json.loads(cfg.model_dump_json()))
    assert again == cfg and again.target.spec.name == "edge-npu"
    assert PruneConfig(target=Latency(ms=0.5, device="edge-npu"), allocation="uniform").allocation == "uniform"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"target": {"ms": 1, "device": "edge-npv"}}, r"unknown hardware preset 'edge-npv'.*did you mean 'edge-npu'"),
        ({"target": {"ms": 0, "device": "edge-npu"}}, r"greater than 0"),
        ({"target": {"ms": 1, "device": "edge-npu"}, "macs_ratio": 0.5}, r"exactly one target"),
        ({"macs_ratio": 0.5, "allocation": "latency"}, r"allocation 'latency' needs target"),
    ],
)
def test_bad_latency_targets_are_refused(kw, message):
    with pytest.raises(ValidationError, match=message):
        PruneConfig(**kw)


def test_shrink_follows_the_lost_channels():
    conv = GemmLayer("c", "conv", m=64, k=16 * 9, n=32, in_chw=(16, 8, 8), kernel=(3, 3), out_hw=(8, 8))
    assert (_shrink(conv, 4, 2).n, _shrink(conv, 4, 2).k, _shrink(conv, 4, 2).in_chw) == (28, 14 * 9, (14, 8, 8))
    dw = GemmLayer("d", "dwconv", m=64, k=9, n=1, groups=16, in_chw=(16, 8, 8), kernel=(3, 3), out_hw=(8, 8))
    assert _shrink(dw, 3, 3).groups == 13 and _shrink(dw, 3, 3).macs == 64 * 9 * 13
    fc = GemmLayer("f", "linear", m=1, k=10, n=5)
    assert (_shrink(fc, 1, 2).k, _shrink(fc, 1, 2).n) == (8, 4)


@pytest.mark.parametrize("allocation", ["latency", "uniform"])
def test_latency_target_is_met_within_5_percent_on_the_pruned_model(allocation):
    m = _model()
    spec = load_spec("edge-npu")
    before = modelled_latency_ms(m, spec)
    target = 0.7 * before
    r = prune(m, PruneConfig(target=Latency(ms=target, device="edge-npu"), allocation=allocation, scope="layer"),
              calib=_calib(), progress=False)  # fmt: skip
    after = model_cost(layer_table(m, m.example_inputs(1), postprocess=False), spec)[0] * 1e3
    assert after == pytest.approx(r.achieved)
    assert abs(after - target) <= 0.05 * target, (before, target, after)
    assert r.hardware == {"device": "edge-npu", "latency_ms_before": before, "latency_ms_after": after}
    assert r.target == {"latency_ms": target}


def test_an_unreachable_latency_names_the_best_reachable():
    m = _model()
    with pytest.raises(ConfigError, match=r"out of reach on edge-npu.*modelled latency is [0-9.]+ ms"):
        prune(m, PruneConfig(target=Latency(ms=1e-6, device="edge-npu")), calib=_calib(), progress=False)


def test_damage_curves_follow_the_scan_and_keep_rising():
    from slimdet.compress.prune_hw import damage_curves
    from slimdet.search.sensitivity import SensitivityResult, SensitivityRow

    rows = (SensitivityRow("a", 8, 0.5, {0.25: 0.1, 0.5: 0.05, 0.75: 0.4}),  # a dip is flattened
            SensitivityRow("b", 4, 0.5, {0.25: -0.01, 0.5: 0.0, 0.75: 0.02}))  # fmt: skip
    curves = damage_curves(SensitivityResult("loss", "l2", (0.25, 0.5, 0.75), 1.0, rows), {"a": 8, "b": 4, "c": 2})
    a = curves["a"]
    assert a[0] == 0 and a[2] == pytest.approx(0.1) and a[4] == pytest.approx(0.1) and a[6] == pytest.approx(0.4)
    assert np.all(np.diff(a) >= 0) and a[8] == pytest.approx(0.4 + (0.4 - 0.1) / 0.25 * 0.25)
    assert np.all(curves["b"] >= 0) and curves["b"][3] == pytest.approx(0.02)
    assert "c" not in curves and curves["__median__"][0] == 0
