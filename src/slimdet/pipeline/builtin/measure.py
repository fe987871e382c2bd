"""Steps that measure the model without changing it: evaluate, profile, export."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from slimdet.errors import ConfigError
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
    #: "archive": the deep-compression archive (slimdet.export.archive), read back and compared when check
    format: Literal["onnx", "archive"] = "onnx"
    batch_size: int = Field(1, ge=1)
    dynamic_batch: bool = False
    opset: int = Field(17, ge=7)
    check: bool = True
    atol: float = Field(1e-4, gt=0)
    #: file name inside the step's folder (format archive: model.sdz unless given)
    filename: str = "model.onnx"
    #: clean the FP32 ONNX graph with onnxslim (slimdet.export.slim); op counts before/after in the metrics
    slim: bool = False

    @field_validator("format", mode="before")
    @classmethod
    def _known_format(cls, value: Any) -> Any:
        if value not in ("onnx", "archive"):
            raise ValueError(f"unsupported format {value!r}: only 'onnx' and 'archive' are available")
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

    if opts.format == "archive":
        return _export_archive(ctx, model, opts)
    path = ctx.step_dir / opts.filename
    result = export_deployable(model, path, batch_size=opts.batch_size, dynamic_batch=opts.dynamic_batch,
                               opset=opts.opset, check=opts.check, atol=opts.atol)  # fmt: skip
    record = {**result.to_dict(), "path": str(path.relative_to(ctx.run_dir))}
    fmt = "onnx-qdq" if isinstance(result, QdqExportResult) else opts.format
    metrics = {"format": fmt, "size_bytes": result.size_bytes, "max_abs_diff": result.max_abs_diff}
    if opts.slim:
        if isinstance(result, QdqExportResult):  # constant folding would turn the int8 weights back into floats
            raise ConfigError(f"{ctx.where('slim')}: onnxslim is for FP32 exports, this model is quantized")
        from slimdet.export.slim import slim_onnx

        slimmed = slim_onnx(path, path, check=opts.check, atol=opts.atol)
        record["slim"] = slimmed.to_dict()
        metrics.update(size_bytes=slimmed.size_bytes_after, op_counts_before=slimmed.op_counts_before,
                       op_counts_after=slimmed.op_counts_after, nodes_before=slimmed.nodes_before,
                       nodes_after=slimmed.nodes_after)  # fmt: skip
    return StepOutput(model, record=record, metrics=metrics)


def _export_archive(ctx: RunContext, model: Detector, opts: ExportOptions) -> StepOutput:
    """Write the deep-compression archive; with ``check``, read it back and require identical outputs."""
    import torch

    from slimdet.errors import ExportError
    from slimdet.export.archive import ARCHIVE_SUFFIX, read_archive, write_archive

    name = opts.filename if "filename" in opts.model_fields_set else f"model{ARCHIVE_SUFFIX}"
    result = write_archive(model, ctx.step_dir / name)
    max_abs_diff = None
    if opts.check:
        x = model.example_inputs(opts.batch_size)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            pairs = zip(_tensors(model(x)), _tensors(read_archive(result.path)(x)), strict=True)
            max_abs_diff = max(float((a - b).abs().max()) for a, b in pairs)
        model.train(was_training)
        if max_abs_diff != 0.0:
            raise ExportError(f"{result.path}: archive read back gives outputs differing by {max_abs_diff}")
    record = {**result.to_dict(), "path": str((ctx.step_dir / name).relative_to(ctx.run_dir))}
    metrics = {"format": "archive", "size_bytes": result.size_bytes, "max_abs_diff": max_abs_diff,
               **{k: v for k, v in result.stages.to_dict().items() if k != "ratios"},
               **{f"ratio_{k}": v for k, v in result.stages.ratios().items()}}  # fmt: skip
    return StepOutput(model, record=record, metrics=metrics)


def _tensors(raw: Any) -> list[Any]:
    return list(raw) if isinstance(raw, tuple | list) else [raw]
