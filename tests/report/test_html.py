from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from slimdet.errors import ConfigError
from slimdet.report import stage_summaries, summary_table, write_report

EVIL = "<script>alert('x')</script>"


def _latency(ms_b1: float) -> list[dict]:
    return [
        {"runtime": rt, "batch_size": b, "median_s": ms_b1 * b * k / 1e3, "p90_s": ms_b1 * b * k * 1.2 / 1e3}
        for rt, k in (("torch-eager", 2.0), ("onnxruntime-cpu", 1.0))
        for b in (1, 8)
    ]


def _stage_metrics(map50: float, params: int, ms_b1: float) -> dict:
    evaluate = {"split": "test", "map": map50 / 2, "map50": map50, "num_images": 10,
                "per_class_ap": {"0": map50 / 2, EVIL: 0.1}}  # fmt: skip
    profile = {"params": params, "macs": params * 100, "state_dict_size_bytes": params * 4,
               "onnx_size_bytes": params * 4, "threads": 2, "latency": _latency(ms_b1)}  # fmt: skip
    return {"evaluate": evaluate, "profile": profile}


def make_run_dir(root: Path) -> Path:
    """A finished two-stage run directory, written by hand as the runner would."""
    root.mkdir()
    (root / "recipe.yaml").write_text(
        f'model: yolo-s\ndataset: digits-det\ntarget: "{EVIL}"\ninput_size: 160\nseed: 0\n'
        "steps:\n- evaluate: {split: test}\n- profile: {runs: 3}\n- train: {epochs: 1}\n- evaluate: {}\n- profile: {}\n"
    )
    names = ["evaluate", "profile", "train", "evaluate", "profile"]
    finished = []
    for i, name in enumerate(names):
        stage = 0 if i < 2 else 1
        entry = {"index": i, "name": name, "dir": f"steps/{i:02d}_{name}", "stage": stage,
                 "changes_model": name == "train", "checkpoint": "input_model.pt", "time_s": 1.5}  # fmt: skip
        metrics = _stage_metrics(0.8 if stage == 0 else 0.7, 1000 if stage == 0 else 500, 4.0 if stage == 0 else 2.0)
        record = {"layers": [{"name": "backbone.conv1", "macs": 5_000_000}, {"name": EVIL, "macs": 7_000_000}]}
        rec = {**entry, "options": {"note": EVIL}, "metrics": metrics.get(name, {"loss": 1.0}),
               "record": record if name == "profile" else {}}  # fmt: skip
        (root / entry["dir"]).mkdir(parents=True)
        (root / entry["dir"] / "record.json").write_text(json.dumps(rec))
        finished.append(entry)
    state = {"version": 1, "started": "2025-01-01T00:00:00+00:00", "completed": "2025-01-01T00:01:00+00:00",
             "input": {"kind": "model", "value": "yolo-s"}, "finished": finished,
             "environment": {"slimdet": "0.1.0", "torch": "2", "python": "3.11", "git_commit": "abc1234"}}  # fmt: skip
    baseline = {
        "stage": 0,
        "name": "baseline",
        "checkpoint": "input_model.pt",
        "metrics": _stage_metrics(0.8, 1000, 4.0),
    }
    trained = {"stage": 1, "name": "02_train", "checkpoint": "steps/02_train/model.pt",
               "metrics": {"train": {"loss": 1.0}, **_stage_metrics(0.7, 500, 2.0)}}  # fmt: skip
    metrics = {"stages": [baseline, trained], "steps": []}
    (root / "state.json").write_text(json.dumps(state))
    (root / "metrics.json").write_text(json.dumps(metrics))
    return root


@pytest.fixture(scope="module")
def html(tmp_path_factory: pytest.TempPathFactory) -> str:
    run = make_run_dir(tmp_path_factory.mktemp("report") / "run")
    path = write_report(run)
    assert path == run / "report.html"
    return path.read_text()


def test_report_has_stage_table_with_numbers(html):
    table = html[html.index('<table class="stages">') :]
    table = table[: table.index("</table>")]
    assert "<th>mAP@[.5:.95]</th>" in table and "<th>ORT b8 ms</th>" in table
    assert "<td>baseline</td>" in table and "<td>02_train</td>" in table
    assert "<td>0.8000</td>" in table and "<td>0.7000</td>" in table  # mAP@.5 per stage
    assert "<td>4.00/4.80</td>" in table  # ORT batch 1 of the baseline: median/p90 ms
    assert "<td>×0.50</td>" in table  # params of the final stage vs the baseline
    assert "abc1234" in html and "digits-det" in html


def test_report_embeds_png_plots(html):
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 3  # mAP vs latency, per-class AP, per-layer MACs
    for data in images:
        assert base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n")
    assert "<link" not in html and "<script" not in html  # self-contained, no scripts


def test_report_escapes_user_strings(html):
    assert EVIL not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html


def test_summary_table_text(tmp_path):
    run = make_run_dir(tmp_path / "run")
    text = summary_table(json.loads((run / "metrics.json").read_text()))
    lines = text.splitlines()
    assert lines[0].split() == ["stage", "params", "MACs", "size", "ONNX", "mAP", "mAP@.5", "PT", "b1", "ms",
                                "PT", "b8", "ms", "ORT", "b1", "ms", "ORT", "b8", "ms", "threads"]  # fmt: skip
    assert lines[2].split()[:3] == ["baseline", "1.00", "k"]
    assert "02_train" in lines[3] and "2.00/2.40" in lines[3]


def test_stage_summaries_pick_measurements_by_content(tmp_path):
    run = make_run_dir(tmp_path / "run")
    stages = stage_summaries(json.loads((run / "metrics.json").read_text()))
    assert [(s.name, s.params, s.map50, s.threads) for s in stages] == [
        ("baseline", 1000, 0.8, 2),
        ("02_train", 500, 0.7, 2),
    ]
    assert stages[1].latency[("onnxruntime-cpu", 8)] == pytest.approx((0.016, 0.0192))


def test_report_without_measurements_says_so(tmp_path):
    run = make_run_dir(tmp_path / "run")
    (run / "metrics.json").write_text(json.dumps({"stages": [{"stage": 0, "name": "baseline", "metrics": {}}]}))
    (run / "state.json").write_text(json.dumps({"version": 1, "finished": []}))
    text = write_report(run).read_text()
    assert "no plots" in text and "no finished steps" in text


def test_missing_run_files_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="recipe.yaml: cannot read run file"):
        write_report(tmp_path)
