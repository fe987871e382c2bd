"""Calibrated CPU roofline vs measured ONNX Runtime latency, on models it was not calibrated on (issue 5).

    .venv/bin/python benchmarks/bench_roofline.py [--runs 60] [--out runs/bench_roofline]

1. Builds every model of the table (fp32, and int8: ``QuantConfig()`` PTQ on 2 batches of 8 digits-det
   train images at the model's input size, exported as QDQ), and times all of them at batch 1 on ONNX
   Runtime's CPU provider with 1 thread, interleaved (A, B, C, ..., A, B, C, ...), medians. Each timed
   call follows an untimed call of the same model (``measure_many(rewarm=True)``): steady-state latency
   with the model's weights in cache, not the cold latency after 19 other models evicted them.
2. Calibrates the ``cpu-zen5-2c`` roofline (from its datasheet peaks) on the calibration models only:
   ``yolo-test`` and ``yolo-n`` at 160 px, fp32 and int8; fitted: compute and memory efficiency, per-op
   overhead, and the factor of the int8 peak that ONNX Runtime's u8s8 kernels reach relative to fp32.
3. Predicts every held-out model (``yolo-s`` from the shipped baseline at 128/160/224/320 px, ``yolo-s``
   pruned by 30% and 50% of its channels, torchvision ``ssdlite320_mobilenet_v3_large`` and
   ``fcos_mobilenet_v3_fpn`` at 320 px; fp32 and int8) and reports the error. Target: median absolute
   error <= 25% on the held-out models.

Also: the copy bandwidth of a cache-sized and a DRAM-sized buffer (1 thread), the error of the
datasheet roofline before calibration, a per-node breakdown (ONNX Runtime's profiler) of one held-out
model, and its roofline plot (``<out>/roofline_<model>.png``).
Writes benchmarks/results/roofline.json and the "roofline" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS_DIR, ROOT, env_line, environment, write_json, write_section
from tqdm.auto import tqdm

BASELINE = ROOT / "src" / "slimdet" / "assets" / "yolo-s_digits-det.pt"
PRESET = "cpu-zen5-2c"
#: the preset's datasheet peaks (see the comments in presets/cpu-zen5-2c.yaml); calibration starts here
DATASHEET_PEAKS = {"fp32": 192.0e9, "int8": 768.0e9}
FIT = ("compute_efficiency", "memory_efficiency", "op_overhead_s", "peak_macs_per_s.int8")
TARGET = 0.25
CALIB_BATCHES, CALIB_BATCH_SIZE = 2, 8
# (name, model, input size, how it is built); the calibration models come first
MODELS = [
    ("yolo-test@160", "yolo-test", 160, "calib", "init"),
    ("yolo-n@160", "yolo-n", 160, "calib", "init"),
    *[(f"yolo-s@{s}", "yolo-s", s, "held-out", "baseline") for s in (128, 160, 224, 320)],
    ("yolo-s-pruned30@160", "yolo-s", 160, "held-out", "prune:0.3"),
    ("yolo-s-pruned50@160", "yolo-s", 160, "held-out", "prune:0.5"),
    ("ssdlite320_mobilenet_v3_large@320", "ssdlite320_mobilenet_v3_large", 320, "held-out", "init"),
    ("fcos_mobilenet_v3_fpn@320", "fcos_mobilenet_v3_fpn", 320, "held-out", "init"),
]
BREAKDOWN = "yolo-s@160"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=60, help="timed interleaved rounds (every model once per round)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_roofline")
    parser.add_argument("--render-only", action="store_true", help="rewrite RESULTS.md from results/roofline.json")
    args = parser.parse_args()
    if args.render_only:
        write_section("roofline", render(json.loads((RESULTS_DIR / "roofline.json").read_text())))
        return 0
    torch.set_num_threads(1)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = run(args)
    write_json("roofline", payload)
    text = render(payload)
    write_section("roofline", text)
    print(text)
    return 0


def run(args: argparse.Namespace) -> dict:
    from slimdet.hw.layers import layer_table
    from slimdet.hw.measure import Sample, fit_roofline, measure_many, prepare_onnx, profile_nodes
    from slimdet.hw.roofline import estimate, plot_roofline
    from slimdet.hw.spec import load_spec, replace

    start = time.perf_counter()
    bandwidth = copy_bandwidth()
    models, precisions, roles, builds = {}, {}, {}, {}
    for key, name, size, role, how in tqdm(MODELS, desc="build + quantize", unit="model"):
        model = build(name, size, how)
        int8 = quantized(model, size)
        for prec, m in (("fp32", model), ("int8", int8)):
            models[f"{key}/{prec}"] = m
            precisions[f"{key}/{prec}"] = prec
            roles[f"{key}/{prec}"] = role
            builds[f"{key}/{prec}"] = how
    bar = tqdm(total=args.runs * len(models), desc="timing (interleaved)", unit="run")
    with bar:
        meas = measure_many(models, precision=precisions, threads=1, runs=args.runs, warmup=args.warmup,
                            work_dir=args.out / "onnx", on_step=lambda: bar.update(1))  # fmt: skip
    tables = {k: layer_table(m, m.example_inputs(1)) for k, m in models.items()}
    samples = {k: Sample(tables[k], meas[k].median_s, name=k) for k in models}

    base = replace(load_spec(PRESET), peak_macs_per_s=DATASHEET_PEAKS, compute_efficiency=1.0, memory_efficiency=1.0,
                   op_overhead_s=0.0)  # fmt: skip
    calib_keys = [k for k in models if roles[k] == "calib"]
    fit = fit_roofline(base, [samples[k] for k in calib_keys], fit=FIT)
    rows = []
    for k in models:
        pred = estimate(tables[k], fit.spec, postprocess=False)
        raw = estimate(tables[k], base, postprocess=False)
        tot = pred.totals()
        rows.append({"model": k, "role": roles[k], "precision": precisions[k], "build": builds[k],
                     "macs": int(tables[k].macs), "measured_s": meas[k].median_s, "p90_s": meas[k].latency.p90_s,
                     "predicted_s": pred.total_latency_s, "error": pred.total_latency_s / meas[k].median_s - 1,
                     "datasheet_predicted_s": raw.total_latency_s,
                     "datasheet_error": raw.total_latency_s / meas[k].median_s - 1,
                     "compute_bound_layers": tot["compute_bound_layers"],
                     "memory_bound_layers": tot["memory_bound_layers"],
                     "overhead_s": float(pred.overhead_s.sum()), "energy_j": pred.total_energy_j})  # fmt: skip
    held = [r for r in rows if r["role"] == "held-out"]
    median_abs = float(np.median([abs(r["error"]) for r in held]))
    plot = plot_roofline(estimate(tables[f"{BREAKDOWN}/fp32"], fit.spec, postprocess=False), fit.spec,
                         args.out / f"roofline_{BREAKDOWN.replace('@', '_')}.png",
                         title=f"{BREAKDOWN} fp32 on the calibrated {PRESET}")  # fmt: skip
    breakdown = node_breakdown(models[f"{BREAKDOWN}/fp32"], tables[f"{BREAKDOWN}/fp32"], fit.spec, args.out,
                               prepare_onnx, profile_nodes, estimate)  # fmt: skip
    return {
        "preset": PRESET,
        "start_peaks_macs_per_s": DATASHEET_PEAKS,
        "fit_fields": list(FIT),
        "fitted": fit.values,
        "calibrated_spec": fit.spec.model_dump(mode="json"),
        "calibration_errors": dict(zip(fit.names, fit.errors.tolist(), strict=True)),
        "rows": rows,
        "held_out_median_abs_error": median_abs,
        "held_out_fp32_median_abs_error": float(np.median([abs(r["error"]) for r in held if r["precision"] == "fp32"])),
        "held_out_int8_median_abs_error": float(np.median([abs(r["error"]) for r in held if r["precision"] == "int8"])),
        "target": TARGET,
        "met": median_abs <= TARGET,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "breakdown": {"model": f"{BREAKDOWN}/fp32", "rows": breakdown},
        "plot": str(plot),
        "runs": args.runs,
        "warmup": args.warmup,
        "load": {"loadavg_1_5_15": list(os.getloadavg())},
        "gpu": "none lent to this task: GPU presets (gpu-h100-sxm, gpu-jetson-orin-nano) are datasheet-only, "
        "unmeasured; measure()'s CUDA/TensorRT paths were not exercised",
        "wall_s": time.perf_counter() - start,
        "environment": environment(threads=1),
        "command": "/work/main/.venv/bin/python benchmarks/bench_roofline.py"
        + (f" --runs {args.runs}" if args.runs != 60 else ""),
    }


def build(name: str, size: int, how: str):  # noqa: ANN201
    from slimdet.compress import PruneConfig, prune
    from slimdet.models import create_model, load_model

    torch.manual_seed(0)
    if how == "init":
        return create_model(name, num_classes=10, input_size=size).eval()
    baseline, _ = load_model(BASELINE)
    model = create_model(name, num_classes=baseline.num_classes, input_size=size)
    model.load_state_dict(baseline.state_dict())
    if how.startswith("prune:"):
        prune(model, PruneConfig(ratio=float(how.split(":")[1])), progress=False)
    return model.eval()


_CALIB: dict[int, list] = {}


def quantized(model, size: int):  # noqa: ANN001, ANN201
    """A QuantConfig() copy of ``model``, calibrated on CALIB_BATCHES batches of digits-det train images."""
    from torch.utils.data import DataLoader, Subset

    from slimdet.compress.quant import QuantConfig, quantize
    from slimdet.data import load_dataset
    from slimdet.data.dataset import collate

    if size not in _CALIB:
        train = load_dataset("digits-det", "train", input_size=size)
        index = np.linspace(0, len(train) - 1, CALIB_BATCHES * CALIB_BATCH_SIZE).round().astype(int).tolist()
        _CALIB[size] = list(DataLoader(Subset(train, index), batch_size=CALIB_BATCH_SIZE, collate_fn=collate))
    q = copy.deepcopy(model)
    quantize(q, QuantConfig(calib_batches=CALIB_BATCHES), calib=_CALIB[size], progress=False)
    return q.eval()


def copy_bandwidth() -> dict[str, float]:
    """(read + write) bytes/s of a numpy copy, 1 thread: a 2 MiB buffer (cache) and a 256 MiB one (DRAM)."""
    out = {}
    for label, mib, reps in (("cache_2MiB", 2, 400), ("dram_256MiB", 256, 12)):
        a = np.ones(mib * 2**20 // 4, np.float32)
        b = np.empty_like(a)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            np.copyto(b, a)
            times.append(time.perf_counter() - t)
        out[label] = 2 * a.nbytes / float(np.median(times))
    return out


def node_breakdown(model, table, spec, out: Path, prepare_onnx, profile_nodes, estimate) -> list[dict]:  # noqa: ANN001
    """Measured kernel time per row kind (ONNX Runtime's profiler) next to the calibrated roofline's."""
    path = prepare_onnx(model, precision="fp32", work_dir=out / "onnx", stem="breakdown")
    nodes = profile_nodes(path, threads=1, runs=20, warmup=5, layers=table)
    kinds = {g.name: "gemm" for g in table.gemm} | {o.name: o.op for o in table.ops}
    measured: dict[str, float] = defaultdict(float)
    for n in nodes:
        measured[kinds.get(n.layer, f"unmapped ({n.op_type})") if n.layer else f"unmapped ({n.op_type})"] += n.median_s
    pred = estimate(table, spec, postprocess=False)
    modelled: dict[str, float] = defaultdict(float)
    for name, lat in zip(pred.names, pred.latency_s, strict=True):
        modelled[kinds.get(name, "?")] += float(lat)
    keys = sorted(set(measured) | set(modelled), key=lambda k: -(measured.get(k, 0) + modelled.get(k, 0)))
    return [{"kind": k, "measured_s": measured.get(k, 0.0), "modelled_s": modelled.get(k, 0.0)} for k in keys]


def render(p: dict) -> str:
    f = p["fitted"]
    spec = p["calibrated_spec"]
    verdict = "met" if p["met"] else "**missed**"
    lines = [
        "## Roofline: calibrated CPU model vs measured ONNX Runtime latency (issue 5, item 5)",
        "",
        f"Command: `{p['command']}`",
        "",
        f"The `{p['preset']}` roofline, started from its datasheet peaks ({_peaks(p['start_peaks_macs_per_s'])}) and "
        "calibrated (bounded least squares on log latency, `slimdet.hw.measure.fit_roofline`) on the **calibration** "
        "rows only, predicts every **held-out** row: other sizes, pruned widths, other architectures, fp32 and int8. "
        "Batch 1, ONNX Runtime CPU provider, 1 intra-op thread, all models timed interleaved in one loop "
        f"({p['runs']} rounds after {p['warmup']} warm-up), each timed call right after an untimed call of the same "
        "model (steady-state latency, weights in cache), medians. The graph excludes decode/NMS, and so does the model "
        "(`postprocess=False`). The last column is the roofline before calibration (datasheet peaks, efficiencies 1, "
        "no per-op overhead).",
        "",
        f"**Fitted**: compute_efficiency {f['compute_efficiency']:.3f} (of the 2-core fp32 peak; 1 thread uses one "
        f"core), memory_efficiency {f['memory_efficiency']:.3f}, op_overhead_s {f['op_overhead_s'] * 1e6:.2f} us, "
        f"int8 peak factor {f['peak_macs_per_s.int8']:.3f} (effective int8 peak "
        f"{spec['peak_macs_per_s']['int8'] / 1e9:.0f} GMAC/s x efficiency); bandwidth {spec['mem_bytes_per_s'] / 1e9:.0f} "
        f"GB/s. Calibration residuals: " + ", ".join(f"{k} {v:+.1%}" for k, v in p["calibration_errors"].items()) + ".",
        "",
        f"**Held-out median |error|: {p['held_out_median_abs_error']:.1%}** (target <= {p['target']:.0%}: {verdict}); "
        f"fp32 {p['held_out_fp32_median_abs_error']:.1%}, int8 {p['held_out_int8_median_abs_error']:.1%}.",
        "",
        "| model | role | precision | MMACs | measured ms | predicted ms | error | datasheet roofline ms (error) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in p["rows"]:
        lines.append(
            f"| {r['model'].rsplit('/', 1)[0]} | {r['role']} | {r['precision']} | {r['macs'] / 1e6:.0f} | "
            f"{r['measured_s'] * 1e3:.2f} | {r['predicted_s'] * 1e3:.2f} | {r['error']:+.1%} | "
            f"{r['datasheet_predicted_s'] * 1e3:.2f} ({r['datasheet_error']:+.0%}) |"
        )
    misses = [r for r in p["rows"] if r["role"] == "held-out" and abs(r["error"]) > p["target"]]
    if misses:
        lines += [
            "",
            "Held-out rows beyond 25%: " + ", ".join(f"{r['model']} ({r['error']:+.0%})" for r in misses) + ".",
        ]
    lines += [
        "",
        "Where the model is limited (one compute efficiency and one overhead per device): ONNX Runtime reaches a "
        "larger fraction of peak on large convs (fcos's 256-channel head) than on the small convs of the calibration "
        "models, most in int8, and a smaller one on thin layers (the pruned widths); an int8 graph is costed as if "
        "every quantized layer ran an integer kernel, but MobileNetV3's hardswish/hardsigmoid have none, so they run in "
        "float between QuantizeLinear/DequantizeLinear nodes (ssdlite's int8 graph keeps 85 of them, 2.3-2.7 ms of "
        "kernel time in the profiler) and its int8 file is no faster than fp32.",
    ]
    bw = p["copy_bandwidth_bytes_per_s"]
    b = p["breakdown"]
    lines += [
        "",
        f"Per-node split of {b['model']} (ONNX Runtime profiler, kernel time only, which adds per-node cost) vs the "
        "calibrated model, by row kind:",
        "",
        "| kind | measured ms | modelled ms |",
        "|---|---:|---:|",
        *[f"| {r['kind']} | {r['measured_s'] * 1e3:.3f} | {r['modelled_s'] * 1e3:.3f} |" for r in b["rows"]],
        "",
        f"Copy bandwidth (numpy, 1 thread, read + write): {bw['cache_2MiB'] / 1e9:.0f} GB/s on a 2 MiB buffer, "
        f"{bw['dram_256MiB'] / 1e9:.0f} GB/s on 256 MiB. Load: the 2 cores are shared with other agents (a CPU-bound "
        f"simulator among them); load average {', '.join(f'{x:.2f}' for x in p['load']['loadavg_1_5_15'])} at the end. "
        f"GPU: {p['gpu']}.",
        "",
        f"Environment: {env_line(p['environment'])}. Wall time {p['wall_s'] / 60:.1f} min. "
        "Raw numbers: `benchmarks/results/roofline.json`.",
    ]
    return "\n".join(lines)


def _peaks(peaks: dict) -> str:
    return ", ".join(f"{k} {v / 1e9:.0f} GMAC/s" for k, v in peaks.items())


if __name__ == "__main__":
    raise SystemExit(main())
