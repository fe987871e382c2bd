"""The ``quantize`` step: simulated quantization, the int8 ONNX file, and the consistency check.

Options are :class:`~slimdet.compress.QuantConfig`'s fields plus where the calibration images
come from and what to check. After quantizing, the step writes the QDQ ONNX file (ONNX Runtime's
int8 kernels run it), evaluates both the simulated model and that file on ``check_split`` and fails
when their mAP@.5 differ by more than ``check_tolerance`` points. With ``qat: true`` follow it with
``finetune`` (learned step sizes train with the weights), then ``export`` re-writes the int8 file.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field

from slimdet.compress.quant.config import QuantConfig
from slimdet.errors import ConfigError
from slimdet.models.base import Detector
from slimdet.pipeline.builtin.compress import calib_batches
from slimdet.pipeline.steps import RunContext, StepOutput, register_step


class QuantizeOptions(QuantConfig):
    """QuantConfig plus calibration data and the deployment check."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: images taken (evenly spaced) from ``calib_split``, cut into ``calib_batches`` batches
    calib_images: int = Field(256, ge=1)
    calib_split: str = "train"
    #: write the QDQ ONNX file and compare its mAP with the simulation's
    check: bool = True
    check_split: str = "val"
    #: evaluate the check on this many evenly spaced images (all when null)
    check_images: int | None = Field(500, ge=1)
    check_tolerance: float = Field(0.5, gt=0)  # mAP@.5 points
    #: also write the integer-only reference's hardware package (per-layer integer tensors)
    hw_package: bool = False


@register_step("quantize", options=QuantizeOptions, changes_model=True)
def quantize_step(ctx: RunContext, model: Detector, opts: QuantizeOptions) -> StepOutput:
    """Mixed-precision PTQ (or QAT set-up); int8 ONNX export checked against the simulation."""
    from slimdet.compress.quant import quantize
    from slimdet.compress.quant.consistency import check_consistency
    from slimdet.export.qdq import export_qdq
    from slimdet.search.mixed_precision import plot_bits

    cfg = QuantConfig(**{k: getattr(opts, k) for k in QuantConfig.model_fields})
    calib = calib_batches(ctx, opts.calib_split, opts.calib_images, opts.calib_batches)
    result = quantize(model, cfg, calib=calib, progress=ctx.progress)
    record: dict[str, Any] = result.to_dict()
    (ctx.step_dir / "quantize.txt").write_text(result.to_text() + "\n")
    plot = plot_bits(result.weight_bits, ctx.step_dir / "weight_bits.png", title="weight bits per layer (32 = float)")
    record["weight_bits_plot"] = str(plot.relative_to(ctx.run_dir))
    record["layers"] = [{"layer": name, "weight_bits": bits, "params": model.get_submodule(name).weight.numel()}
                        for name, bits in result.weight_bits.items()]  # fmt: skip
    metrics: dict[str, Any] = {
        "weight_bytes": result.weight_bytes,
        "weight_bytes_ratio_int8": result.weight_bytes_ratio,
        "weight_bytes_ratio_fp32": result.weight_bytes / result.weight_bytes_fp32,
        "bitops_ratio_w8a8": result.bitops / result.bitops_w8a8,
        "kept_float": list(result.kept_float),
        "mean_weight_bits": _mean_bits(result.weight_bits, model),
    }
    if opts.check:
        onnx_path = ctx.step_dir / "model_int8.onnx"
        exported = export_qdq(model, onnx_path)
        record["onnx"] = {**exported.to_dict(), "path": str(onnx_path.relative_to(ctx.run_dir))}
        dataset = ctx.dataset(opts.check_split)
        if opts.check_images is not None and opts.check_images < len(dataset):
            dataset = dataset.subset(opts.check_images)
        check = check_consistency(model, exported.path, dataset, tolerance_points=opts.check_tolerance,
                                  progress=ctx.progress)  # fmt: skip
        record["consistency"] = check.to_dict()
        metrics.update(map50_simulated=check.map50_simulated, map50_onnxruntime=check.map50_runtime,
                       consistency_gap_points=check.gap_points, onnx_int8_size_bytes=exported.size_bytes)  # fmt: skip
    if opts.hw_package:
        if result.kept_float:
            raise ConfigError(
                f"{ctx.where('hw_package')}: the integer-only reference needs every layer in integers, but "
                f"{', '.join(result.kept_float)} stayed float; set auto_keep: false, runtime_aware: false and "
                "float_outputs: false (and keep_float: []) to build a hardware package"
            )
        from slimdet.export.golden import GoldenModel
        from slimdet.export.hwpackage import export_hw_package

        onnx_path = ctx.step_dir / "model_int8.onnx"
        if not onnx_path.exists():
            export_qdq(model, onnx_path)
        pkg = export_hw_package(GoldenModel.from_onnx(onnx_path), ctx.step_dir / "hw_package")
        record["hw_package"] = str(pkg.relative_to(ctx.run_dir))
    return StepOutput(model, record=record, metrics=metrics)


def _mean_bits(bits: dict[str, int], model: Detector) -> float:
    sizes = {name: model.get_submodule(name).weight.numel() for name in bits}
    return sum(bits[n] * sizes[n] for n in bits) / max(sum(sizes.values()), 1)
