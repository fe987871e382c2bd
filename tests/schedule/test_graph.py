"""The operator graph: validation, transfers, fusion, and a detector traced into one with hw costs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slimdet.errors import ConfigError
from slimdet.hw import estimate, layer_table, load_spec
from slimdet.models import create_model
from slimdet.schedule import Device, Link, Node, OpGraph, model_graph, resolve_devices

INF = math.inf
DEVS = (Device("a", "measured"), Device("b", "measured"))


def _graph(nodes, cost, **kw):
    return OpGraph(tuple(nodes), DEVS, np.asarray(cost, dtype=float), **kw)


def test_graph_is_validated_with_clear_messages():
    with pytest.raises(ConfigError, match="'x' appears twice"):
        _graph([Node("x"), Node("x")], [[1, 1], [1, 1]])
    with pytest.raises(ConfigError, match=r"'y' reads \['z'\].*topological"):
        _graph([Node("y", inputs=("z",)), Node("z")], [[1, 1], [1, 1]])
    with pytest.raises(ConfigError, match="no device can run node 'x'"):
        _graph([Node("x", "nms")], [[INF, INF]])
    with pytest.raises(ConfigError, match="cost_s must be 1 x 2"):
        _graph([Node("x")], [[1, 1, 1]])
    with pytest.raises(ConfigError, match="unknown device"):
        _graph([Node("x")], [[1, 1]], links={("a", "gpu"): Link(1e9)})


def test_transfers_are_latency_plus_bytes_over_bandwidth_per_link():
    g = _graph(
        [Node("x", out_bytes=2e6), Node("y", inputs=("x",))],
        [[1, 1], [1, 1]],
        link=Link(bytes_per_s=1e9, latency_s=1e-5),
        links={("b", "a"): Link(bytes_per_s=4e9)},
    )
    assert g.transfer_s(2e6, 0, 1) == pytest.approx(1e-5 + 2e-3)
    assert g.transfer_s(2e6, 1, 0) == pytest.approx(0.5e-3)
    assert g.transfer_s(2e6, 0, 0) == 0.0
    np.testing.assert_allclose(g.transfer_matrix(0), [[0, 1e-5 + 2e-3], [0.5e-3, 0]])
    assert g.is_chain and g.preds == ((), (0,)) and g.succs == ((1,), ())


def test_contract_sums_costs_keeps_constraints_and_sends_only_what_leaves_the_group():
    nodes = [
        Node("in", out_bytes=10),
        Node("conv", inputs=("in",), out_bytes=100),
        Node("act", inputs=("conv",), out_bytes=100),
        Node("side", inputs=("in",), out_bytes=7),
        Node("cat", inputs=("act", "side"), out_bytes=5),
    ]
    g = _graph(nodes, [[0, 0], [2, 1], [1, INF], [3, 3], [1, 1]])
    assert not g.is_chain
    fused = g.contract({"conv": "conv", "act": "conv"})
    assert [n.name for n in fused.nodes] == ["in", "conv", "side", "cat"]
    np.testing.assert_allclose(fused.cost_s[1], [3, INF])  # act cannot run on b: neither can the fused node
    assert fused.nodes[1].members == ("conv", "act") and fused.nodes[1].out_bytes == 100  # only act's output leaves
    assert fused.nodes[3].inputs == ("conv", "side")
    # a group placed at its first member that reads a later node is moved after it
    moved = g.contract({"in": "g", "cat": "g2", "side": "g2"})
    assert [n.name for n in moved.nodes] == ["g", "conv", "act", "g2"]
    with pytest.raises(ConfigError, match="cycle"):
        g.contract({"conv": "loop", "cat": "loop"})  # conv -> act -> cat: act would both follow and feed it


def test_resolve_devices_aliases_presets_and_names():
    targets = resolve_devices("npu,cpu")
    assert [(t.device.name, t.device.kind, t.spec.name) for t in targets] == [
        ("npu", "systolic", "edge-npu"),
        ("cpu", "roofline", "cpu-zen5-2c"),
    ]
    named = resolve_devices(["big=tpu-v1", "gpu-h100-sxm"])
    assert [t.device.name for t in named] == ["big", "gpu-h100-sxm"]
    with pytest.raises(ConfigError, match="did you mean 'npu'"):
        resolve_devices("nup,cpu")
    with pytest.raises(ConfigError, match="must differ"):
        resolve_devices("cpu,cpu")


@pytest.fixture(scope="module")
def yolo_test():
    torch.manual_seed(0)
    return create_model("yolo-test", num_classes=10, input_size=64).eval()


def test_detector_graph_prices_every_layer_and_keeps_float_and_postprocess_off_the_npu(yolo_test):
    g = model_graph(yolo_test, "npu,cpu")
    names = [n.name for n in g.nodes]
    assert names[0] == "input" and names[-2:] == ["decode", "nms"]
    members = {m for n in g.nodes for m in (n.members or (n.name,))}
    convs = {name for name, m in yolo_test.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert convs <= members  # every conv is (in) a node
    assert g.nodes[1].members == ("backbone.stem.0", "backbone.stem.1", "backbone.stem.2")  # conv + BN + SiLU fused
    # the CPU costs add up to the roofline estimate of the whole layer table
    cpu = estimate(layer_table(yolo_test), load_spec("cpu-zen5-2c")).total_latency_s
    assert g.cost_s[:, 1].sum() == pytest.approx(cpu, rel=0.02)
    # a float model: the int8 NPU can run nothing but the (free) input
    assert g.supported[:, 0].sum() == 1 and g.supported[:, 1].all()
    assert g.nodes[0].out_bytes == 3 * 64 * 64 * 4

    q = model_graph(yolo_test, "npu,cpu", bits=8)
    off_npu = {n.name for k, n in enumerate(q.nodes) if not q.supported[k, 0]}
    assert off_npu == {"decode", "nms"}
    assert q.nodes[0].out_bytes == 3 * 64 * 64  # tensors carried at 8 bits
    assert (q.cost_s[q.supported[:, 0], 0] < q.cost_s[q.supported[:, 0], 1] + 1e-12).mean() > 0.5


def test_depth_fuses_module_calls_into_an_acyclic_coarser_graph(yolo_test):
    g = model_graph(yolo_test, "npu,cpu", bits=8, depth=2)
    names = [n.name for n in g.nodes]
    assert {"backbone.stem", "backbone.stage4", "neck.td4", "heads.0", "decode", "nms"} <= set(names)
    assert "neck.up#2" in names  # the second call of the same module is its own node
    assert len(g) < 30
    fine = model_graph(yolo_test, "npu,cpu", bits=8)
    np.testing.assert_allclose(g.cost_s.sum(axis=0), fine.cost_s.sum(axis=0), rtol=1e-9)
