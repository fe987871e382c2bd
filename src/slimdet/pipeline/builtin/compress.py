"""Steps that compress the model: ``prune``.

``prune`` takes :class:`~slimdet.compress.PruneConfig`'s fields plus where its calibration images
come from; follow it with ``finetune`` to recover accuracy, and with ``evaluate`` / ``profile`` to
put the pruned model next to the original in the report.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ConfigDict, Field

from slimdet.compress.prune import PruneConfig
from slimdet.models.base import Detector
from slimdet.pipeline.steps import RunContext, StepOutput, register_step


class PruneOptions(PruneConfig):
    """PruneConfig plus the calibration images (for taylor, hessian and sensitivity allocation)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: images taken (evenly spaced) from ``calib_split`` and cut into ``calib_batches`` batches
    calib_images: int = Field(32, ge=1)
    calib_split: str = "train"
    #: with iterative_steps > 1: epochs of fine-tuning after every round but the last (0: none)
    round_finetune_epochs: int = Field(1, ge=0)


@register_step("prune", options=PruneOptions, changes_model=True)
def prune_step(ctx: RunContext, model: Detector, opts: PruneOptions) -> StepOutput:
    """Structured pruning to a channel, MACs, parameter or modelled-latency target; output layers are protected."""
    from slimdet.compress.prune import prune

    cfg = PruneConfig(**{k: getattr(opts, k) for k in PruneConfig.model_fields})
    needs_calib = cfg.importance in ("taylor", "hessian") or cfg.allocation in ("sensitivity", "latency")
    calib = calib_batches(ctx, opts.calib_split, opts.calib_images, opts.calib_batches) if needs_calib else None
    finetune = _round_finetune(ctx, opts) if cfg.iterative_steps > 1 and opts.round_finetune_epochs else None
    result = prune(model, cfg, calib=calib, finetune=finetune, progress=ctx.progress)
    record = result.to_dict()
    if result.sensitivity is not None:
        plot = result.sensitivity.plot(ctx.step_dir / "sensitivity.png")
        record["sensitivity_plot"] = str(plot.relative_to(ctx.run_dir))
        (ctx.step_dir / "sensitivity.txt").write_text(result.sensitivity.table() + "\n")
    metrics = {
        "params_before": result.params_before,
        "params_after": result.params_after,
        "params_kept": result.params_kept,
        "macs_before": result.macs_before,
        "macs_after": result.macs_after,
        "macs_kept": result.macs_kept,
        "channels_removed": result.channels_removed,
        "layers_changed": len(result.channels),
        "importance": result.importance,
    }
    if result.hardware is not None:
        metrics.update({f"modelled_{k}": v for k, v in result.hardware.items()})
    return StepOutput(model, record=record, metrics=metrics)


def calib_batches(ctx: RunContext, split: str, images: int, batches: int) -> list[tuple[Any, Any]]:
    """``images`` evenly spaced images of ``split``, as ``batches`` (images, targets) batches."""
    from slimdet.data import calibration_batches

    return calibration_batches(ctx.dataset(split), images=images, batches=batches)


def _round_finetune(ctx: RunContext, opts: PruneOptions) -> Callable[[Detector, int], None]:
    """Fine-tuning between rounds: the ``finetune`` step's learning rate, no validation."""
    from slimdet.train import TrainConfig, train

    defaults = TrainConfig()

    def finetune(model: Detector, round_index: int) -> None:
        cfg = TrainConfig(epochs=opts.round_finetune_epochs, lr=defaults.lr / 10, warmup_epochs=0,
                          seed=ctx.recipe.seed + round_index)  # fmt: skip
        train_ds = ctx.dataset("train", augment=cfg.augment, cache_images=cfg.cache_images)
        train(model, train_ds, None, cfg, out_dir=ctx.step_dir / f"round{round_index}", progress=ctx.progress)

    return finetune
