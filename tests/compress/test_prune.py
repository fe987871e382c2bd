"""Structured pruning: config, targets, protection of output layers, replay from the record."""

from __future__ import annotations

import json
import re

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from slimdet.compress import IMPORTANCE, PruneConfig, prune
from slimdet.errors import CheckpointError, ConfigError
from slimdet.export.onnx import export_onnx
from slimdet.io import save_checkpoint
from slimdet.models import create_model, list_models, load_model
from slimdet.profiling.macs import total_macs

SIZE = 64  # every registered model runs at 64 px (the torchvision FPNs down to a 1x1 P7)
TARGETS = [
    {"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0]]), "labels": torch.tensor([1])},
    {"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0], [2.0, 2.0, 20.0, 30.0]]), "labels": torch.tensor([0, 2])},
]


def calib(batches: int = 1) -> list:
    g = torch.Generator().manual_seed(3)
    return [(torch.rand(2, 3, SIZE, SIZE, generator=g), TARGETS) for _ in range(batches)]


def model(name: str = "yolo-test", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=3, input_size=SIZE).eval()


def outputs(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    m.eval()
    with torch.no_grad():
        out = m(x)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def out_channels(m: nn.Module) -> dict[str, int]:
    return {n: getattr(c, "out_channels", getattr(c, "out_features", None))
            for n, c in m.named_modules() if isinstance(c, (nn.Conv2d, nn.Linear))}  # fmt: skip


# -- config ----------------------------------------------------------------------------------


def test_config_round_trips_through_json():
    cfg = PruneConfig(importance="taylor", scope="layer", macs_ratio=0.5, round_to=8, allocation="sensitivity",
                      overrides={r"neck\..*": 0.2}, ignore=["backbone.stem.0"], iterative_steps=2)  # fmt: skip
    again = PruneConfig.model_validate(json.loads(cfg.model_dump_json()))
    assert again == cfg and again.scope == "layer" and again.goal == ("macs_ratio", 0.5)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({}, "exactly one target"),
        ({"ratio": 0.3, "macs_ratio": 0.5}, "exactly one target"),
        ({"ratio": 0.3, "importance": "taylr"}, "did you mean 'taylor'"),
        ({"ratio": 0.3, "overrides": {"stem": 1.0}}, "override ratios must be in"),
        ({"ratio": 0.3, "unknown": 1}, "Extra inputs"),
        ({"macs_ratio": 1.5}, "less than 1"),
        ({"ratio": 0.95}, "exceeds max_pruning_ratio=0.9"),
        ({"ratio": 0.3, "sensitivity_proxy": "map"}, "'loss' or 'distortion'"),
    ],
)
def test_config_rejects_bad_values(kw, message):
    with pytest.raises(ValidationError, match=message):
        PruneConfig(**kw)


# -- what changes ----------------------------------------------------------------------------


@pytest.mark.parametrize("importance", IMPORTANCE.names())
def test_each_criterion_prunes_yolo_test_as_recorded(importance):
    m = model()
    before = out_channels(m)
    result = prune(m, PruneConfig(importance=importance, ratio=0.4), calib=calib(), progress=False)
    after = out_channels(m)
    assert result.channels and result.channels == {n: (before[n], after[n]) for n in before if before[n] != after[n]}
    assert 0.3 < result.channels_removed < 0.5 and result.params_after < result.params_before
    # the record lists, per pruned root layer, exactly the channels it lost
    (entry,) = result.records
    assert entry == m.model_config["transforms"][0] and entry["kind"] == "prune"
    lost: dict[str, int] = {}
    for name, is_out, idxs in entry["rounds"][0]:
        assert is_out and len(set(idxs)) == len(idxs)
        lost[name] = lost.get(name, 0) + len(idxs)
    for name, n in lost.items():
        assert before[name] - after[name] == n


def test_criteria_choose_different_channels():
    kept = {}
    for importance in ("l1", "random", "taylor"):
        m = model()
        prune(m, PruneConfig(importance=importance, ratio=0.5, scope="layer"), calib=calib(), progress=False)
        kept[importance] = m.model_config["transforms"][0]["rounds"][0]
    assert kept["l1"] != kept["random"] and kept["l1"] != kept["taylor"]


def test_pruning_keeps_batchnorm_statistics_of_kept_channels():
    m = model()
    bn = m.backbone.stage3[0][1]
    bn.running_mean.copy_(torch.arange(bn.num_features, dtype=torch.float32))
    prune(m, PruneConfig(importance="taylor", ratio=0.5, scope="layer"), calib=calib(), progress=False)
    (entry,) = m.model_config["transforms"]
    removed = {i for name, _, idxs in entry["rounds"][0] if name == "backbone.stage3.0.0" for i in idxs}
    expected = [float(i) for i in range(16) if i not in removed]
    assert removed and bn.running_mean.tolist() == expected  # gradients were taken in eval mode


# -- every registered model ------------------------------------------------------------------


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_prunes_runs_trains_exports_and_replays(name, tmp_path):
    m = model(name)
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    ref = outputs(m, x)
    protected = {n: {k: v.clone() for k, v in m.get_submodule(n).state_dict().items()} for n in m.output_layers()}

    result = prune(m, PruneConfig(importance="l1", macs_ratio=0.8), progress=False)
    assert result.channels and result.num_groups > 0
    if name.startswith("fasterrcnn"):  # its box head runs once per proposal: a data-dependent count
        assert result.macs_kept < 0.9
    else:
        assert abs(result.macs_kept - 0.8) < 0.03 and result.macs_after == total_macs(m, x[:1])
    for layer, state in protected.items():  # output layers untouched, inputs included
        assert layer not in result.channels and layer in result.protected
        for key, value in m.get_submodule(layer).state_dict().items():
            assert torch.equal(value, state[key]), (layer, key)
    out = outputs(m, x)  # same output format: number, shapes and dtypes of the raw outputs
    assert [(o.shape, o.dtype) for o in out] == [(o.shape, o.dtype) for o in ref]
    dets = m.predict(x)
    assert len(dets) == 2 and {"boxes", "scores", "labels"} <= set(dets[0])

    m.train()  # one training step
    optimizer = torch.optim.SGD(m.parameters(), lr=1e-3)
    loss, _ = m.compute_loss(*calib()[0])
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)

    path = save_checkpoint(tmp_path / "pruned.pt", model_config=m.model_config, state_dict=m.state_dict())
    rebuilt, _ = load_model(path)
    for a, b in zip(outputs(rebuilt, x), outputs(m, x), strict=True):
        assert torch.equal(a, b)
    if not name.startswith("fasterrcnn"):  # its forward (proposals, NMS) does not export
        exported = export_onnx(m, tmp_path / "pruned.onnx", batch_size=1)
        assert exported.max_abs_diff is not None and exported.max_abs_diff < 1e-3


# -- targets ---------------------------------------------------------------------------------


def test_macs_ratio_half_on_yolo_s_lands_on_half_the_macs():
    m = model("yolo-s")
    result = prune(m, PruneConfig(importance="l2", macs_ratio=0.5), progress=False)
    measured = total_macs(m, m.example_inputs(1))
    assert measured == result.macs_after and abs(measured / result.macs_before - 0.5) <= 0.03 * 0.5


def test_params_ratio_target_is_met():
    m = model("yolo-n")
    result = prune(m, PruneConfig(params_ratio=0.6, scope="layer"), progress=False)
    assert result.params_after == sum(p.numel() for p in m.parameters())
    assert abs(result.params_kept - 0.6) < 0.02


def test_round_to_keeps_multiples_of_eight():
    m = model("yolo-s")
    before = out_channels(m)
    prune(m, PruneConfig(macs_ratio=0.5, round_to=8), progress=False)
    after = out_channels(m)
    assert any(after[n] < before[n] for n in before)
    for name, channels in after.items():
        if name not in m.output_layers():
            assert channels % 8 == 0, (name, channels)
    for bn in (c for c in m.modules() if isinstance(c, nn.BatchNorm2d)):
        assert bn.num_features % 8 == 0


def test_impossible_macs_target_says_the_best_reachable_value():
    with pytest.raises(ConfigError, match="best reachable") as info:
        prune(model(), PruneConfig(macs_ratio=0.001), progress=False)
    best = float(re.search(r"macs_ratio=([0-9.]+) of", str(info.value)).group(1))
    assert 0.001 < best < 0.5 and "protected layers" in str(info.value)
    # the value it names is indeed reachable
    result = prune(model(), PruneConfig(macs_ratio=min(best + 0.02, 0.99)), progress=False)
    assert result.macs_kept <= best + 0.02


def test_a_target_that_removes_nothing_raises():
    with pytest.raises(ConfigError, match="removes no channel"):
        prune(model(), PruneConfig(ratio=0.01, scope="layer"), progress=False)


def test_iterative_rounds_fine_tune_between_and_end_on_target(tmp_path):
    m = model()
    rounds = []
    result = prune(m, PruneConfig(macs_ratio=0.5, iterative_steps=3), finetune=lambda mm, k: rounds.append(k),
                   progress=False)  # fmt: skip
    assert rounds == [1, 2] and len(m.model_config["transforms"]) == 3
    assert abs(result.macs_kept - 0.5) < 0.02
    path = save_checkpoint(tmp_path / "m.pt", model_config=m.model_config, state_dict=m.state_dict())
    x = m.example_inputs(2)
    rebuilt, _ = load_model(path)
    assert all(torch.equal(a, b) for a, b in zip(outputs(rebuilt, x), outputs(m, x), strict=True))


def test_overrides_and_ignored_layers():
    m = model()
    cfg = PruneConfig(ratio=0.3, ignore=[r"neck\.td3\..*"], overrides={"backbone.stage3.0.0": 0.5})
    before = out_channels(m)
    result = prune(m, cfg, progress=False)
    assert before["backbone.stage3.0.0"] == 16 and result.channels["backbone.stage3.0.0"] == (16, 8)
    assert not [n for n in result.channels if n.startswith("neck.td3.")]
    assert "neck.td3.cv1.0" in result.protected
    with pytest.raises(ConfigError, match="matches no layer"):
        prune(model(), PruneConfig(ratio=0.3, ignore=["no.such.layer"]), progress=False)
    with pytest.raises(ConfigError, match="protected or tied to them"):
        prune(model(), PruneConfig(ratio=0.3, overrides={"heads.0.cls_pred": 0.5}), progress=False)


def test_criteria_that_need_gradients_ask_for_calibration():
    with pytest.raises(ConfigError, match="calibration"):
        prune(model(), PruneConfig(importance="hessian", ratio=0.3), progress=False)
    with pytest.raises(ConfigError, match="calibration"):
        prune(model(), PruneConfig(allocation="sensitivity", ratio=0.3), progress=False)


# -- saving and loading ----------------------------------------------------------------------


def test_checkpoint_replays_to_identical_model(tmp_path):
    m = model()
    prune(m, PruneConfig(importance="l2", macs_ratio=0.6, round_to=4), progress=False)
    path = save_checkpoint(tmp_path / "m.pt", model_config=m.model_config, state_dict=m.state_dict())
    rebuilt, payload = load_model(path)
    assert payload["model"]["transforms"][0]["kind"] == "prune"
    assert out_channels(rebuilt) == out_channels(m)
    x = m.example_inputs(3)
    assert all(torch.equal(a, b) for a, b in zip(outputs(rebuilt, x), outputs(m, x), strict=True))


def test_checkpoint_whose_record_gives_other_shapes_fails_clearly(tmp_path):
    pruned, other = model(), model()
    prune(pruned, PruneConfig(ratio=0.5), progress=False)
    prune(other, PruneConfig(ratio=0.2), progress=False)
    # weights of one pruned model under the record of another
    path = save_checkpoint(tmp_path / "m.pt", model_config=other.model_config, state_dict=pruned.state_dict())
    with pytest.raises(CheckpointError, match="size mismatch"):
        load_model(path)
    # a record naming a layer the architecture lacks
    config = {**pruned.model_config, "transforms": [{"kind": "prune", "rounds": [[["no.such.conv", True, [0]]]]}]}
    path = save_checkpoint(tmp_path / "o.pt", model_config=config, state_dict=pruned.state_dict())
    with pytest.raises(CheckpointError, match="no.such.conv"):
        load_model(path)
    # pruned weights with no record at all
    path = save_checkpoint(tmp_path / "n.pt", model_config=model().model_config, state_dict=pruned.state_dict())
    with pytest.raises(CheckpointError, match="does not match model 'yolo-test'"):
        load_model(path)


# -- recipe step -----------------------------------------------------------------------------


def test_prune_step_in_a_recipe(tiny_digits, tmp_path):
    from slimdet.pipeline import run_recipe

    options = {
        "importance": "taylor",
        "macs_ratio": 0.8,
        "allocation": "sensitivity",
        "sensitivity_ratios": [0.5],
        "ignore": [r"(neck|heads)\..*"],  # a quick scan: the backbone's groups only
        "calib_images": 4,
        "calib_batches": 2,
    }
    steps = [{"prune": options}, {"evaluate": {"split": "val", "max_images": 2}}]
    recipe = {"model": "yolo-test", "dataset": str(tiny_digits), "input_size": SIZE, "steps": steps}
    result = run_recipe(recipe, out_dir=tmp_path / "run", progress=False)
    record = json.loads((tmp_path / "run" / "steps" / "00_prune" / "record.json").read_text())
    metrics = record["metrics"]
    assert metrics["macs_before"] > metrics["macs_after"] and abs(metrics["macs_kept"] - 0.8) < 0.02
    assert record["record"]["records"][0]["kind"] == "prune"
    assert record["record"]["channels"] and all(n.startswith("backbone.") for n in record["record"]["channels"])
    step_dir = tmp_path / "run" / "steps" / "00_prune"
    assert (step_dir / "sensitivity.png").stat().st_size > 0 and record["record"]["sensitivity"]["rows"]
    rebuilt, _ = load_model(result.checkpoint)
    x = result.model.example_inputs(2)
    assert all(torch.equal(a, b) for a, b in zip(outputs(rebuilt, x), outputs(result.model, x), strict=True))


def test_shipped_prune_recipe_is_valid():
    from pathlib import Path

    from slimdet.pipeline import load_recipe

    recipe = load_recipe(Path(__file__).parents[2] / "recipes" / "prune.yaml", check_files=False)
    names = [s.name for s in recipe.steps]
    assert names == ["evaluate", "profile", "prune", "finetune", "evaluate", "profile", "export"]
    opts = recipe.steps[2].options
    assert (opts.macs_ratio, opts.importance, opts.allocation, opts.round_to) == (0.5, "taylor", "sensitivity", 8)


def test_sensitivity_weights_reach_the_same_limit_as_uniform_pruning():
    from slimdet.compress.prune_graph import PruneGraph
    from slimdet.compress.prune_plan import Planner

    m = model()
    graph = PruneGraph(m, m.example_inputs(1), protected=m.output_layers())
    order = {g.name: torch.arange(g.units) for g in graph.groups}
    scores = {g.name: torch.ones(g.units) for g in graph.groups}
    units = {g.name: g.units for g in graph.groups}
    weights = {g.name: 0.2 + i / len(graph.groups) for i, g in enumerate(graph.groups)}
    uniform = Planner(graph, order, scores, units, max_ratio=0.75)
    weighted = Planner(graph, order, scores, units, max_ratio=0.75, weights=weights)
    assert weighted.plan(1.0) == uniform.plan(1.0) and sum(uniform.plan(1.0).values()) > 0
    half = weighted.plan(0.5)  # below the limit, higher weight means more pruning
    low, high = min(weights, key=weights.get), max(weights, key=weights.get)
    assert half[low] / units[low] < half[high] / units[high]
