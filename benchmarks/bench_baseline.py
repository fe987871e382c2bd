"""Train the baseline yolo-s on digits-det with the documented command, time it, and evaluate it.

    .venv/bin/python benchmarks/bench_baseline.py [--out runs/baseline] [--ship]

Runs ``slimdet train`` exactly as documented (``slimdet.train.BASELINE_TRAIN_ARGS``) in a
subprocess, measures its wall-clock time, evaluates the final weights on the digits-det test split,
and writes benchmarks/results/baseline.json and the "baseline" section of benchmarks/RESULTS.md.
``--ship`` copies the trained checkpoint to src/slimdet/assets/yolo-s_digits-det.pt, the baseline
that ``make demo`` loads. Target (issue 2): at most 30 minutes on 2 CPU cores, test mAP@.5 >= 0.90.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS_DIR, ROOT, env_line, environment, write_json, write_section

TARGET_MAP50 = 0.90
TARGET_MINUTES = 30.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "baseline")
    parser.add_argument("--ship", action="store_true", help="copy the checkpoint to the package assets")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the RESULTS.md section from results/baseline.json; run nothing")  # fmt: skip
    args = parser.parse_args()
    if args.render_only:
        write_section("baseline", render(json.loads((RESULTS_DIR / "baseline.json").read_text())))
        return 0

    import torch

    from slimdet.cli import build_builtin
    from slimdet.data import load_dataset
    from slimdet.evaluate import evaluate
    from slimdet.models import load_model
    from slimdet.train import BASELINE_TRAIN_ARGS

    build_builtin("digits-det")  # data generation is not part of the training time
    if args.out.exists():
        shutil.rmtree(args.out)
    slimdet = Path(sys.executable).with_name("slimdet")
    command = [str(slimdet), "train", *BASELINE_TRAIN_ARGS, "--out", str(args.out)]
    shown = "slimdet train " + " ".join(BASELINE_TRAIN_ARGS) + " --out runs/baseline"
    print("running:", shown, flush=True)
    t0 = time.perf_counter()
    subprocess.run(command, check=True)
    train_s = time.perf_counter() - t0

    model, _ = load_model(args.out / "model.pt")
    test = load_dataset("digits-det", "test", input_size=model.input_size)
    result = evaluate(model, test)
    env = environment(threads=torch.get_num_threads())
    history = json.loads((args.out / "history.json").read_text())
    payload = {"command": shown, "train_s": train_s, "test": result.to_dict(), "environment": env,
               "params": sum(p.numel() for p in model.parameters()),
               "epochs": [{k: h[k] for k in ("epoch", "time_s", "val_map50", "val_map")} for h in history],
               "targets": {"map50": TARGET_MAP50, "minutes": TARGET_MINUTES}}  # fmt: skip
    write_json("baseline", payload)
    write_section("baseline", render(payload))
    met = result.map50 >= TARGET_MAP50 and train_s / 60 <= TARGET_MINUTES
    if args.ship:
        dest = ROOT / "src" / "slimdet" / "assets" / "yolo-s_digits-det.pt"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.out / "model.pt", dest)
        print(f"shipped {dest}")
    print(f"train {train_s / 60:.1f} min; test mAP@.5 {result.map50:.4f}, mAP@[.5:.95] {result.map:.4f}")
    return 0 if met else 1


def render(payload: dict) -> str:
    test, train_s = payload["test"], payload["train_s"]
    met = test["map50"] >= TARGET_MAP50 and train_s / 60 <= TARGET_MINUTES
    per_class = ", ".join(f"{k}: {v:.3f}" for k, v in test["per_class_ap"].items())
    epochs = ", ".join(f"{e['time_s']:.0f} s ({e['val_map50']:.3f})" for e in payload["epochs"])
    return f"""## Baseline: yolo-s on digits-det (issue 2)

Command: `{payload["command"]}` (timed by `.venv/bin/python benchmarks/bench_baseline.py --ship`)

| model | params | train time (wall) | test mAP@.5 | test mAP@[.5:.95] | target | met |
|---|---|---|---|---|---|---|
| yolo-s | {payload["params"]:,} | {train_s / 60:.1f} min | {test["map50"]:.4f} | {test["map"]:.4f} | mAP@.5 >= {TARGET_MAP50}, <= {TARGET_MINUTES:.0f} min | {"yes" if met else "**no**"} |

Per-class AP@[.5:.95] on the 1,000 test images: {per_class}.

Seconds per epoch (val mAP@.5 after it): {epochs}. The wall time includes loading and caching
the 6,000 training images and a validation pass after every epoch.{(" " + payload["note"]) if payload.get("note") else ""}

Environment: {env_line(payload["environment"])}. Raw numbers: `benchmarks/results/baseline.json`.
"""


if __name__ == "__main__":
    raise SystemExit(main())
