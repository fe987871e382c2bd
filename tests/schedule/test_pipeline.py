"""Throughput plans: the pipeline DP against enumeration, live tensors at cuts, plans of a detector, Gantt."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from slimdet.errors import ConfigError
from slimdet.models import create_model
from slimdet.schedule import (
    Device,
    Link,
    Node,
    OpGraph,
    gantt_bars,
    model_graph,
    pipeline_plan,
    plan_table,
    plot_gantt,
    random_graph,
    schedule_plans,
)
from slimdet.schedule.pipeline import best_throughput, live_bytes

INF = math.inf
MS = 1e-3


def _enumerate(g: OpGraph) -> tuple[float, float]:
    """(bottleneck, latency) of the best pipeline, by trying every cut set and device order."""
    n, ndev, live, best = len(g), len(g.devices), live_bytes(g), (INF, INF)
    for k in range(1, ndev + 1):
        for cuts in itertools.combinations(range(1, n), k - 1):
            bounds = [0, *cuts, n]
            for devs in itertools.permutations(range(ndev), k):
                loads = [g.cost_s[bounds[s]:bounds[s + 1], devs[s]].sum()
                         + (g.transfer_s(live[bounds[s + 1]], devs[s], devs[s + 1]) if s + 1 < k else 0.0)
                         for s in range(k)]  # fmt: skip
                best = min(best, (max(loads), sum(loads)))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_pipeline_dp_equals_enumeration(seed):
    rng = np.random.default_rng(seed)
    g = random_graph(rng, int(rng.integers(2, 9)), devices=int(rng.integers(2, 4)), unsupported_prob=0.1)
    bottleneck, latency = _enumerate(g)
    if not math.isfinite(bottleneck):
        with pytest.raises(ConfigError, match="no pipeline"):
            pipeline_plan(g)
        return
    plan = pipeline_plan(g)
    assert 1 / plan.throughput_fps == pytest.approx(bottleneck, rel=1e-9)
    assert plan.latency_s == pytest.approx(latency, rel=1e-9)
    assert [n for s in plan.stages for n in s.nodes] == [n.name for n in g.nodes]  # contiguous, in order
    assert len(set(plan.devices)) == len(plan.stages)  # one stage per device


def test_hand_made_two_stage_pipeline_and_live_bytes():
    # x -> y -> z with a skip x -> z: the cut after y carries x's and y's outputs
    nodes = [Node("x", out_bytes=1e6), Node("y", inputs=("x",), out_bytes=2e6), Node("z", inputs=("y", "x"))]
    g = OpGraph(
        tuple(nodes),
        (Device("a", "m"), Device("b", "m")),
        np.asarray([[2, 9], [2, 9], [9, 3]]) * MS,
        Link(bytes_per_s=1e9, latency_s=0.5 * MS),
    )
    np.testing.assert_allclose(live_bytes(g), [0, 1e6, 3e6, 0])
    plan = pipeline_plan(g)
    assert [(s.device, s.nodes) for s in plan.stages] == [("a", ("x", "y")), ("b", ("z",))]
    send = 0.5 * MS + 3e6 / 1e9
    assert plan.transfers == (("a", "b", pytest.approx(send)),)
    assert plan.throughput_fps == pytest.approx(1 / (4 * MS + send))
    assert plan.latency_s == pytest.approx(4 * MS + send + 3 * MS)
    one = pipeline_plan(g, max_stages=1)
    assert len(one.stages) == 1 and one.latency_s == pytest.approx(13 * MS)  # all on a: 2 + 2 + 9


@pytest.fixture(scope="module")
def plans():
    torch.manual_seed(0)
    g = model_graph(create_model("yolo-test", num_classes=10, input_size=64), "npu,cpu", bits=8)
    return g, schedule_plans(g)


def test_detector_plans_report_latency_and_throughput(plans):
    g, out = plans
    assert list(out) == ["all-cpu", "min-latency", "pipeline-2"]
    names = sorted(n.name for n in g.nodes)
    for name, plan in out.items():
        assert sorted(n for s in plan.stages for n in s.nodes) == names, name
        assert all(s.device == "cpu" for s in plan.stages if {"decode", "nms"} & set(s.nodes)), name
        assert plan.latency_s > 0 and plan.throughput_fps > 0
    assert out["min-latency"].latency_s <= out["all-cpu"].latency_s
    assert out["pipeline-2"].throughput_fps > out["all-cpu"].throughput_fps
    assert out[best_throughput(out)].throughput_fps == max(p.throughput_fps for p in out.values())
    text = plan_table(out)
    assert "pipeline-2" in text and "frames/s" in text


def test_gantt_pipeline_bars_respect_devices_and_order_and_reach_the_planned_rate(plans, tmp_path):
    _, out = plans
    plan = out["pipeline-2"]
    frames = 6
    bars = gantt_bars(plan, frames=frames)
    for dev in plan.devices:  # one thing at a time on a device
        own = sorted((b.start_s, b.end_s) for b in bars if b.lane == dev)
        assert all(a[1] <= b[0] + 1e-15 for a, b in itertools.pairwise(own))
    compute = {(b.frame, b.stage): b for b in bars if b.kind == "compute"}
    for f in range(frames):  # stage 1 of a frame starts after stage 0 and its send
        assert compute[f, 1].start_s >= compute[f, 0].end_s + plan.transfers[0][2] - 1e-15
    period = compute[frames - 1, 1].end_s - compute[frames - 2, 1].end_s
    assert period == pytest.approx(1 / plan.throughput_fps, rel=1e-9)
    one = gantt_bars(out["min-latency"])
    assert max(b.end_s for b in one) == pytest.approx(out["min-latency"].latency_s)
    path = plot_gantt(out, tmp_path / "gantt.png")
    assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"
