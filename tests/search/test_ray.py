"""Search trials on Ray: the same sensitivity table and codesign points as the plain run, the CLI, errors."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from slimdet.compress import protected_layers
from slimdet.data import calibration_batches, load_dataset
from slimdet.errors import ConfigError
from slimdet.search import TrialRunner, sensitivity_scan
from slimdet.search.codesign import CodesignConfig, codesign

RATIOS = (0.3, 0.6)
CALIB = {"images": 4, "batches": 2}
TINY = {
    "hardware": {"arrays": [[8, 8]], "sram_kib": [16], "dram_bytes_per_cycle": [8], "dataflows": ["ws", "os"]},
    "compression": {"macs_ratios": [1.0, 0.6], "weight_bits": [8], "finetune_epochs": 1,
                    "finetune_steps_per_epoch": 1, "calib_images": 8, "adaround_iters": 2},
    "eval_images": 4,
    "threads": 1,
}  # fmt: skip


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance (2 CPUs) for the module; the runner uses it and leaves it running."""
    import ray

    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    # the workers cannot import this file (pytest's importlib mode): its trial functions travel by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def calib(tiny_digits):
    return calibration_batches(load_dataset(tiny_digits, "train", input_size=64), **CALIB)


def _wait_for_partner(folder: Path, trial: int) -> tuple[int, int, float]:
    """Trial 0 finishes only after the caller has received trial 1's result: results come back out of order.

    Waiting for the caller's receipt (written by ``on_result``), not for trial 1 itself, leaves no race: had
    both finished before the caller looked, it would take them in submission order.
    """
    deadline = time.monotonic() + 120  # a cold Ray worker on a loaded machine can take a while to start
    while trial == 0 and not (folder / "1.received").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return trial, torch.get_num_threads(), float(torch.rand(()))


def test_runner_keeps_trial_order_threads_and_seed(ray_instance, tmp_path):
    finished = []

    def on_result(trial, result):
        finished.append(trial)
        (tmp_path / f"{trial}.received").touch()

    runner = TrialRunner("ray", threads=1)
    results = runner.run(_wait_for_partner, [0, 1, 2], shared=tmp_path, seed=5, on_result=on_result, progress=False)
    assert [r[0] for r in results] == [0, 1, 2] and finished.index(1) < finished.index(0)
    assert sorted(finished) == [0, 1, 2] and all(r[1] == 1 for r in results)
    # every trial starts from the same RNG state, in either backend; the caller's state is left alone
    before = torch.get_rng_state()
    local = TrialRunner("local", threads=1).run(_wait_for_partner, [1, 2], shared=tmp_path, seed=5, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    expected = float(torch.rand((), generator=torch.Generator().manual_seed(5)))
    assert {r[2] for r in results} == {r[2] for r in local} == {expected}


@pytest.mark.parametrize("proxy", ["loss", "distortion"])
def test_sensitivity_scan_on_ray_equals_the_plain_run(ray_instance, fitted_tiny, calib, proxy):
    # the groups of the last backbone stage (the CLI test below scans them all)
    protected = protected_layers(fitted_tiny, [r"(neck|heads|backbone\.(stem|stage[123]))\..*"])
    kw = {"calib": calib, "ratios": RATIOS, "proxy": proxy, "protected": protected, "progress": False}
    plain = sensitivity_scan(fitted_tiny, **kw)
    scan = sensitivity_scan(fitted_tiny, **kw, runner=TrialRunner("ray"))
    assert len(scan.rows) == len(plain.rows) >= 4 and scan.baseline == plain.baseline
    for row, ref in zip(scan.rows, plain.rows, strict=True):
        assert row.group == ref.group and row.macs_share == ref.macs_share
        assert list(row.change) == list(RATIOS) and row.change == ref.change  # exact, every ratio
    assert scan == plain and scan.table() == plain.table()
    assert sum(v > 0 for row in scan.rows for v in row.change.values()) >= len(scan.rows)


def test_cli_sensitivity_on_ray_writes_the_plain_table(ray_instance, fitted_tiny, tiny_digits, calib, tmp_path,
                                                       capsys):  # fmt: skip
    from slimdet.cli import main
    from slimdet.io import save_checkpoint

    plain_scan = sensitivity_scan(fitted_tiny, calib=calib, ratios=RATIOS, progress=False)
    ckpt = save_checkpoint(tmp_path / "m.pt", model_config=fitted_tiny.model_config,
                           state_dict=fitted_tiny.state_dict())  # fmt: skip
    out = tmp_path / "sens"
    rc = main(["sensitivity", str(ckpt), "--data", str(tiny_digits), "--ratios", *map(str, RATIOS),
               "--calib-images", str(CALIB["images"]), "--calib-batches", str(CALIB["batches"]), "--ray",
               "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 0 and plain_scan.table() in capsys.readouterr().out
    assert (out / "sensitivity.txt").read_text() == plain_scan.table() + "\n"
    assert json.loads((out / "sensitivity.json").read_text()) == json.loads(json.dumps(plain_scan.to_dict()))
    assert (out / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_codesign_on_ray_equals_the_plain_run_and_resumes(ray_instance, fitted_tiny, tiny_digits, tmp_path,
                                                          monkeypatch):  # fmt: skip
    from slimdet.io import save_checkpoint

    cfg = CodesignConfig.model_validate(TINY)
    ckpt = save_checkpoint(tmp_path / "model.pt", model_config=fitted_tiny.model_config,
                           state_dict=fitted_tiny.state_dict())  # fmt: skip
    plain = codesign(fitted_tiny, str(tiny_digits), cfg, out_dir=tmp_path / "plain", checkpoint=ckpt, progress=False)
    out = tmp_path / "ray"
    on_ray = codesign(fitted_tiny, str(tiny_digits), cfg, out_dir=out, checkpoint=ckpt, progress=False,
                      runner=TrialRunner("ray"))  # fmt: skip
    assert len(on_ray.points) == 2 * 2 and on_ray.points == plain.points  # exact: mAP, MACs, latency, energy
    assert on_ray.pareto == plain.pareto and on_ray.chosen == plain.chosen
    assert {p["macs_ratio"] for p in on_ray.points} == {1.0, 0.6}
    assert (out / "policies" / "macs0.6" / "model.pt").is_file()

    # resume on Ray: a lost policy is recomputed from the cached pruned model, nothing else is
    (out / "policies" / "macs0.6_w8.json").unlink()
    ran, run = [], TrialRunner.run

    def recording_run(self, fn, trials, **kw):
        ran.extend(trials)
        return run(self, fn, trials, **kw)

    monkeypatch.setattr(TrialRunner, "run", recording_run)
    again = codesign(fitted_tiny, str(tiny_digits), cfg, out_dir=out, checkpoint=ckpt, progress=False,
                     runner=TrialRunner("ray"))  # fmt: skip
    assert ran == [(0.6, 8)] and again.points == plain.points


def test_missing_ray_and_unreachable_address_are_config_errors(monkeypatch, fitted_tiny, tiny_digits, tmp_path,
                                                               capsys):  # fmt: skip
    from slimdet.cli import main
    from slimdet.io import save_checkpoint

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError, match="no Ray cluster answers there"):
        TrialRunner("ray", address=f"127.0.0.1:{port}").run(_wait_for_partner, [2], shared=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="needs backend='ray'"):
        TrialRunner("local", address="auto")

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    with pytest.raises(ConfigError, match=r"pip install 'slimdet\[distributed\]'"):
        TrialRunner("ray").run(_wait_for_partner, [2], shared=tmp_path, progress=False)
    ckpt = save_checkpoint(tmp_path / "m.pt", model_config=fitted_tiny.model_config,
                           state_dict=fitted_tiny.state_dict())  # fmt: skip
    rc = main(["sensitivity", str(ckpt), "--data", str(tiny_digits), "--ratios", "0.5", "--calib-images", "4",
               "--ray", "--out", str(tmp_path / "s"), "--quiet"])  # fmt: skip
    assert rc == 2 and "slimdet[distributed]" in capsys.readouterr().err
    assert not (tmp_path / "s" / "sensitivity.json").exists()
