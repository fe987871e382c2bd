"""The schedule step in a recipe: plans in the record, the Gantt chart embedded in the report."""

from __future__ import annotations

import json

import pytest

from slimdet.errors import ConfigError
from slimdet.pipeline import run_recipe
from slimdet.pipeline.recipe import load_recipe


def _recipe(tiny_digits, steps):
    return {"model": "yolo-test", "dataset": str(tiny_digits), "input_size": 64, "steps": steps}


def test_schedule_step_records_plans_and_embeds_the_gantt_chart(tiny_digits, tmp_path):
    steps = [{"schedule": {"devices": ["npu", "cpu"], "bits": 8, "frames": 4}}, "schedule"]
    run_recipe(_recipe(tiny_digits, steps), out_dir=tmp_path / "run", progress=False)

    rec = json.loads((tmp_path / "run" / "steps" / "00_schedule" / "record.json").read_text())
    plans = rec["record"]["plans"]
    assert set(plans) >= {"all-cpu", "min-latency"}
    assert rec["record"]["graph"]["devices"]["npu"]["supported_nodes"] == rec["record"]["graph"]["nodes"] - 2
    assert rec["record"]["gantt_plot"] == "steps/00_schedule/gantt.png"
    assert (tmp_path / "run" / rec["record"]["gantt_plot"]).stat().st_size > 10_000
    best = rec["metrics"]["best_throughput"]
    assert rec["metrics"]["plans"][best]["throughput_fps"] > rec["metrics"]["plans"]["all-cpu"]["throughput_fps"]
    for plan in plans.values():  # post-processing never leaves the CPU
        assert all(s["device"] == "cpu" for s in plan["stages"] if "nms" in s["nodes"])

    default = json.loads((tmp_path / "run" / "steps" / "01_schedule" / "record.json").read_text())
    assert "float model" in default["record"]["note"]  # no bits: the float model stays off the int8 NPU
    assert set(default["record"]["plans"]) == {"all-cpu", "min-latency"}
    html = (tmp_path / "run" / "report.html").read_text()
    assert html.count("data:image/png;base64") >= 2 and "gantt" in html


def test_schedule_step_options_are_validated(tiny_digits):
    with pytest.raises(ConfigError, match="method"):
        load_recipe(_recipe(tiny_digits, [{"schedule": {"method": "ilp"}}]))
    with pytest.raises(ConfigError, match="devise"):
        load_recipe(_recipe(tiny_digits, [{"schedule": {"devises": ["npu"]}}]))
