"""Structured pruning of the baseline yolo-s on digits-det, side by side in one run (issue 3).

    .venv/bin/python benchmarks/bench_prune.py [--epochs 6] [--out runs/bench_prune]

Contenders, all starting from the shipped baseline and fine-tuned with the same TrainConfig:

* ``slimdet-50``: slimdet's detector-aware pruning to 50% of the MACs (taylor importance,
  sensitivity allocation, output layers protected, round_to 8);
* ``tp-magnitude-50``: torch-pruning's ``MagnitudePruner`` with one uniform ratio per layer (its
  README usage: L2 magnitude importance, the final prediction layers ignored, no rounding), the ratio bisected
  to the same MACs target. Our C2f block needs one graph fix before torch-pruning can cut it
  correctly (the real sizes of a concat of channel slices); it is applied, nothing else of
  slimdet's selection is;
* ``slimdet-30``: slimdet's pruning to 30% of the MACs (a 70% reduction).

Then: test-split mAP of each next to the baseline, and ONNX Runtime FP32 latency at batch 1,
timed interleaved (A, B, A, B, ...) in this process. Writes benchmarks/results/prune.json and the
"prune" section of benchmarks/RESULTS.md. Fine-tuning resumes from runs/bench_prune/<name>/last.pt
when the script is run again after an interruption.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from _common import RESULTS_DIR, ROOT, env_line, environment, write_json, write_section

BASELINE = ROOT / "src" / "slimdet" / "assets" / "yolo-s_digits-det.pt"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs per contender (<= 10)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_prune")
    parser.add_argument("--runs", type=int, default=200, help="timed runs per model and thread count")
    parser.add_argument("--render-only", action="store_true", help="rewrite RESULTS.md from results/prune.json")
    args = parser.parse_args()
    if args.render_only:
        write_section("prune", render(json.loads((RESULTS_DIR / "prune.json").read_text())))
        return 0

    from slimdet.compress import PruneConfig, prune
    from slimdet.data import load_dataset, make_loader
    from slimdet.evaluate import evaluate
    from slimdet.models import load_model
    from slimdet.profiling.macs import total_macs
    from slimdet.train import TrainConfig, train

    torch.manual_seed(0)
    baseline, _ = load_model(BASELINE)
    size = baseline.input_size
    train_ds = load_dataset("digits-det", "train", input_size=size, augment=True, cache_images=True)
    calib_ds = load_dataset("digits-det", "train", input_size=size).subset(128)
    val_ds = load_dataset("digits-det", "val", input_size=size)
    test_ds = load_dataset("digits-det", "test", input_size=size)
    calib = list(make_loader(calib_ds, batch_size=32, shuffle=False))
    ft_cfg = TrainConfig(epochs=args.epochs, lr=1e-3, warmup_epochs=0.3, eval_every=0)

    def slimdet_prune(model, macs_ratio):  # noqa: ANN001, ANN202
        cfg = PruneConfig(importance="taylor", macs_ratio=macs_ratio, allocation="sensitivity", round_to=8)
        prune(model, cfg, calib=calib, progress=False)
        return model

    contenders = {
        "slimdet-50": lambda m: slimdet_prune(m, 0.5),
        "tp-magnitude-50": lambda m: tp_uniform_magnitude(m, macs_ratio=0.5),
        "slimdet-30": lambda m: slimdet_prune(m, 0.3),
    }
    models = {"baseline": baseline}
    info: dict[str, dict] = {}
    for name, do_prune in contenders.items():
        t0 = time.perf_counter()
        model = do_prune(copy.deepcopy(baseline))
        prune_s = time.perf_counter() - t0
        before_ft = evaluate(model, test_ds, progress=False)
        t0 = time.perf_counter()
        train(model, train_ds, val_ds, ft_cfg, out_dir=args.out / name, resume=True)
        info[name] = {"prune_s": prune_s, "finetune_s": time.perf_counter() - t0,
                      "test_map50_before_finetune": before_ft.map50}  # fmt: skip
        models[name] = model.eval()

    rows = {}
    for name, model in models.items():
        res = evaluate(model, test_ds, progress=False)
        rows[name] = {"params": sum(p.numel() for p in model.parameters()), "macs": total_macs(model, model.example_inputs(1)),
                      "test_map50": res.map50, "test_map": res.map, **info.get(name, {})}  # fmt: skip
    latency = ort_latency(models, runs=args.runs)
    for name in rows:
        rows[name]["ort_b1_ms"] = latency[name]
    payload = {"command": f"benchmarks/bench_prune.py --epochs {args.epochs}", "epochs": args.epochs,
               "finetune": ft_cfg.model_dump(), "rows": rows, "environment": environment(threads=None)}  # fmt: skip
    write_json("prune", payload)
    write_section("prune", render(payload))
    print(render(payload))
    return 0


def tp_uniform_magnitude(model, *, macs_ratio: float):  # noqa: ANN001, ANN201
    """torch-pruning's MagnitudePruner, one uniform ratio, bisected to ``macs_ratio`` of the MACs."""
    import torch_pruning as tp

    from slimdet.compress.prune_graph import build_dependency_graph
    from slimdet.profiling.macs import total_macs

    example = model.example_inputs(1)
    target = macs_ratio * total_macs(model, model.example_inputs(1))

    def pruned(ratio: float):  # noqa: ANN202
        m = copy.deepcopy(model)
        ign = [dict(m.named_modules())[n] for n in model.output_layers()]
        pruner = tp.pruner.MagnitudePruner(m, example, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=ratio, ignored_layers=ign)  # fmt: skip
        pruner.DG = build_dependency_graph(m, example)  # the C2f fixes (see the module docstring)
        pruner.step()
        return m

    lo, hi = 0.0, 0.95
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total_macs(pruned(mid), example) > target else (lo, mid)
    return pruned(hi)


def ort_latency(models: dict, *, runs: int) -> dict[str, dict[str, float]]:
    """Median and p90 ms of ONNX Runtime FP32 at batch 1, all models interleaved, for 1 and 2 threads."""
    import numpy as np

    from slimdet.export import export_onnx, onnx_session
    from slimdet.profiling.latency import summarize, time_interleaved

    out: dict[str, dict[str, float]] = {name: {} for name in models}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: export_onnx(m, Path(tmp) / f"{name}.onnx").path for name, m in models.items()}
        x = np.random.default_rng(0).random((1, 3, 160, 160), dtype=np.float32)
        for threads in (1, 2):
            sessions = {name: onnx_session(p, threads) for name, p in paths.items()}
            feeds = {name: {s.get_inputs()[0].name: x} for name, s in sessions.items()}
            fns = {name: (lambda s=s, f=feeds[name]: s.run(None, f)) for name, s in sessions.items()}
            times = time_interleaved(fns, warmup=10, runs=runs)
            for name, t in times.items():
                stat = summarize("onnxruntime-cpu", 1, t)
                out[name][f"t{threads}_median_ms"] = stat.median_s * 1e3
                out[name][f"t{threads}_p90_ms"] = stat.p90_s * 1e3
    return out


def render(payload: dict) -> str:
    rows = payload["rows"]
    base = rows["baseline"]
    lines = [
        "## Structured pruning of yolo-s on digits-det (issue 3)",
        "",
        f"Command: `.venv/bin/python {payload['command']}`. Every contender starts from the shipped baseline and is "
        f"fine-tuned for {payload['epochs']} epochs with the same settings (AdamW lr {payload['finetune']['lr']}, cosine, EMA); "
        "mAP on the 1,000-image test split; latency of ONNX Runtime FP32 at batch 1, median (p90) ms over interleaved runs.",
        "",
        "| model | params | MACs | mAP@.5 before fine-tune | mAP@.5 | Δ mAP@.5 (points) | mAP@[.5:.95] | ORT 1 thread | speed-up | ORT 2 threads | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lat = r["ort_b1_ms"]
        before = f"{r['test_map50_before_finetune']:.4f}" if "test_map50_before_finetune" in r else "–"
        lines.append(
            f"| {name} | {r['params']:,} | {r['macs'] / 1e6:.1f} M ({r['macs'] / base['macs']:.2f}) | {before} | "
            f"{r['test_map50']:.4f} | {100 * (r['test_map50'] - base['test_map50']):+.2f} | {r['test_map']:.4f} | "
            f"{lat['t1_median_ms']:.2f} ({lat['t1_p90_ms']:.2f}) | {base['ort_b1_ms']['t1_median_ms'] / lat['t1_median_ms']:.2f}x | "
            f"{lat['t2_median_ms']:.2f} ({lat['t2_p90_ms']:.2f}) | {base['ort_b1_ms']['t2_median_ms'] / lat['t2_median_ms']:.2f}x |"
        )
    s50, tp50, s30 = rows.get("slimdet-50"), rows.get("tp-magnitude-50"), rows.get("slimdet-30")
    checks = []
    if s50:
        drop = 100 * (base["test_map50"] - s50["test_map50"])
        speed = {t: base["ort_b1_ms"][f"t{t}_median_ms"] / s50["ort_b1_ms"][f"t{t}_median_ms"] for t in (1, 2)}
        checks.append(f"- 50% MACs: mAP@.5 change {-drop:+.2f} points (target: drop <= 1.0, {'met' if drop <= 1.0 else '**missed**'}); "
                      f"ORT batch-1 speed-up {speed[1]:.2f}x at 1 thread ({'met' if speed[1] >= 1.6 else '**missed**'}) and "
                      f"{speed[2]:.2f}x at 2 threads ({'met' if speed[2] >= 1.6 else '**missed**'}) (target >= 1.6x).")
    if s30:
        drop = 100 * (base["test_map50"] - s30["test_map50"])
        checks.append(f"- 70% MAC reduction: mAP@.5 change {-drop:+.2f} points (target: drop <= 3, {'met' if drop <= 3 else '**missed**'}).")
    if s50 and tp50:
        ok = s50["test_map50"] >= tp50["test_map50"]
        checks.append(f"- Same MACs target and fine-tuning: slimdet {s50['test_map50']:.4f} vs torch-pruning uniform magnitude "
                      f"{tp50['test_map50']:.4f} mAP@.5 ({'slimdet higher or equal: met' if ok else '**missed**'}).")
    lines += ["", *checks, "", f"Environment: {env_line(payload['environment'])}. Raw numbers: `benchmarks/results/prune.json`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
