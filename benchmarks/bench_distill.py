"""Fine-tuning a pruned yolo-s with and without distillation from the original, side by side (issue 7).

    .venv/bin/python benchmarks/bench_distill.py [--epochs 2] [--macs-ratio 0.3] [--threads 1]
    .venv/bin/python benchmarks/bench_distill.py --sweep     # how the default loss weights were chosen (val split)

The shipped baseline is pruned to ``--macs-ratio`` of its MACs with bench_prune's slimdet settings
(Taylor importance, sensitivity allocation, channels rounded to 8, 128 calibration images), then
the same pruned model is fine-tuned twice for ``--epochs`` epochs with the same settings (AdamW lr
1e-3, cosine, EMA, warm-up 0.3 epochs, seed 0, the same data order): once on the detection loss
alone, once with slimdet.compress.distill and its default weights, the baseline as the teacher.
Reports test-split mAP@.5 of the baseline, the pruned model before fine-tuning and both
fine-tuned models, and the share of the mAP lost without distillation that distillation recovers:
``(mAP_distill - mAP_plain) / (mAP_baseline - mAP_plain)`` (target >= 0.5). Plots every loss term
of both runs. Writes benchmarks/results/distill_e<epochs>.json, the loss-term plots and the
"distill_e<epochs>" section of benchmarks/RESULTS.md. Pruning and each fine-tuning resume from runs/bench_distill/
when the script is run again after an interruption.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
from _common import RESULTS_DIR, ROOT, env_line, environment, write_json, write_section

BASELINE = ROOT / "src" / "slimdet" / "assets" / "yolo-s_digits-det.pt"
TARGET_RECOVERED = 0.5
#: ``--sweep``: the loss weightings compared on the val split (2 epochs) to choose DistillConfig's defaults
SWEEP = {  # the first seven ran before adapters could be fitted by least squares (random start); all but the
    # last two before layer-wise imitation existed (layers 0)
    "gains-1x": {"cls": 0.5, "box": 1.5, "feat": 1.0, "temperature": 2.0, "adapter_fit_batches": 0, "layers": 0.0},  # detection gains
    "feat-4": {"cls": 0.5, "box": 1.5, "feat": 4.0, "temperature": 2.0, "adapter_fit_batches": 0, "layers": 0.0},
    "T1-cls1": {"cls": 1.0, "box": 1.5, "feat": 1.0, "temperature": 1.0, "adapter_fit_batches": 0, "layers": 0.0},
    "T4-cls1": {"cls": 1.0, "box": 1.5, "feat": 1.0, "temperature": 4.0, "adapter_fit_batches": 0, "layers": 0.0},
    "gains-3x": {"cls": 1.5, "box": 4.5, "feat": 3.0, "temperature": 2.0, "adapter_fit_batches": 0, "layers": 0.0},
    "gains-6x": {"cls": 3.0, "box": 9.0, "feat": 6.0, "temperature": 2.0, "adapter_fit_batches": 0, "layers": 0.0},
    "gains-10x": {"cls": 5.0, "box": 15.0, "feat": 10.0, "temperature": 2.0, "adapter_fit_batches": 0, "layers": 0.0},
    "gains-3x-fit": {"cls": 1.5, "box": 4.5, "feat": 3.0, "temperature": 2.0, "adapter_fit_batches": 4, "layers": 0.0},
    "gains-3x-T1": {"cls": 1.5, "box": 4.5, "feat": 3.0, "temperature": 1.0, "adapter_fit_batches": 0, "layers": 0.0},
    "gains-3x-T4": {"cls": 1.5, "box": 4.5, "feat": 3.0, "temperature": 4.0, "adapter_fit_batches": 0, "layers": 0.0},
    "gains-3x-det0.5": {"det": 0.5, "cls": 1.5, "box": 4.5, "feat": 3.0, "temperature": 2.0, "adapter_fit_batches": 0, "layers": 0.0},
    "gains-3x-layers1": {"cls": 1.5, "box": 4.5, "feat": 3.0, "temperature": 2.0, "adapter_fit_batches": 0, "layers": 1.0},
    "gains-3x-layers3": {"cls": 1.5, "box": 4.5, "feat": 3.0, "temperature": 2.0, "adapter_fit_batches": 0, "layers": 3.0},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs of both runs")
    parser.add_argument("--macs-ratio", type=float, default=0.3, help="MACs kept by pruning")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_distill")
    parser.add_argument("--render-only", action="store_true", help="rewrite RESULTS.md from results/distill.json")
    parser.add_argument("--sweep", action="store_true",
                        help="instead: fine-tune 2 epochs with each weighting in SWEEP and compare on the val split")
    parser.add_argument("--only", choices=["plain", "distill"],
                        help="fine-tune only this contender and stop (to run the two in parallel processes; a run "
                             "without --only then finds both finished and writes the results)")  # fmt: skip
    args = parser.parse_args()
    name = "distill_sweep" if args.sweep else f"distill_e{args.epochs}"
    if args.render_only and args.sweep:
        write_section(name, render_sweep(json.loads((RESULTS_DIR / f"{name}.json").read_text())))
        return 0
    if args.render_only:
        write_section(name, render(json.loads((RESULTS_DIR / f"{name}.json").read_text())))
        return 0
    torch.set_num_threads(args.threads)
    if args.sweep:
        payload = sweep(args)
        write_json(name, payload)
        write_section(name, render_sweep(payload))
        print(render_sweep(payload))
        return 0
    payload = run(args)
    if args.only:
        return 0
    write_json(name, payload)
    text = render(payload)
    write_section(name, text)
    print(text)
    return 0


def run(args: argparse.Namespace) -> dict:
    from slimdet.compress import PruneConfig, prune
    from slimdet.compress.distill import DistillConfig, Distiller
    from slimdet.data import load_dataset, make_loader
    from slimdet.evaluate import evaluate
    from slimdet.io import save_checkpoint
    from slimdet.models import load_model
    from slimdet.profiling.macs import total_macs
    from slimdet.report import plots
    from slimdet.train import TrainConfig, train

    args.out.mkdir(parents=True, exist_ok=True)
    baseline, _ = load_model(BASELINE)
    baseline.eval()
    size = baseline.input_size
    train_ds = load_dataset("digits-det", "train", input_size=size, augment=True, cache_images=True)
    val_ds = load_dataset("digits-det", "val", input_size=size)
    test_ds = load_dataset("digits-det", "test", input_size=size)

    pruned_path = args.out / f"pruned_{args.macs_ratio}.pt"
    prune_cfg = PruneConfig(importance="taylor", macs_ratio=args.macs_ratio, allocation="sensitivity", round_to=8)
    if not pruned_path.is_file():
        torch.manual_seed(0)
        calib_ds = load_dataset("digits-det", "train", input_size=size).subset(128)
        calib = list(make_loader(calib_ds, batch_size=32, shuffle=False))
        model, _ = load_model(BASELINE)
        t0 = time.perf_counter()
        prune(model, prune_cfg, calib=calib, progress=True)
        print(f"pruned in {time.perf_counter() - t0:.0f} s")
        save_checkpoint(pruned_path, model_config=model.model_config, state_dict=model.state_dict())
    ft_cfg = TrainConfig(epochs=args.epochs, lr=1e-3, warmup_epochs=0.3, eval_every=0, seed=0)
    distill_cfg = DistillConfig()

    rows: dict[str, dict] = {}
    curves: dict[str, list] = {}
    for name in (args.only,) if args.only else ("plain", "distill"):
        model, _ = load_model(pruned_path)
        if "pruned" not in rows:
            rows["pruned"] = {"test_map50": evaluate(model, test_ds, progress=False).map50,
                              "macs": total_macs(model, model.example_inputs(1)),
                              "params": sum(p.numel() for p in model.parameters())}  # fmt: skip
        t0 = time.perf_counter()
        out = args.out / f"{name}_{args.macs_ratio}_e{args.epochs}"
        if name == "distill":  # one folder per distillation setting: a run with other defaults is never resumed
            key = hashlib.sha1(json.dumps(distill_cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
            out = out.with_name(f"{out.name}_{key[:8]}")
        if name == "plain":
            result = train(model, train_ds, val_ds, ft_cfg, out_dir=out, resume=True)
            adapters: list[str] = []
        else:
            with Distiller(model, baseline, distill_cfg) as distiller:
                result = train(model, train_ds, val_ds, ft_cfg, out_dir=out, resume=True, distiller=distiller)
                adapters = sorted(distiller.adapters.keys())
        curves[name] = result.loss_curve
        res = evaluate(model.eval(), test_ds, progress=False)
        rows[name] = {"test_map50": res.map50, "test_map": res.map, "finetune_s": time.perf_counter() - t0,
                      "epoch_s": [h["time_s"] for h in result.history], "adapters": adapters,
                      "final_epoch": result.history[-1]}  # fmt: skip
    base = evaluate(baseline, test_ds, progress=False)
    rows = {"baseline": {"test_map50": base.map50, "test_map": base.map,
                         "macs": total_macs(baseline, baseline.example_inputs(1)),
                         "params": sum(p.numel() for p in baseline.parameters())}, **rows}  # fmt: skip
    for name, curve in curves.items():
        png = plots.loss_terms(curve)
        if png is not None:
            (RESULTS_DIR / f"distill_e{args.epochs}_loss_terms_{name}.png").write_bytes(png)
    argv = f"benchmarks/bench_distill.py --epochs {args.epochs} --macs-ratio {args.macs_ratio} --threads {args.threads}"
    return {"command": argv, "epochs": args.epochs, "macs_ratio": args.macs_ratio, "test_images": len(test_ds),
            "prune": prune_cfg.model_dump(mode="json"), "finetune": ft_cfg.model_dump(mode="json"),
            "distill": distill_cfg.model_dump(mode="json"), "rows": rows, "loss_curves": curves,
            "environment": environment(threads=args.threads)}  # fmt: skip


def sweep(args: argparse.Namespace) -> dict:
    """Val-split mAP of the pruned model fine-tuned 2 epochs without and with each weighting in SWEEP."""
    from slimdet.compress.distill import DistillConfig, Distiller
    from slimdet.data import load_dataset
    from slimdet.evaluate import evaluate
    from slimdet.models import load_model
    from slimdet.train import TrainConfig, train

    pruned_path = args.out / f"pruned_{args.macs_ratio}.pt"
    if not pruned_path.is_file():
        raise SystemExit(f"{pruned_path} missing: run the benchmark without --sweep first (it prunes)")
    baseline, _ = load_model(BASELINE)
    baseline.eval()
    train_ds = load_dataset("digits-det", "train", input_size=baseline.input_size, augment=True, cache_images=True)
    val_ds = load_dataset("digits-det", "val", input_size=baseline.input_size)
    cfg = TrainConfig(epochs=2, lr=1e-3, warmup_epochs=0.3, eval_every=0, seed=0)
    rows: dict[str, dict] = {"baseline": {"val_map50": evaluate(baseline, val_ds, progress=False).map50}}
    for key, weights in {"plain": None, **SWEEP}.items():
        model, _ = load_model(pruned_path)
        out = args.out / f"plain_{args.macs_ratio}_e2" if weights is None else args.out / "sweep" / key
        if weights is None:
            train(model, train_ds, val_ds, cfg, out_dir=out, resume=True)
        else:
            with Distiller(model, baseline, DistillConfig(**weights)) as distiller:
                train(model, train_ds, val_ds, cfg, out_dir=out, resume=True, distiller=distiller)
        res = evaluate(model.eval(), val_ds, progress=False)
        rows[key] = {"weights": weights, "val_map50": res.map50, "val_map": res.map}
        print(key, rows[key], flush=True)
    argv = f"benchmarks/bench_distill.py --sweep --macs-ratio {args.macs_ratio} --threads {args.threads}"
    return {"command": argv, "macs_ratio": args.macs_ratio, "val_images": len(val_ds), "rows": rows,
            "finetune": cfg.model_dump(mode="json"), "environment": environment(threads=args.threads)}  # fmt: skip


def render_sweep(payload: dict) -> str:
    rows = payload["rows"]
    base, plain = rows["baseline"]["val_map50"], rows["plain"]["val_map50"]
    lines = [
        "## Distillation: choosing the default loss weights on the val split (issue 7)",
        "",
        f"Command: `.venv/bin/python {payload['command']}`. The pruned model of the sections below (30% of the MACs) "
        "fine-tuned for 2 epochs (same settings and data order) with each weighting; mAP on the "
        f"{payload['val_images']}-image **val** split (the test split is not used to choose). Baseline (teacher): "
        f"{base:.4f}; fine-tuned without distillation: {plain:.4f}.",
        "",
        "| weighting | det | cls | box | feat | T | layers | adapters start | val mAP@.5 | "
        "share of the lost mAP recovered | val mAP@[.5:.95] |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    best = max((k for k in rows if k not in ("baseline", "plain")), key=lambda k: rows[k]["val_map50"])
    for key, r in rows.items():
        if key in ("baseline", "plain"):
            continue
        w = r["weights"]
        share = (r["val_map50"] - plain) / (base - plain) if base > plain else float("nan")
        name = f"**{key}**" if key == best else key
        start = f"least squares, {w['adapter_fit_batches']} batches" if w.get("adapter_fit_batches") else "random"
        lines.append(f"| {name} | {w.get('det', 1.0)} | {w['cls']} | {w['box']} | {w['feat']} | {w['temperature']} | "
                     f"{w.get('layers', 0.0)} | {start} | "
                     f"{r['val_map50']:.4f} | "
                     f"{share:.0%} | {r['val_map']:.4f} |")  # fmt: skip
    lines += ["", f"Chosen as `DistillConfig`'s defaults: {best} (the highest val mAP@.5)."]
    earlier = []
    for path in sorted(RESULTS_DIR.glob("distill_e*_gains1x.json")):  # the test runs made before this choice
        old = json.loads(path.read_text())
        share = recovered(old["rows"])
        earlier.append(f"{old['epochs']} epochs: {old['rows']['distill']['test_map50']:.4f} vs "
                       f"{old['rows']['plain']['test_map50']:.4f} without, {share:.0%} recovered")  # fmt: skip
    if earlier:
        lines.append("Before the sweep, the test benchmarks ran with the gains-1x weights (`benchmarks/results/"
                     f"distill_e*_gains1x.json`): {'; '.join(earlier)}.")  # fmt: skip
    lines += ["",
              f"Environment: {env_line(payload['environment'])}. Raw numbers: `benchmarks/results/distill_sweep.json`."]
    return "\n".join(lines)


def recovered(rows: dict) -> float | None:
    """Share of the mAP@.5 lost without distillation that distillation gets back (None: nothing lost)."""
    lost = rows["baseline"]["test_map50"] - rows["plain"]["test_map50"]
    if lost <= 0:
        return None
    return (rows["distill"]["test_map50"] - rows["plain"]["test_map50"]) / lost


def render(payload: dict) -> str:
    rows = payload["rows"]
    base = rows["baseline"]
    d = payload["distill"]
    lines = [
        f"## Distillation: a pruned yolo-s fine-tuned {payload['epochs']} epochs with and without the original "
        "as teacher (issue 7)",
        "",
        f"Command: `.venv/bin/python {payload['command']}`. The shipped baseline pruned to "
        f"{payload['macs_ratio']:.0%} of its MACs (bench_prune's slimdet settings: Taylor importance, sensitivity "
        f"allocation, round to 8), then fine-tuned for {payload['epochs']} epochs twice with the same settings and data "
        "order (AdamW lr 1e-3, cosine, EMA, warm-up 0.3 epochs, seed 0): on the detection loss alone, and with "
        f"distillation from the baseline (the defaults then: det {d['det']}, cls {d['cls']}, box {d['box']}, feat "
        f"{d['feat']}, layers {d.get('layers', 0.0):g}, temperature {d['temperature']}). mAP on the "
        f"{payload['test_images']:,}-image test split.",
        "",
        "| model | params | MACs | test mAP@.5 | Δ vs baseline (points) | mAP@[.5:.95] | fine-tuning time |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in ("baseline", "pruned", "plain", "distill"):
        r = rows[key]
        label = {"baseline": "baseline (teacher)", "pruned": "pruned, before fine-tuning",
                 "plain": "fine-tuned, detection loss only", "distill": "fine-tuned with distillation"}[key]  # fmt: skip
        macs = f"{r['macs'] / 1e6:.1f} M" if "macs" in r else "same as pruned"
        params = f"{r['params']:,}" if "params" in r else "same as pruned"
        mapall = f"{r['test_map']:.4f}" if "test_map" in r else "–"
        ft = f"{sum(r['epoch_s']) / 60:.1f} min" if "epoch_s" in r else "–"  # the epochs' own time (resumes excluded)
        lines.append(f"| {label} | {params} | {macs} | {r['test_map50']:.4f} | "
                     f"{100 * (r['test_map50'] - base['test_map50']):+.2f} | {mapall} | {ft} |")  # fmt: skip
    share = recovered(rows)
    lost = 100 * (base["test_map50"] - rows["plain"]["test_map50"])
    if share is None:
        verdict = f"fine-tuning without distillation lost nothing ({-lost:+.2f} points), so there was nothing to recover"
    else:
        met = "met" if share >= TARGET_RECOVERED else "**missed**"
        verdict = (f"without distillation {lost:.2f} points of mAP@.5 stay lost; distillation recovers "
                   f"{share:.0%} of them (target >= {TARGET_RECOVERED:.0%}: {met})")  # fmt: skip
    final = rows["distill"]["final_epoch"]
    terms = ", ".join(f"{k[6:]} {final[k]:.3f}" for k in final if k.startswith("train_"))
    lines += [
        "",
        f"- {verdict}.",
        f"- The default weights score highest of the {len(SWEEP)} weightings tried on the val split (section "
        "\"choosing the default loss weights\", `--sweep`); the test split was not used to choose.",
        f"- Feature adapters (1x1 convs to the teacher's width) at levels {rows['distill']['adapters'] or 'none'}; "
        f"last-epoch mean loss terms with distillation: {terms}. Every term per window of steps: "
        f"`benchmarks/results/distill_e{payload['epochs']}_loss_terms_distill.png` (and `_plain.png`).",
        "",
        f"Environment: {env_line(payload['environment'])}. Raw numbers: "
        f"`benchmarks/results/distill_e{payload['epochs']}.json`.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
