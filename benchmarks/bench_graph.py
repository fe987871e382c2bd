"""Graph passes on every registered model, and yolo-s latency before and after them (issue 6).

    .venv/bin/python benchmarks/bench_graph.py [--runs 100] [--images 8] [--threads 1]

1. Every registered model at input 160 (yolo-s: the shipped baseline; the others: random weights
   with random BatchNorm statistics, so that folding changes every weight; ``--bn``) gets
   ``optimize_graph`` with all passes on ``--images`` real digits-det test images: nodes,
   parameters, largest relative output error (max |new - old| / max |old| per output) next to the
   float32 noise floor of the original (its float32 outputs vs its float64 ones), time.
2. yolo-s, PyTorch eager on the CPU: the original model and the optimized one timed interleaved
   (A, B, A, B, ...) at batch 1 and 8 with ``--threads`` intra-op threads; medians and their ratio.
3. yolo-s in ONNX Runtime (FP32, CPU): the original model's export, the optimized model's export,
   and that file after onnxslim: op counts, and latency interleaved at batch 1 and 8.

Writes benchmarks/results/graph.json and the "graph" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import RESULTS_DIR, ROOT, env_line, environment, write_json, write_section

BASELINE = ROOT / "src" / "slimdet" / "assets" / "yolo-s_digits-det.pt"
TOLERANCE = 1e-5
_BN_TEXT = {
    "random": "drawn at random (mean N(0, 0.3²), variance U(0.5, 2), γ U(0.5, 1.5), β N(0, 0.3²); seed 0) so that "
    "folding changes every weight",
    "measured": "measured on 64 training images (`--bn measured`)",
    "default": "as built (mean 0, variance 1: folding barely changes the weights; `--bn default`)",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="timed runs per contender and batch size")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--images", type=int, default=8, help="real test images the outputs are checked on")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (PyTorch and ONNX Runtime)")
    parser.add_argument("--size", type=int, default=160, help="input size of the registered models")
    parser.add_argument("--models", nargs="*", default=None, help="only these registered models (default: all)")
    parser.add_argument("--bn", choices=["random", "measured", "default"], default="random",
                        help="BatchNorm statistics of the untrained models: drawn at random, measured on 64 training "
                        "images, or as built (mean 0, variance 1)")
    parser.add_argument("--render-only", action="store_true", help="rewrite RESULTS.md from results/graph.json")
    parser.add_argument("--dry-run", action="store_true", help="print the section, write nothing (smoke runs)")
    args = parser.parse_args()
    if args.render_only:
        write_section("graph", render(json.loads((RESULTS_DIR / "graph.json").read_text())))
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from slimdet.data import load_dataset
    from slimdet.data.dataset import collate
    from slimdet.models import list_models, load_model

    test_ds = load_dataset("digits-det", "test", input_size=args.size).subset(args.images)
    images, _ = collate([test_ds[i] for i in range(len(test_ds))])
    calib_ds = load_dataset("digits-det", "train", input_size=args.size).subset(64)
    calib = [collate([calib_ds[i] for i in range(j, j + 16)])[0] for j in range(0, 64, 16)]

    baseline, _ = load_model(BASELINE)
    baseline.eval()
    models = {}
    for name in args.models or list_models():
        print(f"graph passes: {name}", file=sys.stderr)
        models[name] = run_model(name, baseline, images, calib, args.size, args.bn)

    optimized = copy.deepcopy(baseline)
    from slimdet.compress import optimize_graph

    optimize_graph(optimized, example=images[: min(4, len(images))])
    print("eager latency", file=sys.stderr)
    eager = eager_latency(baseline, optimized, runs=args.runs, warmup=args.warmup)
    print("onnx", file=sys.stderr)
    onnx = onnx_side(baseline, optimized, runs=args.runs, warmup=args.warmup, threads=args.threads)
    payload = {
        "command": " ".join(["benchmarks/bench_graph.py", *sys.argv[1:]]),
        "environment": environment(args.threads),
        "size": args.size,
        "images": args.images,
        "threads": args.threads,
        "runs": args.runs,
        "tolerance": TOLERANCE,
        "bn": args.bn,
        "models": models,
        "eager": eager,
        "onnx": onnx,
    }
    text = render(payload)
    if not args.dry_run:
        write_json("graph", payload)
        write_section("graph", text)
    print(text)
    return 0


def run_model(name: str, baseline, images: torch.Tensor, calib: list[torch.Tensor], size: int, bn: str) -> dict:  # noqa: ANN001
    from slimdet.compress import GraphConfig, optimize_graph
    from slimdet.compress.graph import rel_error
    from slimdet.models import create_model

    if name == baseline.model_config["name"] and size == baseline.input_size:
        model, weights = copy.deepcopy(baseline), "shipped baseline"
    else:
        torch.manual_seed(0)
        model = create_model(name, num_classes=baseline.num_classes, input_size=size)
        weights = {"random": "random, random BN statistics", "measured": "random, BN statistics measured",
                   "default": "random, BN as built"}[bn]  # fmt: skip
        if bn == "random":
            random_bn_statistics(model)
        elif bn == "measured":
            bn_statistics(model, calib)
    model.eval()
    with torch.no_grad():
        ref = model(images)
        ref64 = copy.deepcopy(model).double()(images.double())  # the exact result, to within float64
    start = time.perf_counter()
    # the tolerance is judged below against TOLERANCE: a model over it is reported, not stopped
    result = optimize_graph(model, GraphConfig(tolerance=1e-3), example=images)
    elapsed = time.perf_counter() - start
    with torch.no_grad():  # the installed model again, after the function returned
        out = model(images)
    return {
        "weights": weights,
        "scopes": list(result.scopes),
        "nodes_before": result.nodes_before,
        "nodes_after": result.nodes_after,
        "params_before": result.params_before,
        "params_after": result.params_after,
        "max_rel_error": result.max_rel_error,  # the traced parts' outputs (the whole model but for Faster R-CNN)
        "model_rel_error": rel_error(out, ref),  # the detector's outputs, optimized vs original, both float32
        "noise_floor": rel_error(ref, ref64),  # the original in float32 vs float64
        "optimized_vs_exact": rel_error(out, ref64),
        "changes": {p.name: len(p.changes) for p in result.passes},
        "time_s": elapsed,
        "passes": [{k: v for k, v in vars(p).items() if k != "changes"} | {"changes": list(p.changes)}
                   for p in result.passes],  # fmt: skip
    }


def random_bn_statistics(model: torch.nn.Module, seed: int = 0) -> None:
    """BatchNorm statistics and affine terms drawn at random, so that folding changes every weight."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.3)


def bn_statistics(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    """BatchNorm running statistics of a randomly initialised model, as the average over ``batches``."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    model.eval()
    for bn, m in zip(bns, momenta, strict=True):
        bn.momentum = m


def eager_latency(baseline, optimized, *, runs: int, warmup: int) -> dict:  # noqa: ANN001
    from slimdet.profiling.latency import summarize, time_interleaved

    out = {}
    for batch in (1, 8):
        x = torch.rand(batch, 3, baseline.input_size, baseline.input_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            fns = {"original": lambda x=x: baseline(x), "optimized": lambda x=x: optimized(x)}
            times = time_interleaved(fns, warmup=warmup, runs=runs)
        stats = {k: summarize("torch-eager", batch, t) for k, t in times.items()}
        out[str(batch)] = {k: {"median_ms": s.median_s * 1e3, "p90_ms": s.p90_s * 1e3} for k, s in stats.items()}
        out[str(batch)]["ratio"] = stats["optimized"].median_s / stats["original"].median_s
    return out


def onnx_side(baseline, optimized, *, runs: int, warmup: int, threads: int) -> dict:  # noqa: ANN001
    import numpy as np

    from slimdet.export import export_onnx, onnx_session
    from slimdet.export.slim import op_counts, slim_onnx
    from slimdet.profiling.latency import summarize, time_interleaved

    out: dict = {"op_counts": {}, "latency": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {
            "original": export_onnx(baseline, Path(tmp) / "original.onnx", dynamic_batch=True).path,
            "optimized": export_onnx(optimized, Path(tmp) / "optimized.onnx", dynamic_batch=True).path,
        }
        slim = slim_onnx(paths["optimized"], Path(tmp) / "optimized_slim.onnx")
        paths["optimized+onnxslim"] = slim.dst
        out["slim_max_abs_diff"] = slim.max_abs_diff
        import onnx

        for name, path in paths.items():
            out["op_counts"][name] = op_counts(onnx.load(str(path)))
        sessions = {name: onnx_session(p, threads) for name, p in paths.items()}
        for batch in (1, 8):
            x = np.random.default_rng(0).random((batch, 3, baseline.input_size, baseline.input_size), dtype=np.float32)
            fns = {name: (lambda s=s, x=x: s.run(None, {"images": x})) for name, s in sessions.items()}
            times = time_interleaved(fns, warmup=warmup, runs=runs)
            stats = {k: summarize("onnxruntime-cpu", batch, t) for k, t in times.items()}
            row = {k: {"median_ms": s.median_s * 1e3, "p90_ms": s.p90_s * 1e3} for k, s in stats.items()}
            for k in stats:
                row[k]["ratio"] = stats[k].median_s / stats["original"].median_s
            out["latency"][str(batch)] = row
    return out


def render(payload: dict) -> str:
    tol = payload["tolerance"]
    lines = [
        "## Graph passes: folding, fusion, dead and redundant nodes (issue 6)",
        "",
        f"Command: `.venv/bin/python {payload['command']}`. All passes (`GraphConfig()`: identity, dead_code, const_fold, "
        f"cse, fold_bn, rep_branches, fuse_conv_act) on every registered model at input {payload['size']}, outputs checked "
        f"on {payload['images']} real digits-det test images (`optimize_graph` also checks a batch one image larger); "
        "relative error = max |new - old| / max |old| per output tensor, the largest over the outputs. The untrained "
        f"models have random weights and BatchNorm statistics {_BN_TEXT[payload['bn']]}. The noise floor is how far "
        "the original model's own float32 outputs are from its float64 ones: two float32 evaluations that round "
        "differently (folding changes the rounding) differ by about that much.",
        "",
        "| model | weights | traced | nodes | parameters | changes per pass | rel. error, optimized vs original | "
        "noise floor: original float32 vs float64 | optimized vs float64 | time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in payload["models"].items():
        scopes = "whole model" if r["scopes"] == [""] else ", ".join(f"`{s}`" for s in r["scopes"])
        changes = ", ".join(f"{k} {v}" for k, v in r["changes"].items() if v) or "none"
        err = f"{r['model_rel_error']:.1e}"
        if r["scopes"] != [""]:
            err += f" (traced parts {r['max_rel_error']:.1e})"
        lines.append(f"| {name} | {r['weights']} | {scopes} | {r['nodes_before']} → {r['nodes_after']} | "
                     f"{r['params_before']:,} → {r['params_after']:,} | {changes} | {err} | {r['noise_floor']:.1e} | "
                     f"{r['optimized_vs_exact']:.1e} | {r['time_s']:.1f} s |")  # fmt: skip
    eager = payload["eager"]
    lines += [
        "",
        f"yolo-s (shipped baseline), PyTorch eager on the CPU, {payload['threads']} thread(s), original and optimized "
        f"model timed interleaved, {payload['runs']} runs each: median (p90) ms.",
        "",
        "| batch | original | optimized | optimized / original |",
        "|---|---|---|---|",
    ]
    for b, row in eager.items():
        o, g = row["original"], row["optimized"]
        lines.append(f"| {b} | {o['median_ms']:.2f} ({o['p90_ms']:.2f}) | {g['median_ms']:.2f} ({g['p90_ms']:.2f}) | "
                     f"{row['ratio']:.3f} |")  # fmt: skip
    onnx = payload["onnx"]
    names = list(onnx["op_counts"])
    ops = sorted({op for c in onnx["op_counts"].values() for op in c})
    lines += [
        "",
        "yolo-s in ONNX (TorchScript exporter, dynamic batch): op counts of the original model's export, the optimized "
        f"model's export, and that file after onnxslim (outputs within {onnx['slim_max_abs_diff']:.1e} of it in ONNX Runtime).",
        "",
        "| op | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for op in ops:
        lines.append(f"| {op} | " + " | ".join(str(onnx["op_counts"][n].get(op, 0)) for n in names) + " |")
    lines.append("| **nodes** | " + " | ".join(f"**{sum(onnx['op_counts'][n].values())}**" for n in names) + " |")
    lines += [
        "",
        f"ONNX Runtime FP32 on the CPU ({payload['threads']} thread(s), all optimizations on), the three files timed "
        "interleaved: median (p90) ms, ratio to the original export.",
        "",
        "| batch | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for b, row in onnx["latency"].items():
        cells = [f"{row[n]['median_ms']:.2f} ({row[n]['p90_ms']:.2f}), {row[n]['ratio']:.3f}" for n in names]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    worst = max(max(r["max_rel_error"], r["model_rel_error"]) for r in payload["models"].values())
    ratio = max(r["optimized_vs_exact"] / max(r["noise_floor"], 1e-12) for r in payload["models"].values())
    faster = all(row["ratio"] < 1 for row in eager.values())
    lines += [
        "",
        f"- Outputs of every model equal within {tol:g} relative: largest error {worst:.1e} "
        f"({'met' if worst <= tol else '**missed**'}); against the float64 result, no optimized model is more than "
        f"{ratio:.2f}x as far off as its original in float32.",
        "- yolo-s eager CPU latency lower after the passes at every batch size: "
        + ", ".join(f"batch {b} {row['ratio']:.3f}x" for b, row in eager.items())
        + f" ({'met' if faster else '**missed**'}).",
        *(["- The original model's export has no BatchNormalization node either: the TorchScript exporter folds "
            "BatchNorm into the convs of a model in eval mode."]
          if "BatchNormalization" not in onnx["op_counts"]["original"] else []),
        "",
        f"Environment: {env_line(payload['environment'])}. Raw numbers: `benchmarks/results/graph.json`.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
