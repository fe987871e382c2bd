"""The simulate step, latency-targeted pruning in a recipe, and the modelled columns of the report."""

from __future__ import annotations

import json

import pytest
import yaml

from slimdet.errors import ConfigError
from slimdet.hw.spec import PRESET_DIR
from slimdet.pipeline import run_recipe
from slimdet.pipeline.recipe import load_recipe
from slimdet.report import summary_table


def _recipe(tiny_digits, steps, **kw):
    return {"model": "yolo-test", "dataset": str(tiny_digits), "input_size": 64, "steps": steps, **kw}


def test_simulate_prune_to_latency_and_simulate_again(tiny_digits, tmp_path):
    spec = yaml.safe_load((PRESET_DIR / "edge-npu.yaml").read_text())
    spec.update(name="my-npu", rows=8, cols=8)
    (tmp_path / "npu.yaml").write_text(yaml.safe_dump(spec))
    steps = [
        {"simulate": {"devices": ["edge-npu", "cpu-zen5-2c"]}},
        {"prune": {"target": {"ms": 0.03, "device": "edge-npu"}}},
        "simulate",  # the recipe's target: the spec file next to the recipe
    ]
    raw = _recipe(tiny_digits, steps, target="npu.yaml")
    recipe = load_recipe(raw, base_dir=tmp_path)
    assert recipe.target == str(tmp_path / "npu.yaml")
    run_recipe(recipe, out_dir=tmp_path / "run", progress=False)

    first = json.loads((tmp_path / "run" / "steps" / "00_simulate" / "record.json").read_text())
    modelled = first["metrics"]["modelled"]
    assert set(modelled) == {"edge-npu", "cpu-zen5-2c"}
    assert modelled["edge-npu"]["latency_ms"] > 0.03 and 0 < modelled["edge-npu"]["utilization"] <= 1
    assert (tmp_path / "run" / first["record"]["edge-npu_plot"]).stat().st_size > 5000
    pruned = json.loads((tmp_path / "run" / "steps" / "01_prune" / "record.json").read_text())["metrics"]
    assert pruned["modelled_latency_ms_after"] == pytest.approx(0.03, rel=0.05)
    last = json.loads((tmp_path / "run" / "steps" / "02_simulate" / "record.json").read_text())
    assert set(last["metrics"]["modelled"]) == {"my-npu"}

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    table = summary_table(metrics)
    assert "edge-npu ms (model)" in table and "my-npu µJ (model)" in table
    html = (tmp_path / "run" / "report.html").read_text()
    assert "edge-npu ms (model)" in html and html.count("data:image/png;base64") >= 2


def test_bad_devices_and_targets_are_refused(tiny_digits, tmp_path):
    with pytest.raises(ConfigError, match="target: file not found"):
        load_recipe(_recipe(tiny_digits, ["simulate"], target="nowhere.yaml"), base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"steps\[0\]\.prune\.target\.device.*did you mean 'edge-npu'"):
        load_recipe(_recipe(tiny_digits, [{"prune": {"target": {"ms": 1, "device": "edge-npv"}}}]))
