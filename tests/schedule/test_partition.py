"""Latency partitioning: chain DP on hand-made cases, MILP and HEFT against brute force, constraints."""

from __future__ import annotations

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
    brute_force,
    chain_dp,
    heft,
    model_graph,
    partition,
    random_graph,
    simulate,
    single_device,
    to_plan,
)
from slimdet.schedule.milp import milp_schedule

INF = math.inf
MS = 1e-3


def _chain(cost_ms, *, latency_ms=1.0, out_bytes=0.0):
    nodes = [Node(f"n{i}", "op", (f"n{i - 1}",) if i else (), out_bytes) for i in range(len(cost_ms))]
    devs = (Device("a", "measured"), Device("b", "measured"))
    return OpGraph(tuple(nodes), devs, np.asarray(cost_ms) * MS, Link(bytes_per_s=1e9, latency_s=latency_ms * MS))


@pytest.mark.parametrize(("cost_ms", "latency_ms", "device", "expected_ms"), [
    ([[1, 10], [10, 1], [1, 10]], 1.0, (0, 1, 0), 5.0),      # 1 + 1 + 1 + 1 + 1: two hops pay off
    ([[1, 10], [10, 1], [1, 10]], 6.0, (0, 0, 0), 12.0),     # hops cost more than they save
    ([[1, 2], [INF, 3], [1, 2]], 0.5, (0, 1, 0), 6.0),       # n1 only on b: there and back (0.5 + 1 < 2)
    ([[1, 2], [INF, 3], [1, 2]], 1.5, (1, 1, 1), 7.0),       # ... unless the hops cost more than b's slowness
    ([[2, 1], [2, 1], [2, 1]], 0.1, (1, 1, 1), 3.0),         # b is faster everywhere
], ids=["switch-twice", "stay", "forced-hop", "forced-device", "all-fast-device"])  # fmt: skip
def test_chain_dp_hand_made_cases(cost_ms, latency_ms, device, expected_ms):
    g = _chain(cost_ms, latency_ms=latency_ms)
    s = chain_dp(g)
    assert s.device == device and s.optimal and s.method == "dp"
    assert s.latency_s == pytest.approx(expected_ms * MS)
    assert brute_force(g).latency_s == pytest.approx(expected_ms * MS)


def test_chain_dp_counts_bytes_over_the_link():
    # 1 MB over 1 GB/s is 1 ms on top of the 1 ms latency: the switch no longer pays (1+2+1+2+1 = 7 > 1+10+1)
    assert chain_dp(_chain([[1, 10], [10, 1], [1, 10]], out_bytes=1e6)).latency_s == pytest.approx(7 * MS)
    assert chain_dp(_chain([[1, 10], [10, 1], [1, 10]], out_bytes=5e6)).device == (0, 0, 0)
    with pytest.raises(ConfigError, match="needs a chain"):
        chain_dp(random_graph(np.random.default_rng(0), 6, edge_prob=0.9))


@pytest.mark.parametrize("seed", range(12))
def test_chain_dp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    g = random_graph(rng, int(rng.integers(2, 8)), devices=int(rng.integers(2, 4)), chain=True)
    assert chain_dp(g).latency_s == pytest.approx(brute_force(g).latency_s, rel=1e-9)


def test_fork_join_runs_branches_in_parallel_on_two_devices():
    # a -> (b, c) -> d; a and d only on device 0; 0.5 ms per hop: b on 0 while c runs on 1
    nodes = [Node("a"), Node("b", inputs=("a",)), Node("c", inputs=("a",)), Node("d", inputs=("b", "c"))]
    g = OpGraph(
        tuple(nodes),
        (Device("a", "m"), Device("b", "m")),
        np.asarray([[1, INF], [4, 4], [4, 4], [1, INF]]) * MS,
        Link(1e9, 0.5 * MS),
    )
    for method in ("milp", "brute", "heft"):
        s = partition(g, method=method)
        assert s.latency_s == pytest.approx(7 * MS), method  # 1 + max(4, 0.5 + 4 + 0.5) + 1
        assert {s.device[1], s.device[2]} == {0, 1}
    plan = to_plan(g, partition(g, method="milp"))
    assert sorted(n for st in plan.stages for n in st.nodes) == ["a", "b", "c", "d"]
    assert plan.latency_s == pytest.approx(7 * MS)
    assert [t[:2] for t in plan.transfers] == [("a", "b"), ("b", "a")]
    assert plan.throughput_fps == pytest.approx(1 / (6.5 * MS))  # device a: 1 + 4 + 1 + 0.5 (its send to b)
    assert plan.stage_start_s[0] == 0.0 and len(plan.stage_start_s) == len(plan.stages)


@pytest.mark.parametrize("seed", range(15))
def test_milp_equals_brute_force_and_heft_is_never_better(seed):
    rng = np.random.default_rng(100 + seed)
    g = random_graph(rng, int(rng.integers(3, 8)), devices=int(rng.integers(2, 4)),
                     edge_prob=float(rng.uniform(0.2, 0.6)))  # fmt: skip
    exact = brute_force(g)
    m = milp_schedule(g)
    assert m.optimal and m.latency_s == pytest.approx(exact.latency_s, rel=1e-7)
    assert heft(g).latency_s >= exact.latency_s * (1 - 1e-9)
    # the schedule's own times are consistent with re-timing its placement
    assert simulate(g, m.device, np.argsort(m.start_s, kind="stable")).latency_s <= m.latency_s * (1 + 1e-9)


@pytest.mark.parametrize("method", ["dp", "milp", "heft", "brute", "auto"])
def test_unsupported_ops_never_land_on_a_device_that_cannot_run_them(method):
    rng = np.random.default_rng(7)
    for _ in range(8):
        g = random_graph(rng, 6, devices=3, unsupported_prob=0.5, chain=method == "dp")
        s = partition(g, method=method)
        assert all(g.supported[i, d] for i, d in enumerate(s.device))


def test_detector_postprocessing_stays_on_the_cpu_and_the_split_beats_one_device():
    torch.manual_seed(0)
    g = model_graph(create_model("yolo-test", num_classes=10, input_size=64), "npu,cpu", bits=8)
    s = partition(g)  # 80+ nodes: HEFT
    assert s.method == "heft" and all(g.supported[i, d] for i, d in enumerate(s.device))
    cpu = g.device_names.index("cpu")
    assert s.device[g.index["decode"]] == s.device[g.index["nms"]] == cpu
    assert single_device(g, "npu") is None  # the NPU cannot run NMS
    assert s.latency_s < single_device(g, "cpu").latency_s
    with pytest.raises(ConfigError, match="'npu' cannot run 'decode'"):
        simulate(g, [0] * len(g))


def test_partition_auto_and_bad_methods():
    rng = np.random.default_rng(1)
    assert partition(random_graph(rng, 5, chain=True)).method == "dp"
    assert partition(random_graph(rng, 6, edge_prob=0.5)).method == "milp"
    assert partition(random_graph(rng, 20, edge_prob=0.2)).method == "heft"
    with pytest.raises(ConfigError, match="method must be one of"):
        partition(random_graph(rng, 3), method="ilp")
    with pytest.raises(ConfigError, match="brute force is for graphs of <= 10"):
        brute_force(random_graph(rng, 11))
