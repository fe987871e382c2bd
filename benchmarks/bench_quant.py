"""Quantization of the baseline yolo-s on digits-det, side by side in one run (issue 4).

    make bench-env    # once: benchmarks/.venv-bench = the project + NNCF (a contender, not a dependency)
    benchmarks/.venv-bench/bin/python benchmarks/bench_quant.py --part ptq [--calib-sets 3]
    benchmarks/.venv-bench/bin/python benchmarks/bench_quant.py --part mp [--qat-epochs 2]

``ptq``: W8A8 post-training quantization with the same float model and the same 256 calibration
images (train split) for every contender, repeated on ``--calib-sets`` disjoint calibration sets
(differences between the contenders are a few hundredths of a point: one set alone cannot rank them):

* ``slimdet``: ``QuantConfig()`` defaults (per-channel int8 weights, uint8 activations, percentile
  calibrator, SiLU inputs clipped where SiLU stops mattering, concatenations on their inputs' grid,
  bias correction, raw predictions in float, detector-aware float tail), exported as QDQ ONNX;
* ``slimdet-adaround8``: the same plus learned rounding of the int8 weights (``adaround=True``), about 4x
  slower to quantize; it scored a higher val mAP@.5 than the defaults on each calibration set (0.9687 vs
  0.9683, NNCF 0.9682), so it is measured on test too;
* ``slimdet-int-outputs``: the defaults with ``float_outputs=False`` (the raw predictions on the 8-bit
  grid too, so the class scores tie across images; the prediction convs run int8);
* ``ort-static``: ONNX Runtime's ``quantize_static`` with its default settings;
* ``nncf``: ``nncf.quantize`` with its default settings (ONNX backend).

Test-split mAP of each (all run by ONNX Runtime, plus slimdet's simulated model and the gap
between the two), val-split mAP@.5 beside it (the split slimdet's settings are chosen on), and
paired bootstrap intervals of slimdet's test mAP@.5 minus each contender's (``slimdet.significance``:
the test images resampled 2,000 times, both sides scored on the same resample, means over the sets) and ONNX Runtime latency at batch 1, every contender timed interleaved with the
FP32 model in this process, at 1 and 2 threads. The same files are then scored on an extended test set
(``--extended-test``, default 10,000 images): the test split's 1,000 images followed by new scenes from
the same generator and test digit pool, a larger sample that narrows the interval of a difference
(on 1,000 images the interval of slimdet minus NNCF is about +-0.07 points, wider than the difference).

``mp``: mixed precision under a weight budget of 50% of uniform int8 (bits from {2, 4, 8} chosen
by the integer program on Hessian-trace sensitivities), PTQ, then QAT with learned step sizes
for ``--qat-epochs`` epochs (<= 5); test mAP after PTQ and after QAT, in the simulation and in
ONNX Runtime. Writes benchmarks/results/quant_{ptq,mp}.json and RESULTS.md sections.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS_DIR, ROOT, env_line, environment, write_json, write_section

BASELINE = ROOT / "src" / "slimdet" / "assets" / "yolo-s_digits-det.pt"
CALIB_IMAGES = 256
#: slimdet's rows: the defaults, with AdaRound on the int8 weights, with the raw predictions on the 8-bit
#: grid too (every tensor integer)
SLIMDET = {"slimdet": {}, "slimdet-adaround8": {"adaround": True}, "slimdet-int-outputs": {"float_outputs": False}}
#: paired bootstrap: (slimdet row, contender) whose test mAP@.5 difference gets an interval
PAIRS = [(s, c) for s in SLIMDET for c in ("nncf", "ort-static", "fp32")] + [("slimdet-adaround8", "slimdet")]
RESAMPLES = 2000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["ptq", "mp"], required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_quant")
    parser.add_argument("--runs", type=int, default=300, help="timed runs per model and thread count")
    parser.add_argument("--qat-epochs", type=int, default=2, help="QAT epochs of the mixed-precision model (<= 5)")
    parser.add_argument("--calib-sets", type=int, default=3, help="ptq: calibration sets (of 256 images) to repeat on")
    parser.add_argument("--extended-test", type=int, default=EXTENDED_TEST,
                        help="ptq: images of the extended test set (the test split's first; 0 = none)")
    parser.add_argument("--render-only", action="store_true", help="rewrite RESULTS.md from the JSON")
    args = parser.parse_args()
    name = f"quant_{args.part}"
    if args.render_only:
        payload = json.loads((RESULTS_DIR / f"{name}.json").read_text())
        write_section(name, (render_ptq if args.part == "ptq" else render_mp)(payload))
        return 0
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = run_ptq(args) if args.part == "ptq" else run_mp(args)
    write_json(name, payload)
    text = (render_ptq if args.part == "ptq" else render_mp)(payload)
    write_section(name, text)
    print(text)
    return 0


def _data(offset: int = 0, split: str = "test"):  # noqa: ANN202
    """Calibration batches (CALIB_IMAGES evenly spaced train images, shifted by ``offset``) and ``split``."""
    from torch.utils.data import DataLoader, Subset

    from slimdet.data import load_dataset
    from slimdet.data.dataset import collate

    train = load_dataset("digits-det", "train", input_size=160)
    index = (np.linspace(0, len(train) - 1 - offset, CALIB_IMAGES).round().astype(int) + offset).tolist()
    calib = list(DataLoader(Subset(train, index), batch_size=32, shuffle=False, collate_fn=collate))
    return calib, load_dataset("digits-det", split, input_size=160)


#: test images whose raw outputs are compared with the FP32 model's
ERROR_IMAGES = 200
#: images of the extended test set: the 1,000 test images and more from the same generator and test digit pool
EXTENDED_TEST = 10000
#: (slimdet row, contender) pairs bootstrapped on the extended test set
EXTENDED_PAIRS = [("slimdet", "nncf"), ("slimdet", "ort-static"), ("slimdet", "fp32")]


def _extended_test(images: int, test_ds):  # noqa: ANN001, ANN202
    """digits-det's test split grown to ``images`` images by its own generator.

    Every scene is drawn from a random stream seeded by (seed, split, index) and from the test split's
    digit pool, so the first images are the test split's own (checked here: the same ground truth,
    and the first and last image byte for byte), and the rest are new scenes from the same
    distribution: a larger sample that narrows the bootstrap interval of a difference in mAP, not a
    different benchmark.
    """
    from slimdet.data import load_dataset
    from slimdet.data.builtin import DigitsDetConfig, build_digits_det

    config = DigitsDetConfig(num_images={"train": 0, "val": 0, "test": images})
    ext = load_dataset(build_digits_det(config, progress=False), "test", input_size=160)
    gt, ext_gt = test_ds.coco_gt, ext.coco_gt
    same = (len(ext) == images and ext_gt["images"][: len(gt["images"])] == gt["images"]
            and ext_gt["annotations"][: len(gt["annotations"])] == gt["annotations"]
            and all(ext.records[i].path.read_bytes() == test_ds.records[i].path.read_bytes()
                    for i in (0, len(test_ds) - 1)))  # fmt: skip
    if not same:
        raise SystemExit("the extended test set does not start with the test split's images: generator changed?")
    return ext


def _raw_outputs(path: Path, images: list[np.ndarray]) -> list[np.ndarray]:
    """The ONNX file's raw outputs (every output, flattened together) on each image, by ONNX Runtime."""
    from slimdet.export.onnx import onnx_session

    session = onnx_session(path, 2)
    name = session.get_inputs()[0].name
    return [np.concatenate([o.ravel() for o in session.run(None, {name: x})]) for x in images]


def output_error(outputs: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """Root-mean-square difference of the raw outputs from the reference's, relative to the reference's RMS."""
    diff = sum(float(np.sum((a.astype(np.float64) - b) ** 2)) for a, b in zip(outputs, reference, strict=True))
    return (diff / sum(float(np.sum(b.astype(np.float64) ** 2)) for b in reference)) ** 0.5


def run_ptq(args: argparse.Namespace) -> dict:
    from quant_contenders import nncf_quantize, ort_quantize_static, time_onnx_interleaved

    from slimdet.compress.quant import QuantConfig, quantize
    from slimdet.compress.quant.consistency import check_consistency
    from slimdet.evaluate import coco_map, evaluate, predict
    from slimdet.export.onnx import export_onnx
    from slimdet.export.qdq import export_qdq
    from slimdet.models import load_model
    from slimdet.models.onnx import OrtDetector
    from slimdet.significance import paired_bootstrap

    baseline, _ = load_model(BASELINE)
    baseline.eval()
    _, test_ds = _data()
    _, val_ds = _data(split="val")
    fp32 = args.out / "fp32.onnx"
    export_onnx(baseline, fp32)
    detections: dict[str, list] = {"fp32": [predict(baseline, test_ds, progress=False)]}  # test split, per set
    fp32_eval = coco_map(test_ds.coco_gt, detections["fp32"][0])
    rows: dict[str, dict] = {"fp32": {"test_map50": [fp32_eval.map50], "test_map": [fp32_eval.map],
                                      "val_map50": [evaluate(baseline, val_ds, progress=False).map50],
                                      "size_bytes": fp32.stat().st_size}}  # fmt: skip
    set_files: dict[str, list[Path]] = {}  # every set's file of each contender
    error_images = [test_ds[i][0].unsqueeze(0).numpy() for i in range(min(ERROR_IMAGES, len(test_ds)))]
    reference = _raw_outputs(fp32, error_images)
    for k in range(args.calib_sets):  # the same calibration images for every contender, k-th set
        calib, _ = _data(offset=k)
        images = torch.cat([b[0] for b in calib]).numpy()
        out = args.out / f"calib{k}"
        made = {}
        for name, options in SLIMDET.items():
            t0 = time.perf_counter()
            model = copy.deepcopy(baseline)
            result = quantize(model, QuantConfig(**options), calib=calib)
            made[name] = export_qdq(model, out / f"{name}_w8a8.onnx").path
            quant_s = time.perf_counter() - t0
            check = check_consistency(model, made[name], test_ds, raise_on_gap=False, progress=False)
            row = rows.setdefault(name, {"test_map50": [], "test_map": [], "val_map50": [], "test_map50_simulated": [],
                                         "gap_points": [], "quantize_s": [], "kept_float": [],
                                         "output_error": []})  # fmt: skip
            row["output_error"].append(output_error(_raw_outputs(made[name], error_images), reference))
            row["val_map50"].append(evaluate(OrtDetector(made[name], like=baseline), val_ds, progress=False).map50)
            detections.setdefault(name, []).append(predict(OrtDetector(made[name], like=baseline), test_ds,
                                                           progress=False))  # fmt: skip
            for key, value in (("test_map50", check.map50_runtime), ("test_map", check.map_runtime),
                               ("test_map50_simulated", check.map50_simulated),
                               ("gap_points", check.gap_points), ("quantize_s", quant_s),
                               ("kept_float", result.kept_float)):  # fmt: skip
                row[key].append(value)
            if name == "slimdet":
                config = result.config
        for name, fn in (("ort-static", ort_quantize_static), ("nncf", nncf_quantize)):
            row = rows.setdefault(name, {"test_map50": [], "test_map": [], "val_map50": [], "quantize_s": [],
                                         "output_error": []})  # fmt: skip
            try:
                t0 = time.perf_counter()
                made[name] = Path(fn(fp32, out / f"{name}.onnx", images))
                row["quantize_s"].append(time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001 - reported, not hidden
                row["error"] = f"{type(exc).__name__}: {exc}"
                print(f"{name} not run: {exc}", file=sys.stderr)
                continue
            detections.setdefault(name, []).append(predict(OrtDetector(made[name], like=baseline), test_ds,
                                                           progress=False))  # fmt: skip
            scored = coco_map(test_ds.coco_gt, detections[name][-1])
            row["test_map50"].append(scored.map50)
            row["test_map"].append(scored.map)
            row["val_map50"].append(evaluate(OrtDetector(made[name], like=baseline), val_ds, progress=False).map50)
            row["output_error"].append(output_error(_raw_outputs(made[name], error_images), reference))
        for name, path in made.items():
            set_files.setdefault(name, []).append(path)
    files = {"fp32": fp32, **{name: paths[0] for name, paths in set_files.items()}}  # timed: the first set's
    for name, path in files.items():
        rows[name]["size_bytes"] = Path(path).stat().st_size
    bootstrap = {f"{a} vs {b}": paired_bootstrap(test_ds.coco_gt, detections[a], detections[b], resamples=RESAMPLES,
                                                 progress=False).to_dict()
                 for a, b in PAIRS if detections.get(a) and detections.get(b)}  # fmt: skip
    extended = _run_extended(args.extended_test, test_ds, baseline, set_files, detections) if args.extended_test else None
    latency = {}
    for threads in (1, 2):
        timed = time_onnx_interleaved(files, baseline="fp32", threads=threads, runs=args.runs)
        latency[str(threads)] = {"median_ms": {k: v * 1e3 for k, v in timed.median_s.items()}, "speedup": timed.speedup}
    command = f"benchmarks/.venv-bench/bin/python benchmarks/bench_quant.py --part ptq --calib-sets {args.calib_sets}"
    if args.extended_test != EXTENDED_TEST:
        command += f" --extended-test {args.extended_test}"
    return {"command": command,
            "calib_images": CALIB_IMAGES, "calib_sets": args.calib_sets, "test_images": len(test_ds), "rows": rows,
            "error_images": len(error_images),
            "latency": latency, "bootstrap": bootstrap, "extended": extended, "slimdet_config": config,
            "environment": environment(threads=None)}  # fmt: skip


def _run_extended(images: int, test_ds, baseline, set_files: dict[str, list[Path]],  # noqa: ANN001
                  test_detections: dict[str, list]) -> dict:
    """Test mAP of every contender's files (each calibration set) on the extended test set, by ONNX
    Runtime (FP32: the float model), with paired bootstrap intervals for ``EXTENDED_PAIRS``.

    The extended set starts with the test split's images, so each file's test-split detections
    (``test_detections``, same image ids) are reused and only the new images are predicted.
    """
    from slimdet.evaluate import coco_map, predict
    from slimdet.models.onnx import OrtDetector
    from slimdet.significance import paired_bootstrap

    ext = _extended_test(images, test_ds)
    new = range(len(test_ds), len(ext))
    detections = {"fp32": [test_detections["fp32"][0] + predict(baseline, ext, indices=new, progress=False)]}
    for name, paths in set_files.items():
        detections[name] = [known + predict(OrtDetector(p, like=baseline), ext, indices=new, progress=False)
                            for known, p in zip(test_detections[name], paths, strict=True)]  # fmt: skip
        print(f"extended test: {name} predicted", file=sys.stderr)
    rows = {}
    for name, runs in detections.items():
        scored = [coco_map(ext.coco_gt, run) for run in runs]
        rows[name] = {"map50": [e.map50 for e in scored], "map": [e.map for e in scored]}
    bootstrap = {f"{a} vs {b}": paired_bootstrap(ext.coco_gt, detections[a], detections[b],
                                                 resamples=RESAMPLES, progress=False).to_dict()
                 for a, b in EXTENDED_PAIRS if detections.get(a) and detections.get(b)}  # fmt: skip
    return {"images": len(ext), "rows": rows, "bootstrap": bootstrap}


def run_mp(args: argparse.Namespace) -> dict:
    from slimdet.compress.quant import QuantConfig, quantize
    from slimdet.compress.quant.consistency import check_consistency
    from slimdet.data import load_dataset
    from slimdet.evaluate import evaluate
    from slimdet.export.qdq import export_qdq
    from slimdet.models import load_model
    from slimdet.train import TrainConfig, train

    if not 0 <= args.qat_epochs <= 5:
        raise SystemExit("--qat-epochs must be in 0..5")
    baseline, _ = load_model(BASELINE)
    calib, test_ds = _data()
    float_map = evaluate(baseline, test_ds, progress=False).map50
    model = copy.deepcopy(baseline)
    cfg = QuantConfig(weight_bytes_ratio=0.5, candidate_bits=(2, 4, 8), qat=True)
    t0 = time.perf_counter()
    result = quantize(model, cfg, calib=calib)
    quant_s = time.perf_counter() - t0
    ptq_map = evaluate(model, test_ds, progress=False).map50
    train_s = 0.0
    if args.qat_epochs:
        train_ds = load_dataset("digits-det", "train", input_size=160, augment=True, cache_images=True)
        val_ds = load_dataset("digits-det", "val", input_size=160)
        t0 = time.perf_counter()
        train(model, train_ds, val_ds, TrainConfig(epochs=args.qat_epochs, lr=1e-4, warmup_epochs=0, eval_every=0,
                                                   threads=2), out_dir=args.out / "qat", resume=True)  # fmt: skip
        train_s = time.perf_counter() - t0
    path = args.out / "slimdet_mp.onnx"
    export_qdq(model, path)
    check = check_consistency(model, path, test_ds, raise_on_gap=False, progress=False)
    bits = list(result.weight_bits.values())
    return {"command": f"benchmarks/.venv-bench/bin/python benchmarks/bench_quant.py --part mp --qat-epochs {args.qat_epochs}",
            "qat_epochs": args.qat_epochs, "test_images": len(test_ds), "float_map50": float_map, "ptq_map50": ptq_map,
            "qat_map50_simulated": check.map50_simulated, "qat_map50_onnxruntime": check.map50_runtime,
            "gap_points": check.gap_points, "weight_bytes": result.weight_bytes,
            "weight_bytes_int8": result.weight_bytes_int8, "weight_bytes_ratio": result.weight_bytes_ratio,
            "bits_histogram": {str(b): bits.count(b) for b in sorted(set(bits))}, "weight_bits": result.weight_bits,
            "kept_float": result.kept_float, "quantize_s": quant_s, "qat_s": train_s, "onnx_size_bytes": path.stat().st_size,
            "weight_share": weight_share(result.weight_bits),
            "allocation": result.allocation, "sensitivity": result.to_dict()["sensitivity"],
            "environment": environment(threads=None)}  # fmt: skip


def render_ptq(p: dict) -> str:
    rows, lat = p["rows"], p["latency"]
    fp = rows["fp32"]["test_map50"][0]
    sets = p["calib_sets"]
    lines = [
        "## Quantization: W8A8 post-training, slimdet vs ONNX Runtime vs NNCF",
        "",
        f"`{p['command']}` — yolo-s on digits-det; each contender quantized {sets} times, from {sets} disjoint "
        f"sets of {p['calib_images']} calibration images (train split, the same images for every contender); "
        f"test mAP@.5 on {p['test_images']} images as run by ONNX Runtime: mean over the sets and each set. "
        "Latency at batch 1 of the first set's files, every model timed interleaved with the FP32 model in one "
        "process, each once per round in a fresh random order (median ms; speed-up = FP32 median / median). "
        f"Output error: RMS of the raw outputs' difference from the FP32 model's on {p.get('error_images', 200)} "
        "test images, relative to the FP32 outputs' RMS (mean over the sets; how closely each int8 file computes "
        "what the float model does, a finer measure than mAP).",
        "",
        "| model | test mAP@.5 (mean) | Δ vs FP32 (points) | per calibration set | mAP@[.5:.95] (mean) | "
        "val mAP@.5 (mean) | output error vs FP32 | quantize | ONNX size | b1, 1 thread | speed-up | b1, 2 threads | "
        "speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if "error" in r or not r["test_map50"]:
            lines.append(f"| {name} | not run: {r.get('error', 'no result')} | | | | | | | | | | | |")
            continue
        maps = r["test_map50"]
        m = sum(maps) / len(maps)
        l1, l2 = lat["1"], lat["2"]
        coco, val, err, secs = (fmt.format(sum(r[k]) / len(r[k])) if r.get(k) else "–" for k, fmt in  # older runs
                                (("test_map", "{:.4f}"), ("val_map50", "{:.4f}"), ("output_error", "{:.2%}"),
                                 ("quantize_s", "{:.0f} s")))  # fmt: skip
        lines.append(f"| {name} | {m:.4f} | {100 * (m - fp):+.2f} | {' / '.join(f'{x:.4f}' for x in maps)} | {coco} | "
                     f"{val} | {err} | {secs} | "
                     f"{r['size_bytes'] / 1e6:.2f} MB | {l1['median_ms'][name]:.2f} | {l1['speedup'][name]:.2f}x | "
                     f"{l2['median_ms'][name]:.2f} | {l2['speedup'][name]:.2f}x |")  # fmt: skip
    for name in (n for n in SLIMDET if n in rows):
        s = rows[name]
        kept = sorted({k for kept in s["kept_float"] for k in kept})
        lines += ["", f"{name} simulated vs ONNX Runtime int8 mAP@.5 per set: "
                  + ", ".join(f"{a:.4f} vs {b:.4f} (gap {g:.2f})" for a, b, g in
                              zip(s["test_map50_simulated"], s["test_map50"], s["gap_points"], strict=True))
                  + " points (the check fails above 0.5). Kept in float (by measurement: runtime speed or detection "
                  f"loss; or by float_outputs), over the sets: {', '.join(kept) or 'nothing'}."]  # fmt: skip
    if p.get("bootstrap"):
        lines += ["", "Is a difference real? Test mAP@.5 of a slimdet row minus a contender's (means over the sets), "
                  "with the 95% interval of a paired bootstrap over the test images (each resample scores both "
                  "sides on the same images; `slimdet.significance.paired_bootstrap`): an interval that holds 0 "
                  "cannot rank the two.", "",
                  "| pair | difference (points) | 95% interval (points) | resamples in which the slimdet row is lower |",
                  "|---|---|---|---|"]  # fmt: skip
        lines += _bootstrap_rows(p["bootstrap"])
    if p.get("extended"):
        lines += ["", *render_extended(p["extended"])]
    lines += ["",
              f"Environment: {env_line(p['environment'])}"]  # fmt: skip
    return "\n".join(lines)


def render_extended(e: dict) -> list[str]:
    rows = e["rows"]
    fp = rows["fp32"]["map50"][0]
    lines = [f"The same files on an extended test set of {e['images']} images: the test split's images first, then "
             "new scenes from the same generator and the same test digit pool (`DigitsDetConfig(num_images=...)`; "
             "each scene has its own seeded stream, so the first images are the test split's: checked on their ground "
             "truth, and on the first and last image byte for byte). A larger sample of the same distribution, for a narrower interval.", "",
             "| model | extended test mAP@.5 (mean) | Δ vs FP32 (points) | per calibration set | mAP@[.5:.95] (mean) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, r in rows.items():
        m = sum(r["map50"]) / len(r["map50"])
        lines.append(f"| {name} | {m:.4f} | {100 * (m - fp):+.2f} | {' / '.join(f'{x:.4f}' for x in r['map50'])} | "
                     f"{sum(r['map']) / len(r['map']):.4f} |")  # fmt: skip
    lines += ["", "| pair (extended test set) | difference (points) | 95% interval (points) | "
              "resamples in which the slimdet row is lower |", "|---|---|---|---|"]  # fmt: skip
    return lines + _bootstrap_rows(e["bootstrap"])


def _bootstrap_rows(bootstrap: dict) -> list[str]:
    """Table rows of ``paired_bootstrap`` results (``MapDifference.to_dict()``), in points."""
    return [f"| {pair} | {100 * b['difference']:+.3f} | [{100 * b['low']:+.3f}, {100 * b['high']:+.3f}] | "
            f"{b['a_lower_share']:.0%} of {b['resamples']} |" for pair, b in bootstrap.items()]  # fmt: skip


def weight_share(weight_bits: dict[str, int]) -> dict[str, float]:
    """Fraction of the model's conv weights at each bit-width (32 = float)."""
    from slimdet.models import load_model

    model, _ = load_model(BASELINE)
    sizes = {name: model.get_submodule(name).weight.numel() for name in weight_bits}
    total = sum(sizes.values())
    share: dict[str, float] = {}
    for name, bits in weight_bits.items():
        share[str(bits)] = share.get(str(bits), 0.0) + sizes[name] / total
    return dict(sorted(share.items(), key=lambda kv: int(kv[0])))


def render_mp(p: dict) -> str:
    share = p.get("weight_share") or weight_share(p["weight_bits"])
    hist = ", ".join(f"{b}-bit: {n} layers ({share.get(b, 0):.0%} of the weights)" for b, n in p["bits_histogram"].items())
    return "\n".join([
        "## Quantization: mixed precision under a 50% (of int8) weight budget, with QAT",
        "",
        f"`{p['command']}` — yolo-s on digits-det, {p['test_images']} test images.",
        "",
        "| | test mAP@.5 | Δ vs FP32 (points) |",
        "|---|---|---|",
        f"| FP32 | {p['float_map50']:.4f} | |",
        f"| mixed precision, PTQ | {p['ptq_map50']:.4f} | {100 * (p['ptq_map50'] - p['float_map50']):+.2f} |",
        f"| + {p['qat_epochs']} epochs QAT (simulated) | {p['qat_map50_simulated']:.4f} | "
        f"{100 * (p['qat_map50_simulated'] - p['float_map50']):+.2f} |",
        f"| + QAT, run by ONNX Runtime | {p['qat_map50_onnxruntime']:.4f} | "
        f"{100 * (p['qat_map50_onnxruntime'] - p['float_map50']):+.2f} |",
        "",
        f"Weights: {p['weight_bytes'] / 1e3:,.0f} kB = {p['weight_bytes_ratio']:.1%} of uniform int8 "
        f"({p['weight_bytes_int8'] / 1e3:,.0f} kB), bits chosen by the integer program: {hist}; 32 = float. Kept in "
        "float (runtime speed, measured detection loss for the tail activations, or float_outputs for the raw "
        "predictions): "
        f"{', '.join(p['kept_float']) or 'none'}. Simulated vs ONNX Runtime gap {p['gap_points']:.2f} points. "
        f"Quantization {p['quantize_s']:.0f} s, QAT {p['qat_s']:.0f} s.",
        "",
        f"Environment: {env_line(p['environment'])}",
    ])  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
