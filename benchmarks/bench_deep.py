"""Deep compression of the baseline yolo-s on digits-det: prune, share, Huffman-code (issue 6).

    .venv/bin/python benchmarks/bench_deep.py [--sparsity 0.85] [--prune-epochs 6] [--bits 4] [--share-epochs 2]

Stages, each starting from the previous one (Han, Mao & Dally, "Deep Compression", ICLR 2016):

1. ``pruned``: unstructured magnitude sparsity with one global threshold (``SparsityConfig(sparsity=...)``;
   the six output layers stay dense), then ``--prune-epochs`` of fine-tuning that keeps the zeros;
2. ``shared``: per-layer k-means codebooks of 2^``--bits`` centroids over the nonzero weights (linear
   initialisation), then ``--share-epochs`` of fine-tuning, which trains the centroids by gradient
   aggregation (``slimdet.compress.share``);
3. ``huffman``: the archive written by ``slimdet.export.archive`` (Huffman-coded indices and gaps),
   read back into a new model whose outputs must equal the shared model's bit for bit.

Test mAP@.5 on the 1,000-image test split after each stage (and before each fine-tuning); bytes per
stage as in Han et al.'s table 1, and the ratio to the FP32 state dict. Each stage's checkpoint is
kept under ``--out`` (runs/bench_deep/), so a rerun skips finished stages and fine-tuning resumes
from its last.pt. Writes benchmarks/results/deep.json and the "deep" section of RESULTS.md.
``--max-steps``/``--test-images`` make a quick smoke run (nothing written to results).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from _common import RESULTS_DIR, ROOT, env_line, environment, write_json, write_section

BASELINE = ROOT / "src" / "slimdet" / "assets" / "yolo-s_digits-det.pt"
TARGET_RATIO = 20.0
TARGET_DROP_POINTS = 1.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.85, help="fraction of the weights zeroed (global threshold)")
    parser.add_argument("--prune-epochs", type=int, default=6, help="fine-tuning epochs after pruning")
    parser.add_argument("--bits", type=int, default=4, help="index bits: 2^bits centroids per layer")
    parser.add_argument("--share-epochs", type=int, default=2, help="fine-tuning epochs of the centroids")
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (both stages)")
    parser.add_argument("--output-bits", type=int, default=None,
                        help="also share the 6 output layers (never pruned), with this many index bits")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="stage checkpoints (default runs/bench_deep)")
    parser.add_argument("--max-steps", type=int, default=None, help="smoke run: steps per fine-tuning epoch")
    parser.add_argument("--test-images", type=int, default=None, help="smoke run: evaluate on this many images")
    parser.add_argument("--render-only", action="store_true", help="rewrite RESULTS.md from results/deep.json")
    args = parser.parse_args()
    if args.render_only:
        write_section("deep", render(json.loads((RESULTS_DIR / "deep.json").read_text())))
        return 0
    smoke = args.max_steps is not None or args.test_images is not None
    args.out = args.out or ROOT / "runs" / ("bench_deep_smoke" if smoke else "bench_deep")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from slimdet.compress import ShareConfig, SparsityConfig, share_weights, sparsify
    from slimdet.data import load_dataset
    from slimdet.evaluate import evaluate
    from slimdet.export.archive import read_archive, write_archive
    from slimdet.io import save_checkpoint
    from slimdet.models import load_model
    from slimdet.train import TrainConfig, train

    baseline, _ = load_model(BASELINE)
    size = baseline.input_size
    test_ds = load_dataset("digits-det", "test", input_size=size)
    val_ds = load_dataset("digits-det", "val", input_size=size)
    if args.test_images:
        test_ds, val_ds = test_ds.subset(args.test_images), val_ds.subset(args.test_images)
    data: dict[str, object] = {}

    def train_ds():  # noqa: ANN202 - loaded (and its 6,000 images cached) only when a stage trains
        if "train" not in data:
            data["train"] = load_dataset("digits-det", "train", input_size=size, augment=True, cache_images=True)
        return data["train"]

    def test_map50(model) -> float:  # noqa: ANN001
        return evaluate(model, test_ds, progress=False).map50

    def finetune(model, epochs: int, name: str) -> float:  # noqa: ANN001
        cfg = TrainConfig(epochs=epochs, lr=args.lr, warmup_epochs=0.3, eval_every=0, max_steps_per_epoch=args.max_steps)
        t0 = time.perf_counter()
        train(model, train_ds(), val_ds, cfg, out_dir=args.out / name, resume=True, progress=not smoke)
        return time.perf_counter() - t0

    def stage(name: str, settings: dict, build) -> tuple:  # noqa: ANN001
        """Load the stage's checkpoint when it was made with these settings, else build and save it."""
        path = args.out / f"{name}.pt"
        if path.is_file():
            model, payload = load_model(path)
            if payload.get("bench") != settings:
                raise SystemExit(f"{path} was made with {payload.get('bench')}, not {settings}: use another --out")
            print(f"{name}: loaded {path}")
            return model, payload["info"]
        model, info = build()
        save_checkpoint(path, model_config=model.model_config, state_dict=model.state_dict(), bench=settings, info=info)
        return model, info

    rows: dict[str, dict] = {"baseline": {"test_map50": test_map50(baseline)}}
    prune_settings = {"sparsity": args.sparsity, "epochs": args.prune_epochs, "lr": args.lr, "max_steps": args.max_steps}

    def build_pruned():  # noqa: ANN202
        model = copy.deepcopy(baseline)
        result = sparsify(model, SparsityConfig(sparsity=args.sparsity))
        info = {"sparsity": result.sparsity, "test_map50_before_finetune": test_map50(model)}
        info["finetune_s"] = finetune(model, args.prune_epochs, "prune_ft")
        return model, info

    pruned, info = stage("pruned", prune_settings, build_pruned)
    rows["pruned"] = {**info, "test_map50": test_map50(pruned)}
    print(f"pruned: {rows['pruned']}")
    share_settings = {**prune_settings, "bits": args.bits, "share_epochs": args.share_epochs, "output_bits": args.output_bits}
    outputs = {name: args.output_bits for name in baseline.output_layers()} if args.output_bits else {}

    def build_shared():  # noqa: ANN202
        model = copy.deepcopy(pruned)
        result = share_weights(model, ShareConfig(bits=args.bits, include_output_layers=bool(outputs), overrides=outputs))
        info = {"rel_error": result.rel_error, "layers": len(result.layers), "test_map50_before_finetune": test_map50(model)}
        info["finetune_s"] = finetune(model, args.share_epochs, "share_ft")
        return model, info

    shared, info = stage("shared", share_settings, build_shared)
    rows["shared"] = {**info, "test_map50": test_map50(shared)}
    print(f"shared: {rows['shared']}")

    archive = write_archive(shared, args.out / "yolo-s.sdz")
    decoded = read_archive(archive.path)
    x = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        identical = all(torch.equal(a, b) for a, b in zip(shared.eval()(x), decoded(x), strict=True))
    rows["huffman"] = {"test_map50": test_map50(decoded), "outputs_identical": identical}
    summary = archive.to_dict()
    layers = summary.pop("layers")
    nonzeros = sum(layer["nonzeros"] for layer in layers)
    payload = {
        "command": "benchmarks/bench_deep.py " + " ".join(
            [f"--sparsity {args.sparsity}", f"--prune-epochs {args.prune_epochs}", f"--bits {args.bits}",
             f"--share-epochs {args.share_epochs}", f"--lr {args.lr}", f"--threads {args.threads}"]
            + ([f"--output-bits {args.output_bits}"] if args.output_bits else [])),  # fmt: skip
        "settings": share_settings,
        "rows": rows,
        "archive": summary,
        "baseline_file_bytes": BASELINE.stat().st_size,
        "output_layers": baseline.output_layers(),
        "index_bits_per_nonzero": 8 * sum(layer["index_bytes"] for layer in layers) / max(1, nonzeros),
        "position_bits_per_nonzero": 8 * sum(layer["position_bytes"] for layer in layers) / max(1, nonzeros),
        "codebook_bytes": sum(layer["codebook_bytes"] for layer in layers),
        "nonzeros": nonzeros,
        "weights": sum(layer["numel"] for layer in layers),
        "layers": layers,
        "environment": environment(threads=args.threads),
    }
    text = render(payload)
    print(text)
    if not smoke:
        write_json("deep", payload)
        write_section("deep", text)
    return 0


def render(payload: dict) -> str:
    rows, arc = payload["rows"], payload["archive"]
    base = rows["baseline"]["test_map50"]
    stages = [
        ("FP32 state dict (baseline)", "baseline", arc["dense_bytes"]),
        (f"pruned ({100 * rows['pruned']['sparsity']:.1f}% zeros in the pruned layers): FP32 values + positions", "pruned", arc["pruned_bytes"]),
        (f"shared ({payload['settings']['bits']}-bit indices + codebooks + positions)", "shared", arc["shared_bytes"]),
        ("Huffman-coded archive (file)", "huffman", arc["huffman_bytes"]),
    ]
    lines = [
        "## Deep compression of yolo-s on digits-det (issue 6)",
        "",
        f"Command: `.venv/bin/python {payload['command']}`. Each stage starts from the previous one: global unstructured "
        f"magnitude pruning + {payload['settings']['epochs']} epochs of fine-tuning (masks kept), per-layer k-means weight "
        f"sharing + {payload['settings']['share_epochs']} epochs of centroid fine-tuning (gradient aggregation), then the "
        "Huffman-coded archive (`slimdet.export.archive`), read back into a new model. Bytes as in Han et al. (ICLR 2016), "
        "table 1; tensors outside the shared layers (BatchNorm, biases, unshared output layers) are counted raw in every stage. "
        "mAP@.5 on the 1,000-image test split.",
        "",
        "| stage | bytes | vs FP32 | mAP@.5 before fine-tune | mAP@.5 | Δ mAP@.5 (points) |",
        "|---|---|---|---|---|---|",
    ]
    for label, key, nbytes in stages:
        row = rows[key]
        before = f"{row['test_map50_before_finetune']:.4f}" if "test_map50_before_finetune" in row else "–"
        lines.append(f"| {label} | {nbytes:,} | {arc['dense_bytes'] / nbytes:.1f}x | {before} | {row['test_map50']:.4f} | "
                     f"{100 * (row['test_map50'] - base):+.2f} |")
    ratio = arc["dense_bytes"] / arc["huffman_bytes"]
    drop = 100 * (base - rows["huffman"]["test_map50"])
    lines += [
        "",
        f"- Archive {ratio:.1f}x smaller than the FP32 state dict (target >= {TARGET_RATIO:.0f}x: "
        f"{'met' if ratio >= TARGET_RATIO else '**missed**'}); mAP@.5 change {-drop:+.2f} points (target: drop <= "
        f"{TARGET_DROP_POINTS:.1f}: {'met' if drop <= TARGET_DROP_POINTS else '**missed**'}). The baseline checkpoint file "
        f"is {payload['baseline_file_bytes']:,} bytes ({payload['baseline_file_bytes'] / arc['huffman_bytes']:.1f}x the archive).",
        f"- Archive contents: {payload['nonzeros']:,} nonzero of {payload['weights']:,} shared weights; centroid indices "
        f"{payload['index_bits_per_nonzero']:.2f} bits and positions {payload['position_bits_per_nonzero']:.2f} bits per "
        f"nonzero after Huffman coding; codebooks {payload['codebook_bytes']:,} bytes; raw tensors {arc['raw_bytes']:,} bytes; "
        f"metadata {arc['meta_bytes']:,} bytes.",
        f"- Read back: outputs identical to the shared model: {'yes' if rows['huffman']['outputs_identical'] else '**no**'}.",
        "",
        f"Environment: {env_line(payload['environment'])}. Raw numbers and per-layer bytes: `benchmarks/results/deep.json`.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
