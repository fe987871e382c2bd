"""Meta-learned initialization (Reptile) vs union pretraining vs random init, on a held-out task (issue 7).

    .venv/bin/python benchmarks/bench_metainit.py [--target 0.5] [--meta-iters 300] [--out runs/bench_metainit]

Three starts of the same compact model (yolo-n, 160 px, 3 classes) adapt to a task held out of
meta-training: digits 7, 8 and 9 of digits-det at scale 1.0 in colour (other digits in the images stay
unlabelled). The starts:

- reptile: ``run_metainit`` over tasks of 3 of the digits 0-6 (labels in random order), zoom-out
  scales 0.6 / 0.8 / 1.0, colour or grey (held-out digits in those images painted over with mid-grey,
  so meta-training never sees them);
- union: ``pretrain_union`` with the same tasks, images and number of gradient steps, one Adam that is
  never reset, no meta-update;
- random: ``create_model`` with a fixed seed.

reptile and union enter the 3-class model with ``init_from`` (every class row = the mean meta row).
Each start is fine-tuned by ``adapt`` with the same images, order, steps, Adam learning rate and seed,
and scored (mAP@.5, COCO) every ``--eval-every`` steps on the validation images holding a 7, 8 or 9.
The target mAP@.5 (``--target``, default 0.5) is fixed before the run; the acceptance asks for
reptile's steps-to-target to be at most 0.5x union's and random's. Writes
benchmarks/results/metainit.json, benchmarks/results/metainit_curves.png and the "metainit" section
of benchmarks/RESULTS.md. Checkpoints and curves stay under ``--out``, so a rerun skips finished parts.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from _common import RESULTS_DIR, ROOT, env_line, environment, write_json, write_section

HELD_OUT = (7, 8, 9)
PLOT = RESULTS_DIR / "metainit_curves.png"
STARTS = ("reptile", "union", "random")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.5, help="mAP@.5 to reach (state it before the run)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--model", default="yolo-n")
    parser.add_argument("--meta-iters", type=int, default=300)
    parser.add_argument("--inner-steps", type=int, default=4)
    parser.add_argument("--meta-batch", type=int, default=2)
    parser.add_argument("--meta-lr", type=float, default=1.0)
    parser.add_argument("--inner-lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--adapt-steps", type=int, default=300)
    parser.add_argument("--adapt-lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-images", type=int, default=None, help="cap the held-out validation images (pilots)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_metainit")
    parser.add_argument("--no-write", action="store_true", help="print only; leave results/ and RESULTS.md alone")
    parser.add_argument("--render-only", action="store_true", help="rewrite RESULTS.md and the plot from the JSON")
    args = parser.parse_args()
    if args.render_only:
        payload = json.loads((RESULTS_DIR / "metainit.json").read_text())
        PLOT.write_bytes(plot_png(payload))
        write_section("metainit", render(payload))
        return 0
    torch.set_num_threads(1)

    from slimdet.compress.metainit import MetaInitConfig, TaskFamily, pretrain_union, run_metainit
    from slimdet.io import load_checkpoint

    cfg = MetaInitConfig(model=args.model, input_size=160, family=TaskFamily(held_out=HELD_OUT),
                         meta_iters=args.meta_iters, inner_steps=args.inner_steps, meta_batch=args.meta_batch,
                         meta_lr=args.meta_lr, inner_lr=args.inner_lr, batch_size=args.batch_size, seed=args.seed,
                         threads=1, checkpoint_every=25)  # fmt: skip
    meta: dict[str, dict] = {}
    for name, run in (("reptile", run_metainit), ("union", pretrain_union)):
        path = args.out / name / "metainit.pt"
        record = load_checkpoint(path)["metainit"] if path.is_file() else None
        if record is None or record["config"] != cfg.model_dump(mode="json"):
            print(f"[{name}] meta-training: {cfg.gradient_steps} gradient steps", flush=True)
            run(cfg, out_dir=args.out / name, resume=True)
            record = load_checkpoint(path)["metainit"]
        else:
            print(f"[{name}] finished earlier: {path}", flush=True)
        meta[name] = {"checkpoint": str(path), "time_s": record["time_s"], "gradient_steps": record["gradient_steps"],
                      "final_loss": record["history"][-1]["loss"]}  # fmt: skip

    adapt_settings = {"steps": args.adapt_steps, "eval_every": args.eval_every, "lr": args.adapt_lr,
                      "batch_size": args.batch_size, "seed": args.seed, "eval_images": args.eval_images}  # fmt: skip
    curves = {name: adapted_curve(name, args, cfg, adapt_settings) for name in STARTS}

    command = "benchmarks/bench_metainit.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    payload = {"command": command.strip(), "target": args.target, "thresholds": sorted(set(args.thresholds)),
               "held_out_task": {"classes": list(HELD_OUT), "scale": 1.0, "background": "color"},
               "metainit_config": cfg.model_dump(mode="json"), "meta_training": meta, "adapt": adapt_settings,
               "curves": {k: v["curve"] for k, v in curves.items()},
               "adapt_time_s": {k: v["time_s"] for k, v in curves.items()},
               "eval_images": curves["random"]["eval_images"], "train_images": curves["random"]["train_images"],
               "environment": environment(threads=1)}  # fmt: skip
    text = render(payload)
    if not args.no_write:
        write_json("metainit", payload)
        PLOT.write_bytes(plot_png(payload))
        write_section("metainit", text)
    print(text)
    return 0


def adapted_curve(name: str, args: argparse.Namespace, cfg, settings: dict) -> dict:  # noqa: ANN001
    """Fine-tune one start on the held-out task (or read the curve a previous run stored)."""
    from slimdet.compress.metainit import Task, TaskDataset, init_from
    from slimdet.compress.metainit_adapt import adapt
    from slimdet.io import atomic_write_json
    from slimdet.models import create_model

    path = args.out / "curves" / f"{name}.json"
    stored = json.loads(path.read_text()) if path.is_file() else None
    config = {"settings": settings, "metainit_config": cfg.model_dump(mode="json") if name != "random" else None}
    if stored is not None and stored["config"] == config:
        print(f"[adapt {name}] finished earlier: {path}", flush=True)
        return stored
    task = Task(HELD_OUT)
    train = _held_out(cfg, "train").dataset(task)
    val_pool = _held_out(cfg, "val")
    indices = val_pool.images_of(HELD_OUT)
    if settings["eval_images"] is not None and settings["eval_images"] < len(indices):
        step = len(indices) / settings["eval_images"]
        indices = [indices[int(k * step)] for k in range(settings["eval_images"])]
    val = TaskDataset(val_pool.base, task, indices)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"])
        model = create_model(cfg.model, num_classes=len(HELD_OUT), input_size=cfg.input_size)
    if name != "random":
        init_from(model, args.out / name / "metainit.pt")
    print(f"[adapt {name}] {settings['steps']} steps on {len(train)} images, mAP@.5 on {len(val)} val images",
          flush=True)  # fmt: skip
    t0 = time.perf_counter()
    curve = adapt(model, train, steps=settings["steps"], eval_every=settings["eval_every"], lr=settings["lr"],
                  batch_size=settings["batch_size"], eval_ds=val, seed=settings["seed"], progress=True)  # fmt: skip
    result = {"config": config, "curve": [[s, m] for s, m in curve], "time_s": time.perf_counter() - t0,
              "train_images": len(train), "eval_images": len(val)}  # fmt: skip
    print(f"[adapt {name}] " + " ".join(f"{s}:{m:.3f}" for s, m in curve), flush=True)
    atomic_write_json(path, result)
    return result


_POOLS: dict = {}


def _held_out(cfg, split: str):  # noqa: ANN001, ANN202
    if split not in _POOLS:
        _POOLS[split] = cfg.family.load(split, input_size=cfg.input_size)
    return _POOLS[split]


def reach(curve: list, threshold: float) -> int | None:
    return next((int(s) for s, m in curve if m >= threshold), None)


def ratio(mine: int | None, other: int | None, steps: int) -> tuple[str, bool | None]:
    """reptile's steps / another start's steps, as text, and whether it is <= 0.5 (None: undecided)."""
    if mine is None and other is None:
        return "n/a (neither reaches it)", None
    if mine is None:  # reptile > steps, the other at `other`
        bound = steps / other if other else float("inf")
        return f"> {bound:.2f}", False if bound > 0.5 else None
    if other is None:  # the other > steps
        bound = mine / steps
        return f"< {bound:.2f}", True if bound <= 0.5 else None
    if other == 0:  # the other start is there before any fine-tuning
        return ("1.00 (both at step 0)" if mine == 0 else "inf"), False
    return f"{mine / other:.2f}", mine / other <= 0.5


def render(payload: dict) -> str:
    curves, steps = payload["curves"], payload["adapt"]["steps"]
    cfg, meta, ad = payload["metainit_config"], payload["meta_training"], payload["adapt"]
    fam = cfg["family"]

    erased = f", the held-out digits {fam['held_out']} painted over with mid-grey" if fam.get("erase_held_out") else ""

    def fmt(v: int | None) -> str:
        return f"> {steps}" if v is None else str(v)

    lines = [
        "## Meta-learned initialization: Reptile vs union pretraining vs random init (issue 7)",
        "",
        f"Command: `.venv/bin/python {payload['command']}` (1 thread). Model {cfg['model']} at {cfg['input_size']} px. "
        f"Meta-training tasks: {fam['ways']} of the digits {sorted(set(range(10)) - set(fam['held_out']))} of "
        f"digits-det's train split, labels in a random order per task, scales {fam['scales']}, colour or grey; "
        f"other digits unlabelled{erased}. Reptile: {cfg['meta_iters']} outer iterations x {cfg['meta_batch']} tasks x "
        f"{cfg['inner_steps']} Adam steps (lr {cfg['inner_lr']}, beta1 {cfg['inner_beta1']}, batch {cfg['batch_size']}, "
        f"fresh optimizer per task), outer step {cfg['meta_lr']} annealed linearly to 0. Union: the same tasks, images "
        f"and {meta['union']['gradient_steps']} gradient steps with one Adam (betas 0.9, 0.999) never reset. "
        f"Random: `create_model` with seed {ad['seed']}. Held-out task: digits {payload['held_out_task']['classes']} at "
        f"scale 1.0 in colour; each start fine-tuned for {steps} Adam steps (lr {ad['lr']}, batch {ad['batch_size']}, "
        f"same images and order, seed {ad['seed']}) on the {payload['train_images']:,} train images holding one of "
        f"them, mAP@.5 (COCO, the three classes) every {ad['eval_every']} steps on the {payload['eval_images']} "
        "validation images holding one of them. Steps-to-reach are the first evaluated step at or above the "
        f"threshold (resolution {ad['eval_every']} steps).",
        "",
        f"Target, fixed before the run: mAP@.5 {payload['target']}.",
        "",
        "| start | meta-training (s) | mAP@.5 at step 0 | at " + f"{steps} | best | "
        + " | ".join(f"steps to {t:g}" for t in payload["thresholds"]) + " |",
        "|---|---|---|---|---|" + "---|" * len(payload["thresholds"]),
    ]
    for name, curve in curves.items():
        mt = f"{meta[name]['time_s']:.0f}" if name in meta else "–"
        lines.append(f"| {name} | {mt} | {curve[0][1]:.3f} | {curve[-1][1]:.3f} | {max(m for _, m in curve):.3f} | "
                     + " | ".join(fmt(reach(curve, t)) for t in payload["thresholds"]) + " |")  # fmt: skip
    lines += ["", "| threshold | reptile / union | reptile / random |", "|---|---|---|"]
    verdicts = []
    for t in payload["thresholds"]:
        r = reach(curves["reptile"], t)
        cells = []
        for other in ("union", "random"):
            text, ok = ratio(r, reach(curves[other], t), steps)
            cells.append(text)
            if t == payload["target"]:
                verdicts.append((other, text, ok))
        lines.append(f"| {t:g}{' (target)' if t == payload['target'] else ''} | " + " | ".join(cells) + " |")
    met = all(ok is True for _, _, ok in verdicts)
    words = {True: "met", False: "**missed**", None: "undecided within the steps run"}
    lines += [
        "",
        f"- Acceptance (reptile's steps to mAP@.5 {payload['target']} <= 0.5x union's and random's): "
        + ("met" if met else "**not met**") + "; "
        + "; ".join(f"vs {o}: ratio {text}, {words[ok]}" for o, text, ok in verdicts) + ".",
        f"- One run (seed {ad['seed']}) per start: a difference of one evaluation interval ({ad['eval_every']} "
        "steps) is within the resolution of this measurement, and other seeds may order close curves differently.",
        f"- Curves: `benchmarks/results/{PLOT.name}`. Adaptation wall time (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in payload["adapt_time_s"].items()) + ".",
        "",
        f"Environment: {env_line(payload['environment'])}. Raw numbers: `benchmarks/results/metainit.json`.",
    ]
    return "\n".join(lines) + "\n"


def plot_png(payload: dict) -> bytes:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    styles = {"reptile": ("tab:blue", "o"), "union": ("tab:orange", "s"), "random": ("tab:gray", "^")}
    for name, curve in payload["curves"].items():
        colour, marker = styles.get(name, ("black", "."))
        ax.plot([s for s, _ in curve], [m for _, m in curve], marker=marker, markersize=3.5, color=colour, label=name)
    ax.axhline(payload["target"], color="tab:red", linestyle="--", linewidth=1, label=f"target {payload['target']:g}")
    cfg = payload["metainit_config"]
    digits = ", ".join(map(str, payload["held_out_task"]["classes"]))
    ax.set_xlabel(f"fine-tuning steps on the held-out task (batch {payload['adapt']['batch_size']})")
    ax.set_ylabel(f"validation mAP@.5 (digits {digits})")
    ax.set_title(f"{cfg['model']}: Reptile vs union pretraining vs random init", fontsize=10)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


if __name__ == "__main__":
    raise SystemExit(main())
