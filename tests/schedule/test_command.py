"""``slimdet schedule MODEL --devices npu,cpu``: the printed plans and the files it writes."""

from __future__ import annotations

import json

from slimdet.cli import main


def test_schedule_command_prints_plans_and_writes_json_and_gantt(tmp_path, capsys):
    args = ["schedule", "yolo-test", "--input-size", "64", "--devices", "npu,cpu", "--bits", "8"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "priced at 8 bits" in out and "highest throughput: " in out
    assert "stage 0 on npu" in out and "stage 1 on cpu" in out
    saved = json.loads((tmp_path / "schedule.json").read_text())
    assert set(saved["plans"]) == {"all-cpu", "min-latency", "pipeline-2", "runnable-2"}
    assert saved["plans"]["pipeline-2"]["stages"][-1]["nodes"][-1] == "nms"
    # runnable-2 cuts where the executor can: its first stage ends with the last neck or head node
    first = saved["plans"]["runnable-2"]["stages"][0]["nodes"]
    assert first[-1].startswith(("neck", "heads")) and not any(n.startswith("neck") for n in
                                                               saved["plans"]["runnable-2"]["stages"][1]["nodes"])
    assert (tmp_path / "gantt.png").stat().st_size > 10_000

    assert main(["schedule", "yolo-test", "--input-size", "64", "--depth", "1", "--link-gb-per-s", "2"]) == 0
    out = capsys.readouterr().out
    assert "npu runs no op of this float model" in out and "all-cpu" in out


def test_schedule_command_errors(capsys):
    assert main(["schedule", "yolo-test", "--devices", "npu,tpu"]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert main(["schedule", "missing/model.pt"]) == 2
    assert "checkpoint file not found" in capsys.readouterr().err
    assert main(["schedule", "yolo-test", "--method", "ilp"]) == 2  # argparse: invalid choice
