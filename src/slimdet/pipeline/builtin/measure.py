"""Steps that measure the model without changing it: evaluate, profile, export."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from slimdet.models.base import Detector
from slimdet.pipeline.steps import RunContext, StepOptions, StepOutput, register_step


class EvaluateOptions(StepOptions):
    split: str = "test"
    batch_size: int = Field(16, ge=1)
    conf_thres: float = Field(0.001, ge=0.0, le=1.0)
    iou_thres: float = Field(0.6, ge=0.0, le=1.0)
    max_det: int = Field(100, ge=1)
    #: evaluate on this many evenly spaced images of the split (all when null), for quick runs
    max_images: int | None = Field(None, ge=1)


@register_step("evaluate", options=EvaluateOptions, changes_model=False)
def evaluate_step(ctx: RunContext, model: Detector, opts: EvaluateOptions) -> StepOutput:
    """COCO mAP of the current model on one split of the recipe's dataset."""
    from slimdet.evaluate import evaluate

    dataset = ctx.dataset(opts.split)
    if opts.max_images is not None and opts.max_images < len(dataset):
        dataset = dataset.subset(opts.max_images)
    result = evaluate(
        model,
        dataset,
        batch_size=opts.batch_size,
        conf_thres=opts.conf_thres,
        iou_thres=opts.iou_thres,
        max_det=opts.max_det,
        progress=ctx.progress,
    )
    metrics = {"split": opts.split, **result.to_dict()}
    return StepOutput(model, record={"split": opts.split, "num_images": len(dataset)}, metrics=metrics)


class ProfileOptions(StepOptions):
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8], min_length=1)
    #: intra-op threads for PyTorch and ONNX Runtime; null: the profiler's default
    threads: int | None = Field(None, ge=1)
    runs: int = Field(10, ge=1)
    warmup: int = Field(2, ge=0)
    onnx: bool = True

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(b < 1 for b in value):
            raise ValueError(f"batch sizes must be >= 1, got {value}")
        return value


@register_step("profile", options=ProfileOptions, changes_model=False)
def profile_step(ctx: RunContext, model: Detector, opts: ProfileOptions) -> StepOutput:
    """Parameters, MACs, size and measured latency (PyTorch and ONNX Runtime) of the current model."""
    from slimdet.profile import profile

    result = profile(
        model,
        batch_sizes=tuple(opts.batch_sizes),
        threads=opts.threads,
        warmup=opts.warmup,
        runs=opts.runs,
        onnx=opts.onnx,
        progress=ctx.progress,
    )
    metrics = result.to_dict()
    # the per-layer table is bulky: it goes into the step record, the summary into metrics
    layers = metrics.pop("layers", None)
    record = {"layers": layers} if layers is not None else {}
    return StepOutput(model, record=record, metrics=metrics)


class ExportOptions(StepOptions):
    format: Literal["onnx"] = "onnx"
    batch_size: int = Field(1, ge=1)
    dynamic_batch: bool = False
    opset: int = Field(17, ge=7)
    check: bool = True
    atol: float = Field(1e-4, gt=0)
    #: file name inside the step's folder
    filename: str = "model.onnx"

    @field_validator("format", mode="before")
    @classmethod
    def _known_format(cls, value: Any) -> Any:
        if value != "onnx":
            raise ValueError(f"unsupported format {value!r}: only 'onnx' is available for now")
        return value

    @field_validator("filename")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value or Path(value).name != value:
            raise ValueError(f"expected a plain file name (no folders), got {value!r}")
        return value


@register_step("export", options=ExportOptions, changes_model=False)
def export_step(ctx: RunContext, model: Detector, opts: ExportOptions) -> StepOutput:
    """Export the current model (ONNX) into the run directory, checked against PyTorch.

    A quantized model is written in QDQ form (int8 weights, ONNX Runtime's integer kernels)."""
    from slimdet.export.qdq import QdqExportResult, export_deployable

    path = ctx.step_dir / opts.filename
    result = export_deployable(model, path, batch_size=opts.batch_size, dynamic_batch=opts.dynamic_batch,
                               opset=opts.opset, check=opts.check, atol=opts.atol)  # fmt: skip
    record = {**result.to_dict(), "path": str(path.relative_to(ctx.run_dir))}
    fmt = "onnx-qdq" if isinstance(result, QdqExportResult) else opts.format
    metrics = {"format": fmt, "size_bytes": result.size_bytes, "max_abs_diff": result.max_abs_diff}
    return StepOutput(model, record=record, metrics=metrics)
