"""Fine-tuning a pruned yolo-s with and without distillation from the original, side by side (issue 7).

    .venv/bin/python benchmarks/bench_distill.py [--epochs 2] [--macs-ratio 0.3] [--threads 1] [--seeds 1] [--lr 1e-3]
    .venv/bin/python benchmarks/bench_distill.py --sweep     # how the default loss weights were chosen (val split)
    .venv/bin/python benchmarks/bench_distill.py --lr-sweep --epochs 1   # how --lr was chosen (val split)

The shipped baseline is pruned to ``--macs-ratio`` of its MACs with bench_prune's slimdet settings
(Taylor importance, sensitivity allocation, channels rounded to 8, 128 calibration images), then
the same pruned model is fine-tuned twice for ``--epochs`` epochs with the same settings (AdamW lr
``--lr``, cosine, EMA, warm-up 0.3 epochs, seed 0, the same data order): once on the detection loss
alone, once with slimdet.compress.distill and its default weights, the baseline as the teacher.
``--lr-sweep`` fine-tunes both contenders at every learning rate of LR_GRID and scores them on the val split;
the shared learning rate is the one at which fine-tuning *without* distillation scores highest there (the
baseline gets its best setting; results: distill_lr_e<epochs>.json).
With ``--seeds N`` each contender is fine-tuned with seeds 0..N-1 (data order and augmentation) and the
means are compared (results: distill_e<epochs>_s<N>.json); ``--only plain|distill --only-seeds 1,3`` trains
some of them in another process first. Reports test-split mAP@.5 of the baseline, the pruned model before fine-tuning and both
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
from typing import Any

import torch
from _common import RESULTS_DIR, ROOT, env_line, environment, write_json, write_section

BASELINE = ROOT / "src" / "slimdet" / "assets" / "yolo-s_digits-det.pt"
TARGET_RECOVERED = 0.5
#: ``--lr-sweep``: the learning rates both contenders are fine-tuned with on the val split
LR_GRID = (3e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2)
#: the learning rate of the runs before ``--lr`` existed (their folders and result files carry no lr in the name)
OLD_LR = 1e-3
#: ``--sweep``: the loss weightings compared on the val split (2 epochs) to choose DistillConfig's defaults
OLD = {"assign": "student", "reconstruct_batches": 0}  # the settings before these two options existed
SWEEP = {  # the first seven ran before adapters could be fitted by least squares (random start); all but the
    # last two before layer-wise imitation existed (layers 0)
    "gains-1x": {"cls": 0.5, "box": 1.5, "feat": 1.0, "temperature": 2.0, "adapter_fit_batches": 0, "layers": 0.0, **OLD},  # detection gains
    "feat-4": {"cls": 0.5, "box": 1.5, "feat": 4.0, "temperature": 2.0, "adapter_fit_batches": 0, "layers": 0.0, **OLD},
    "T1-cls1": {"cls": 1.0, "box": 1.5, "feat": 1.0, "temperature": 1.0, "adapter_fit_batches": 0, "layers": 0.0, **OLD},
    "T4-cls1": {"cls": 1.0, "box": 1.5, "feat": 1.0, "temperature": 4.0, "adapter_fit_batches": 0, "layers": 0.0, **OLD},
    "gains-3x": {"cls": 1.5, "box": 4.5, "feat": 3.0, "temperature": 2.0, "adapter_fit_batches": 0, "layers": 0.0, **OLD},
    "gains-6x": {"cls": 3.0, "box": 9.0, "feat": 6.0, "temperature": 2.0, "adapter_fit_batches": 0, "layers": 0.0, **OLD},
    "gains-10x": {"cls": 5.0, "box": 15.0, "feat": 10.0, "temperature": 2.0, "adapter_fit_batches": 0, "layers": 0.0, **OLD},
    "gains-3x-fit": {"cls": 1.5, "box": 4.5, "feat": 3.0, "temperature": 2.0, "adapter_fit_batches": 4, "layers": 0.0, **OLD},
    "gains-3x-T1": {"cls": 1.5, "box": 4.5, "feat": 3.0, "temperature": 1.0, "adapter_fit_batches": 0, "layers": 0.0, **OLD},
    "gains-3x-T4": {"cls": 1.5, "box": 4.5, "feat": 3.0, "temperature": 4.0, "adapter_fit_batches": 0, "layers": 0.0, **OLD},
    "gains-3x-det0.5": {"det": 0.5, "cls": 1.5, "box": 4.5, "feat": 3.0, "temperature": 2.0, "adapter_fit_batches": 0, "layers": 0.0, **OLD},
    "gains-3x-layers1": {"cls": 1.5, "box": 4.5, "feat": 3.0, "temperature": 2.0, "adapter_fit_batches": 0, "layers": 1.0, **OLD},
    "gains-3x-layers3": {"cls": 1.5, "box": 4.5, "feat": 3.0, "temperature": 2.0, "adapter_fit_batches": 0, "layers": 3.0, **OLD},
    "layers1-assignT": {"cls": 1.5, "box": 4.5, "feat": 3.0, "temperature": 2.0, "adapter_fit_batches": 0, "layers": 1.0,
                        "assign": "teacher", "reconstruct_batches": 0},
    "layers1-recon4": {"cls": 1.5, "box": 4.5, "feat": 3.0, "temperature": 2.0, "adapter_fit_batches": 0, "layers": 1.0,
                       "assign": "student", "reconstruct_batches": 4},
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
    parser.add_argument("--lr", type=float, default=OLD_LR,
                        help="fine-tuning learning rate of both contenders (chosen by --lr-sweep: see RESULTS.md)")
    parser.add_argument("--lr-sweep", action="store_true",
                        help="instead: fine-tune both contenders --epochs epochs at every rate of LR_GRID, val split")
    parser.add_argument("--seeds", type=int, default=1,
                        help="fine-tune each contender with seeds 0..N-1 (data order, augmentation) and average")
    parser.add_argument("--only-seeds", type=lambda v: [int(x) for x in v.split(",")],
                        help="with --only: train just these seeds (comma list), e.g. to split seeds over processes")
    parser.add_argument("--only", choices=["plain", "distill"],
                        help="fine-tune only this contender and stop (to run the two in parallel processes; a run "
                             "without --only then finds both finished and writes the results)")  # fmt: skip
    args = parser.parse_args()
    if args.sweep and args.only:
        parser.error("--only splits the test runs and --lr-sweep, not --sweep")
    if args.sweep:  # the mode: its result name, what computes the payload and what renders it
        name, compute, renderer = "distill_sweep", sweep, render_sweep
    elif args.lr_sweep:
        name, compute, renderer = f"distill_lr_e{args.epochs}", lr_sweep, render_lr_sweep
    else:
        name = f"distill_e{args.epochs}" + (f"_s{args.seeds}" if args.seeds > 1 else "") + lr_suffix(args.lr)
        compute, renderer = run, render
    if args.render_only:
        write_section(name, renderer(json.loads((RESULTS_DIR / f"{name}.json").read_text())))
        return 0
    torch.set_num_threads(args.threads)
    args.name = name
    payload = compute(args)
    if args.only:  # one contender trained: a run without --only writes the results
        return 0
    write_json(name, payload)
    text = renderer(payload)
    write_section(name, text)
    print(text)
    return 0


def run(args: argparse.Namespace) -> dict:
    from slimdet.compress import PruneConfig, prune
    from slimdet.compress.distill import DistillConfig
    from slimdet.data import load_dataset, make_loader
    from slimdet.evaluate import evaluate
    from slimdet.io import save_checkpoint
    from slimdet.models import load_model
    from slimdet.profiling.macs import total_macs
    from slimdet.report import plots
    from slimdet.train import TrainConfig

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
    ft_cfg = TrainConfig(epochs=args.epochs, lr=args.lr, warmup_epochs=0.3, eval_every=0, seed=0)
    distill_cfg = DistillConfig()

    rows: dict[str, dict] = {}
    curves: dict[str, list] = {}
    seeds = args.only_seeds if args.only and args.only_seeds else list(range(args.seeds))
    # one folder per distillation setting: a run with other defaults is never resumed
    key = hashlib.sha1(json.dumps(distill_cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:8]
    for name in (args.only,) if args.only else ("plain", "distill"):
        for seed in seeds:
            model, _ = load_model(pruned_path)
            if "pruned" not in rows:
                rows["pruned"] = {"test_map50": evaluate(model, test_ds, progress=False).map50,
                                  "macs": total_macs(model, model.example_inputs(1)),
                                  "params": sum(p.numel() for p in model.parameters())}  # fmt: skip
            kept = args.out / f"reconstructed_{args.macs_ratio}_{key}.json"  # measured once per setting
            if name == "distill" and distill_cfg.reconstruct_batches and not kept.is_file():
                kept.write_text(json.dumps(reconstructed_map(model, baseline, distill_cfg, train_ds, test_ds, ft_cfg)))
            if name == "distill" and kept.is_file():
                rows["reconstructed"] = json.loads(kept.read_text())
            cfg = ft_cfg.model_copy(update={"seed": seed})
            out = args.out / f"{name}_{args.macs_ratio}_e{args.epochs}{lr_suffix(args.lr)}"
            if name == "distill":
                out = out.with_name(f"{out.name}_{key}")
            if seed:  # seed 0 keeps the folder names of the single-seed runs
                out = out.with_name(f"{out.name}_s{seed}")
            result, adapters = finetune(model, baseline, distill_cfg if name == "distill" else None, train_ds, val_ds,
                                        cfg, out)  # fmt: skip
            scored = out / "bench_test.json"  # the test mAP of the finished run, kept: rerunning only rescores nothing
            if not scored.is_file():
                res = evaluate(model.eval(), test_ds, progress=False)
                scored.write_text(json.dumps({"test_map50": res.map50, "test_map": res.map}))
            score = json.loads(scored.read_text())
            row = rows.setdefault(name, {"per_seed": [], "per_seed_map": [], "seeds": []})
            row["per_seed"].append(score["test_map50"])
            row["per_seed_map"].append(score["test_map"])
            row["seeds"].append(seed)
            if seed == seeds[0]:  # timing, loss terms and curves: of the first seed's run
                curves[name] = result.loss_curve
                row.update({"epoch_s": [h["time_s"] for h in result.history],  # the epochs themselves, not a resume
                            "adapters": adapters, "final_epoch": result.history[-1]})  # fmt: skip
        row = rows[name]
        row["test_map50"] = sum(row["per_seed"]) / len(row["per_seed"])
        row["test_map"] = sum(row["per_seed_map"]) / len(row["per_seed_map"])
    base = evaluate(baseline, test_ds, progress=False)
    rows = {"baseline": {"test_map50": base.map50, "test_map": base.map,
                         "macs": total_macs(baseline, baseline.example_inputs(1)),
                         "params": sum(p.numel() for p in baseline.parameters())}, **rows}  # fmt: skip
    for name, curve in curves.items():
        png = plots.loss_terms(curve)
        if png is not None:
            (RESULTS_DIR / f"{args.name}_loss_terms_{name}.png").write_bytes(png)
    argv = f"benchmarks/bench_distill.py --epochs {args.epochs} --macs-ratio {args.macs_ratio} --threads {args.threads}"
    if args.seeds > 1:
        argv += f" --seeds {args.seeds}"
    if args.lr != OLD_LR:
        argv += f" --lr {args.lr:g}"
    return {"command": argv, "epochs": args.epochs, "seeds": seeds, "macs_ratio": args.macs_ratio, "test_images": len(test_ds),
            "prune": prune_cfg.model_dump(mode="json"), "finetune": ft_cfg.model_dump(mode="json"),
            "distill": distill_cfg.model_dump(mode="json"), "rows": rows, "loss_curves": curves,
            "environment": environment(threads=args.threads)}  # fmt: skip


def epochs_text(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"


def lr_suffix(lr: float) -> str:
    """``_lr<lr>`` in run folders and result names; none for the runs made before ``--lr`` existed."""
    return "" if lr == OLD_LR else f"_lr{lr:g}"


def finetune(model, teacher, distill_cfg, train_ds, val_ds, cfg, out: Path) -> tuple[Any, list[str]]:  # noqa: ANN001
    """Fine-tune ``model`` in ``out`` (resumed when a run is there): on the detection loss alone when
    ``distill_cfg`` is None, else distilling from ``teacher``. Returns the TrainResult and the adapters' levels."""
    from slimdet.compress.distill import Distiller
    from slimdet.train import train

    if distill_cfg is None:
        return train(model, train_ds, val_ds, cfg, out_dir=out, resume=True), []
    with Distiller(model, teacher, distill_cfg) as distiller:
        result = train(model, train_ds, val_ds, cfg, out_dir=out, resume=True, distiller=distiller)
        return result, sorted(distiller.adapters.keys())


def val_setup(args: argparse.Namespace, flag: str) -> tuple[Path, Any, Any, Any]:
    """The sweeps' inputs: the pruned checkpoint (made by a test run first), the baseline, train and val splits."""
    from slimdet.data import load_dataset
    from slimdet.models import load_model

    pruned_path = args.out / f"pruned_{args.macs_ratio}.pt"
    if not pruned_path.is_file():
        raise SystemExit(f"{pruned_path} missing: run the benchmark without {flag} first (it prunes)")
    baseline, _ = load_model(BASELINE)
    baseline.eval()
    train_ds = load_dataset("digits-det", "train", input_size=baseline.input_size, augment=True, cache_images=True)
    val_ds = load_dataset("digits-det", "val", input_size=baseline.input_size)
    return pruned_path, baseline, train_ds, val_ds


def reconstructed_map(model, teacher, distill_cfg, train_ds, test_ds, ft_cfg) -> dict:  # noqa: ANN001
    """Test mAP of a copy of the pruned model after the distiller's closed-form reconstruction alone, on the
    first ``reconstruct_batches`` batches of a loader like fine-tuning's (its own random stream: not
    necessarily the very batches the fine-tuning run starts with)."""
    import copy

    from slimdet.compress.distill import Distiller
    from slimdet.data import make_loader
    from slimdet.evaluate import evaluate

    copied = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ft_cfg.seed)
        loader = make_loader(train_ds, batch_size=ft_cfg.batch_size, shuffle=True, seed=ft_cfg.seed, drop_last=True)
        t0 = time.perf_counter()
        with Distiller(copied, teacher, distill_cfg) as distiller:
            distiller.prepare(copied, loader)
            residuals = distiller.reconstruction
        seconds = time.perf_counter() - t0
    res = evaluate(copied.eval(), test_ds, progress=False)
    before = sum(b for b, _ in residuals.values()) / max(len(residuals), 1)
    after = sum(a for _, a in residuals.values()) / max(len(residuals), 1)
    return {"test_map50": res.map50, "test_map": res.map, "seconds": seconds, "layers": len(residuals),
            "mean_residual_before": before, "mean_residual_after": after}


def sweep(args: argparse.Namespace) -> dict:
    """Val-split mAP of the pruned model fine-tuned 2 epochs without and with each weighting in SWEEP."""
    from slimdet.compress.distill import DistillConfig
    from slimdet.evaluate import evaluate
    from slimdet.models import load_model
    from slimdet.train import TrainConfig

    pruned_path, baseline, train_ds, val_ds = val_setup(args, "--sweep")
    cfg = TrainConfig(epochs=2, lr=1e-3, warmup_epochs=0.3, eval_every=0, seed=0)
    rows: dict[str, dict] = {"baseline": {"val_map50": evaluate(baseline, val_ds, progress=False).map50}}
    for key, weights in {"plain": None, **SWEEP}.items():
        model, _ = load_model(pruned_path)
        out = args.out / f"plain_{args.macs_ratio}_e2" if weights is None else args.out / "sweep" / key
        finetune(model, baseline, None if weights is None else DistillConfig(**weights), train_ds, val_ds, cfg, out)
        res = evaluate(model.eval(), val_ds, progress=False)
        rows[key] = {"weights": weights, "val_map50": res.map50, "val_map": res.map}
        print(key, rows[key], flush=True)
    argv = f"benchmarks/bench_distill.py --sweep --macs-ratio {args.macs_ratio} --threads {args.threads}"
    return {"command": argv, "macs_ratio": args.macs_ratio, "val_images": len(val_ds), "rows": rows,
            "finetune": cfg.model_dump(mode="json"), "environment": environment(threads=args.threads)}  # fmt: skip


def lr_sweep(args: argparse.Namespace) -> dict:
    """Val-split mAP of the pruned model fine-tuned ``--epochs`` epochs without and with distillation (the
    defaults) at every learning rate of LR_GRID; the chosen rate is plain fine-tuning's best."""
    from slimdet.compress.distill import DistillConfig
    from slimdet.evaluate import evaluate
    from slimdet.models import load_model
    from slimdet.train import TrainConfig

    pruned_path, baseline, train_ds, val_ds = val_setup(args, "--lr-sweep")
    distill_cfg = DistillConfig()
    rows: dict[str, dict] = {"baseline": {"val_map50": evaluate(baseline, val_ds, progress=False).map50}}
    for kind in (args.only,) if args.only else ("plain", "distill"):
        for lr in LR_GRID:
            cfg = TrainConfig(epochs=args.epochs, lr=lr, warmup_epochs=0.3, eval_every=0, seed=0)
            out = args.out / "lr" / f"{kind}_e{args.epochs}_lr{lr:g}"
            scored = out / "bench_val.json"  # the val mAP of the finished run, kept
            if not scored.is_file():
                model, _ = load_model(pruned_path)
                try:
                    finetune(model, baseline, distill_cfg if kind == "distill" else None, train_ds, val_ds, cfg, out)
                except FloatingPointError as exc:  # too high a rate: the loss became nan, kept as a result
                    scored.write_text(json.dumps({"val_map50": None, "val_map": None, "diverged": str(exc)}))
                else:
                    res = evaluate(model.eval(), val_ds, progress=False)
                    scored.write_text(json.dumps({"val_map50": res.map50, "val_map": res.map}))
            rows.setdefault(f"{lr:g}", {"lr": lr})[kind] = json.loads(scored.read_text())
            print(kind, f"lr {lr:g}", rows[f"{lr:g}"][kind], flush=True)
    argv = f"benchmarks/bench_distill.py --lr-sweep --epochs {args.epochs} --macs-ratio {args.macs_ratio} " \
           f"--threads {args.threads}"  # fmt: skip
    return {"command": argv, "epochs": args.epochs, "macs_ratio": args.macs_ratio, "val_images": len(val_ds),
            "grid": list(LR_GRID), "rows": rows, "distill": distill_cfg.model_dump(mode="json"),
            "environment": environment(threads=args.threads)}  # fmt: skip


def chosen_lr(payload: dict) -> float:
    """The rate at which fine-tuning without distillation scores highest on the val split (the lower on a tie)."""
    rates = [r for k, r in payload["rows"].items() if k != "baseline" and r["plain"]["val_map50"] is not None]
    return max(sorted(rates, key=lambda r: r["lr"]), key=lambda r: r["plain"]["val_map50"])["lr"]


def render_lr_sweep(payload: dict) -> str:
    rows = payload["rows"]
    base = rows["baseline"]["val_map50"]
    best = chosen_lr(payload)
    lines = [
        f"## Distillation: choosing the fine-tuning learning rate on the val split ({epochs_text(payload['epochs'])}, "
        "issue 7)",
        "",
        f"Command: `.venv/bin/python {payload['command']}`. The pruned model of the sections around (30% of the "
        f"MACs) fine-tuned for {epochs_text(payload['epochs'])} (AdamW, cosine, EMA, warm-up 0.3 epochs, seed 0) at each "
        "learning rate, without and with distillation (the default `DistillConfig`); mAP@.5 on the "
        f"{payload['val_images']}-image **val** split. Baseline (teacher): {base:.4f}. The rate both contenders "
        "then share on the test split is the one at which fine-tuning **without** distillation scores highest "
        "(the comparison gives the baseline its best setting).",
        "",
        "| lr | without distillation | with distillation | share of the lost mAP recovered |",
        "|---|---|---|---|",
    ]
    for key, r in rows.items():
        if key == "baseline":
            continue
        plain, dist = r["plain"]["val_map50"], r["distill"]["val_map50"]
        known = plain is not None and dist is not None
        share = f"{(dist - plain) / (base - plain):.0%}" if known and base > plain else "n/a"
        mark = "**" if r["lr"] == best else ""
        cells = [f"{m:.4f}" if m is not None else "diverged (loss nan)" for m in (plain, dist)]
        lines.append(f"| {mark}{key}{mark} | {cells[0]} | {cells[1]} | {share} |")
    lines += ["", f"Chosen: lr {best:g} (`--lr {best:g}`).", "",
              f"Environment: {env_line(payload['environment'])}. Raw numbers: "
              f"`benchmarks/results/distill_lr_e{payload['epochs']}.json`."]  # fmt: skip
    return "\n".join(lines)


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
        "| weighting | det | cls | box | feat | T | layers | adapters start | assigned by | reconstruction | "
        "val mAP@.5 | share of the lost mAP recovered | val mAP@[.5:.95] |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
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
                     f"{w.get('layers', 0.0)} | {start} | {w.get('assign', 'student')} | "
                     f"{(str(w['reconstruct_batches']) + ' batches') if w.get('reconstruct_batches') else 'none'} | "
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


def val_share(distill: dict) -> str:
    """``; there ... they recover N%`` from the sweep's results, for the row of the settings ``distill``; '' if
    the sweep has no such row."""
    path = RESULTS_DIR / "distill_sweep.json"
    if not path.is_file():
        return ""
    rows = json.loads(path.read_text())["rows"]
    base, plain = rows["baseline"]["val_map50"], rows["plain"]["val_map50"]
    known = {**OLD, **distill}  # results written before these options existed ran without them
    for r in rows.values():
        if r.get("weights") and all(known.get(k, v) == v for k, v in r["weights"].items()) and base > plain:
            return f"; there, at 2 epochs, lr 0.001 and seed 0, they recover {(r['val_map50'] - plain) / (base - plain):.0%}"
    return ""


def lr_note(payload: dict) -> str:
    """Where the learning rate of a test run came from, if the val-split rate sweep chose it."""
    lr = payload.get("finetune", {}).get("lr", OLD_LR)
    for path in sorted(RESULTS_DIR.glob("distill_lr_e*.json")):
        sweep = json.loads(path.read_text())
        if chosen_lr(sweep) == lr:
            return (f"; the rate at which fine-tuning without distillation scored highest on the val split, "
                    f"section \"choosing the fine-tuning learning rate\", {epochs_text(sweep['epochs'])}")
    return ""


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
    seeds = payload.get("seeds", [0])
    lr = payload.get("finetune", {}).get("lr", OLD_LR)
    stem = f"distill_e{payload['epochs']}" + (f"_s{len(seeds)}" if len(seeds) > 1 else "") + lr_suffix(lr)
    lines = [
        f"## Distillation: a pruned yolo-s fine-tuned {epochs_text(payload['epochs'])}"
        f"{f' at lr {lr:g}' if lr != OLD_LR else ''} with and without the original "
        f"as teacher{f', {len(seeds)} seeds' if len(seeds) > 1 else ''} (issue 7)",
        "",
        f"Command: `.venv/bin/python {payload['command']}`. The shipped baseline pruned to "
        f"{payload['macs_ratio']:.0%} of its MACs (bench_prune's slimdet settings: Taylor importance, sensitivity "
        f"allocation, round to 8), then fine-tuned for {epochs_text(payload['epochs'])} twice with the same settings and data "
        f"order (AdamW lr {lr:g}, cosine, EMA, warm-up 0.3 epochs, seed 0"
        f"{lr_note(payload)}): on the detection loss alone, and with "
        f"distillation from the baseline (the defaults then: det {d['det']}, cls {d['cls']}, box {d['box']}, feat "
        f"{d['feat']}, layers {d.get('layers', 0.0):g}, temperature {d['temperature']}, targets assigned by the "
        f"{d.get('assign', 'student')}, reconstruction on {d.get('reconstruct_batches', 0)} batches). mAP on the "
        f"{payload['test_images']:,}-image test split."
        + (f" Each contender is fine-tuned {len(seeds)} times, with seeds {seeds} (`TrainConfig.seed`: data order "
           "and augmentation; the same seeds for both); the table gives the mean over the seeds, times and loss "
           "terms are of the first seed's run." if len(seeds) > 1 else ""),
        "",
        "| model | params | MACs | test mAP@.5 | Δ vs baseline (points) | mAP@[.5:.95] | fine-tuning time |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in ("baseline", "pruned", "reconstructed", "plain", "distill"):
        if key not in rows:
            continue
        r = rows[key]
        label = {"baseline": "baseline (teacher)", "pruned": "pruned, before fine-tuning",
                 "reconstructed": "pruned + reconstruction from the teacher (distillation's first step), before "
                                  "fine-tuning",
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
        gap = 100 * (rows["distill"]["test_map50"] - rows["plain"]["test_map50"])
        verdict = (f"fine-tuning without distillation lost nothing ({-lost:+.2f} points vs the teacher), so there was "
                   f"nothing to recover; with distillation the student scores {abs(gap):.2f} points "
                   f"{'higher' if gap >= 0 else 'lower'} than without")  # fmt: skip
    else:
        met = "met" if share >= TARGET_RECOVERED else "**missed**"
        verdict = (f"without distillation {lost:.2f} points of mAP@.5 stay lost; distillation recovers "
                   f"{share:.1%} of them (target >= {TARGET_RECOVERED:.0%}: {met})")  # fmt: skip
    final = rows["distill"]["final_epoch"]
    terms = ", ".join(f"{k[6:]} {final[k]:.3f}" for k in final if k.startswith("train_"))
    recon = []
    if "reconstructed" in rows:
        r = rows["reconstructed"]
        recon = [f"- Distillation starts with the closed-form reconstruction (`DistillConfig.reconstruct_batches` = "
                 f"{d['reconstruct_batches']}): {r['layers']} conv layers refitted to the teacher's outputs in "
                 f"{r['seconds']:.0f} s, mean relative residual {r['mean_residual_before']:.3f} -> "
                 f"{r['mean_residual_after']:.3f}; on its own it lifts the pruned model's test mAP@.5 from "
                 f"{rows['pruned']['test_map50']:.4f} to {r['test_map50']:.4f} before any gradient step (measured on a "
                 "copy; the fine-tuning run repeats it on its own first batches and its time is in the fine-tuning "
                 "time)."]  # fmt: skip
    per_seed = []
    if len(seeds) > 1:
        pairs = list(zip(rows["plain"]["per_seed"], rows["distill"]["per_seed"], strict=True))
        each = ", ".join(f"seed {k}: {dm:.4f} vs {pm:.4f} ({(dm - pm) / (base['test_map50'] - pm):.1%})"
                         for k, (pm, dm) in zip(seeds, pairs, strict=True))  # fmt: skip
        wins = sum(dm > pm for pm, dm in pairs)
        reached = sum((dm - pm) / (base["test_map50"] - pm) >= TARGET_RECOVERED for pm, dm in pairs)
        per_seed = [f"- Per seed, with distillation vs without (share recovered): {each}; distillation higher in "
                    f"{wins} of {len(pairs)}, the share at or above {TARGET_RECOVERED:.0%} in {reached} of "
                    f"{len(pairs)} (the target is on the mean)."]  # fmt: skip
    lines += [
        "",
        f"- {verdict}.",
        *per_seed,
        *recon,
        f"- The default weights score highest of the {len(SWEEP)} weightings tried on the val split (section "
        f"\"choosing the default loss weights\", `--sweep`{val_share(d)}); the test split was not used to choose.",
        f"- Feature adapters (1x1 convs to the teacher's width) at levels {rows['distill']['adapters'] or 'none'}; "
        f"last-epoch mean loss terms with distillation: {terms}. Every term per window of steps: "
        f"`benchmarks/results/{stem}_loss_terms_distill.png` (and `_plain.png`).",
        "",
        f"Environment: {env_line(payload['environment'])}. Raw numbers: "
        f"`benchmarks/results/{stem}.json`.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
