"""Pruning to a modelled latency on a device (PruneConfig(target=Latency(...)))."""

from __future__ import annotations

import json

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
              progress=False)  # fmt: skip
    after = model_cost(layer_table(m, m.example_inputs(1), postprocess=False), spec)[0] * 1e3
    assert after == pytest.approx(r.achieved)
    assert abs(after - target) <= 0.05 * target, (before, target, after)
    assert r.hardware == {"device": "edge-npu", "latency_ms_before": before, "latency_ms_after": after}
    assert r.target == {"latency_ms": target}


def test_an_unreachable_latency_names_the_best_reachable():
    m = _model()
    with pytest.raises(ConfigError, match=r"out of reach on edge-npu.*modelled latency is [0-9.]+ ms"):
        prune(m, PruneConfig(target=Latency(ms=1e-6, device="edge-npu")), progress=False)
