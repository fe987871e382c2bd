"""Sensitivity scan: one row per prunable group, a plot, and an allocation that spares sensitive groups."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from slimdet.compress import PruneConfig, protected_layers, prune
from slimdet.compress.prune_graph import PruneGraph
from slimdet.data import load_dataset
from slimdet.models import create_model
from slimdet.search import allocate, sensitivity_scan, sensitivity_weights

SIZE = 64
TARGETS = [
    {"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0]]), "labels": torch.tensor([1])},
    {"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([2])},
]


def lively_model(seed: int = 0, num_classes: int = 3) -> nn.Module:
    """yolo-test whose features reach the outputs (an untrained one predicts its biases)."""
    torch.manual_seed(seed)
    model = create_model("yolo-test", num_classes=num_classes, input_size=SIZE).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.25)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
        for name in model.output_layers():
            model.get_submodule(name).weight.mul_(10)
    return model


def calib() -> list:
    return [(torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9)), TARGETS)]


@pytest.fixture(scope="module")
def pruned():
    """One scan for the whole file: the one behind a sensitivity-allocated prune of yolo-test."""
    torch.set_num_threads(1)
    model = lively_model()
    graph = PruneGraph(model, model.example_inputs(1), protected=model.output_layers())
    groups = {g.name: g.channels for g in graph.groups}
    cfg = PruneConfig(ratio=0.3, allocation="sensitivity", sensitivity_ratios=(0.5,), importance="l1")
    return groups, prune(model, cfg, calib=calib(), progress=False)


def test_scan_has_one_row_per_group(pruned):
    groups, result = pruned
    scan = result.sensitivity
    assert [r.group for r in scan.rows] == list(groups) and scan.ratios == (0.5,)
    for row in scan.rows:
        assert set(row.change) == {0.5} and 0 < row.macs_share <= 1
        assert row.channels == groups[row.group] and row.map_drop is None
    assert scan.baseline > 0 and sum(v > 0 for v in scan.scores().values()) >= len(scan.rows) // 4


def test_scan_table_dict_and_plot(pruned, tmp_path):
    scan = pruned[1].sensitivity
    lines = scan.table().splitlines()
    assert len(lines) == 2 + len(scan.rows) and "@0.5" in lines[1]
    most = max(scan.scores(), key=scan.scores().get)
    assert lines[2].startswith(most[:44])  # most sensitive first
    d = json.loads(json.dumps(scan.to_dict()))
    assert len(d["rows"]) == len(scan.rows) and set(d["scores"]) == {r.group for r in scan.rows}
    path = scan.plot(tmp_path / "sensitivity.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sensitivity_allocation_prunes_sensitive_groups_less(pruned):
    groups, result = pruned
    assert abs(result.channels_removed - 0.3) < 0.05
    scores = result.sensitivity.scores()
    removed = {g: 1 - result.channels.get(g, (1, 1))[1] / result.channels.get(g, (1, 1))[0] for g in scores}
    # groups of 8 channels or more (in narrower ones rounding to whole channels dominates)
    ordered = sorted((g for g in scores if groups[g] >= 8), key=scores.get)
    least, most = ordered[: len(ordered) // 4], ordered[-(len(ordered) // 4) :]
    assert sum(removed[g] for g in least) / len(least) > sum(removed[g] for g in most) / len(most)
    assert removed[ordered[0]] >= removed[ordered[-1]]


def test_distortion_proxy_and_map_on_request_leave_the_model_alone(tiny_digits):
    model = lively_model(num_classes=10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # one mAP evaluation per trial: scan the groups of stage 4 only
    protected = protected_layers(model, [r"(neck|heads|backbone\.(stem|stage[123]))\..*"])
    val = load_dataset(tiny_digits, "val", input_size=SIZE).subset(2)
    result = sensitivity_scan(model, calib=calib(), ratios=(0.25, 0.75), proxy="distortion", map_dataset=val,
                              protected=protected, progress=False)  # fmt: skip
    assert result.rows and all(r.group.startswith("backbone.stage4.") for r in result.rows)
    assert all(set(r.change) == {0.25, 0.75} and min(r.change.values()) >= 0 for r in result.rows)
    assert any(r.change[0.75] > 0 for r in result.rows)
    assert result.baseline_map is not None and all(set(r.map_drop) == {0.25, 0.75} for r in result.rows)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_weights_spare_sensitive_groups():
    scores = {"a": 0.0, "b": 0.01, "c": 0.1, "d": 1.0}
    w = sensitivity_weights(scores)
    assert w["a"] > w["b"] > w["c"] > w["d"] and sum(w.values()) / len(w) == pytest.approx(1.0)
    assert sensitivity_weights({"x": 0.3, "y": 0.3}) == {"x": pytest.approx(1.0), "y": pytest.approx(1.0)}
    ratios = allocate(scores, 0.6, max_ratio=0.8)
    assert ratios["a"] == 0.8 and ratios["d"] < ratios["c"] < 0.6
