"""Recipe step ``lowrank``: factorise Conv2d and Linear layers (SVD, Tucker-2, depthwise-separable).

Its options are slimdet.compress.lowrank's LowRankConfig fields plus where the calibration images
that measure each layer's output error come from. Follow it with ``finetune`` to recover accuracy;
the run's checkpoint after it rebuilds the factorised model through the recorded transform.
"""

from __future__ import annotations

from pydantic import ConfigDict, Field

from slimdet.compress.lowrank import LowRankConfig, decompose
from slimdet.models.base import Detector
from slimdet.pipeline.builtin.compress import calib_batches
from slimdet.pipeline.steps import RunContext, StepOutput, register_step


class LowRankOptions(LowRankConfig):
    """LowRankConfig plus the calibration images (only measured on: the ranks do not depend on them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: images taken (evenly spaced) from ``calib_split``; 0 to skip the output errors
    calib_images: int = Field(16, ge=0)
    calib_split: str = "train"
    calib_batches: int = Field(1, ge=1)


@register_step("lowrank", options=LowRankOptions, changes_model=True)
def lowrank_step(ctx: RunContext, model: Detector, opts: LowRankOptions) -> StepOutput:
    """Low-rank factorisation to a kept energy or a MACs budget; output layers are protected."""
    cfg = LowRankConfig(**{k: getattr(opts, k) for k in LowRankConfig.model_fields})
    calib = calib_batches(ctx, opts.calib_split, opts.calib_images, opts.calib_batches) if opts.calib_images else None
    result = decompose(model, cfg, calib=calib)
    (ctx.step_dir / "lowrank.md").write_text(result.table() + "\n")
    metrics = {
        "macs_before": result.macs_before,
        "macs_after": result.macs_after,
        "macs_reduction": result.macs_reduction,
        "params_before": result.params_before,
        "params_after": result.params_after,
        "layers_factorised": len(result.layers),
        "max_weight_error": max(layer.weight_error for layer in result.layers),
        "output_error": result.output_error,
    }
    return StepOutput(model, record=result.to_dict(), metrics=metrics)
