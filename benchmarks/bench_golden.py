"""The integer-only reference (golden model) of the quantized yolo-s against the simulation (issue 4).

    .venv/bin/python benchmarks/bench_golden.py [--images 8] [--out runs/bench_golden]

Quantizes the shipped baseline to W8A8 and to W4A8 (slimdet PTQ, every layer integer: auto-keep
off and runtime-aware float fallback off, since the golden model runs integer layers only), exports the QDQ ONNX file, builds the
golden model from it and compares, teacher-forced, every integer layer's output with the simulated
quantization (the same graph executed Q/DQ by Q/DQ in ONNX Runtime) on test images: the acceptance
is <= 1 LSB at every layer. Also reports the free-running end-to-end difference at the outputs and
writes the hardware package. Writes benchmarks/results/golden.json and the "golden" section.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS_DIR, ROOT, env_line, environment, write_json, write_section

BASELINE = ROOT / "src" / "slimdet" / "assets" / "yolo-s_digits-det.pt"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_golden")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    if args.render_only:
        write_section("golden", render(json.loads((RESULTS_DIR / "golden.json").read_text())))
        return 0
    torch.set_num_threads(1)
    from slimdet.compress.quant import QuantConfig, quantize
    from slimdet.data import load_dataset, make_loader
    from slimdet.export.golden import GoldenModel, compare_layers
    from slimdet.export.hwpackage import export_hw_package, load_hw_package
    from slimdet.export.qdq import export_qdq
    from slimdet.models import load_model

    baseline, _ = load_model(BASELINE)
    calib = list(make_loader(load_dataset("digits-det", "train", input_size=160).subset(128), batch_size=32, shuffle=False))
    test = load_dataset("digits-det", "test", input_size=160).subset(args.images)
    images = [test[i][0][None].numpy() for i in range(len(test))]
    rows = {}
    every_layer_integer = {"auto_keep": False, "runtime_aware": False, "float_outputs": False}
    for name, cfg in {"W8A8": QuantConfig(**every_layer_integer),
                      "W4A8": QuantConfig(weight_bits=4, **every_layer_integer)}.items():  # fmt: skip
        model = copy.deepcopy(baseline)
        quantize(model, cfg, calib=calib, progress=False)
        path = args.out / f"{name}.onnx"
        export_qdq(model, path)
        t0 = time.perf_counter()
        golden = GoldenModel.from_onnx(path)
        build_s = time.perf_counter() - t0
        per_layer, end_to_end, run_s = [], [], []
        for x in images:
            t0 = time.perf_counter()
            golden.run(x)
            run_s.append(time.perf_counter() - t0)
            match = compare_layers(golden, path, x)
            per_layer.append(match.max_lsb)
            end_to_end.append(max(match.end_to_end_max_lsb.values()))
        pkg = export_hw_package(golden, args.out / f"{name}_hw_package", image=images[0])
        rows[name] = {"layers": len(golden.layers()), "max_lsb_per_layer": int(max(per_layer)),
                      "max_lsb_end_to_end": int(max(end_to_end)), "golden_run_s": float(np.median(run_s)),
                      "build_s": build_s, "hw_package_verify_lsb": int(load_hw_package(pkg).verify()),
                      "hw_package_bytes": sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())}  # fmt: skip
    payload = {"command": f".venv/bin/python benchmarks/bench_golden.py --images {args.images}",
               "images": len(images), "rows": rows, "environment": environment(threads=1)}  # fmt: skip
    write_json("golden", payload)
    write_section("golden", render(payload))
    print(render(payload))
    return 0


def render(p: dict) -> str:
    lines = [
        "## Quantization: integer-only reference (golden model) vs the simulation",
        "",
        f"`{p['command']}` — yolo-s quantized by slimdet PTQ, every layer integer; {p['images']} test images; "
        "teacher-forced per-layer comparison with the simulated quantization (acceptance: <= 1 LSB).",
        "",
        "| model | integer layers | max diff per layer (LSB) | end-to-end max diff at outputs (LSB) | golden run / image | hw package |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in p["rows"].items():
        lines.append(f"| {name} | {r['layers']} | {r['max_lsb_per_layer']} | {r['max_lsb_end_to_end']} | "
                     f"{r['golden_run_s']:.2f} s | {r['hw_package_bytes'] / 1e6:.1f} MB, re-verified "
                     f"{r['hw_package_verify_lsb']} LSB |")  # fmt: skip
    lines += ["", "Format of the hardware package: docs/hw-package.md.", "",
              f"Environment: {env_line(p['environment'])}"]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
