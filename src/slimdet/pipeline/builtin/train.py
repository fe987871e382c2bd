"""Steps that train the model: ``train`` and ``finetune`` (fewer epochs, lower learning rate).

Their options are slimdet.train's TrainConfig fields plus the splits to use, so a recipe accepts
exactly what the training loop accepts. Training writes into the step's folder, so a run
interrupted mid-training resumes from the loop's own last checkpoint.

``finetune`` distills from a teacher by default (``distill: {teacher: original}``, the model
before compression: the output of the run's last ``train`` step, else the model the recipe
starts from); ``distill: null`` fine-tunes on the detection loss alone. Both steps plot every
loss term over the training steps.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, create_model

from slimdet.compress.distill import ORIGINAL, DistillConfig, Distiller, check_pair, load_teacher
from slimdet.errors import ConfigError
from slimdet.models.base import Detector
from slimdet.pipeline.steps import RunContext, StepOutput, register_step
from slimdet.report import plots
from slimdet.train import TrainConfig, train


class TrainOptions(TrainConfig):
    """TrainConfig plus the dataset splits; ``seed: null`` means the recipe's seed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int | None = None  # type: ignore[assignment]
    train_split: str = "train"
    #: validation split (best.pt and the per-epoch mAP); null to train without validation
    val_split: str | None = "val"


def _with_defaults(base: type[BaseModel], name: str, **defaults: Any) -> type[BaseModel]:
    """A subclass of ``base`` whose named fields keep their type and constraints but change default."""
    fields: dict[str, Any] = {}
    for key, value in defaults.items():
        if key not in base.model_fields:
            continue
        info = copy.copy(base.model_fields[key])
        info.default, info.default_factory = value, None
        fields[key] = (info.annotation, info)
    return create_model(name, __base__=base, **fields)


_TRAIN_DEFAULTS = TrainConfig()
# Fine-tuning starts from trained weights: a quarter of the epochs, a tenth of the learning rate.
_FinetuneBase = _with_defaults(
    TrainOptions,
    "_FinetuneBase",
    epochs=max(1, round(_TRAIN_DEFAULTS.epochs / 4)),
    lr=_TRAIN_DEFAULTS.lr / 10,
    warmup_epochs=0,
)


class FinetuneOptions(_FinetuneBase):  # type: ignore[misc, valid-type]
    """Fine-tuning options: TrainConfig fields, splits, and distillation (null: none)."""

    distill: DistillConfig | None = DistillConfig()


@register_step("train", options=TrainOptions, changes_model=True)
def train_step(ctx: RunContext, model: Detector, opts: TrainOptions) -> StepOutput:
    """Train the current model on the recipe's dataset (resumes mid-training after a crash)."""
    return _run_training(ctx, model, opts)


@register_step("finetune", options=FinetuneOptions, changes_model=True)
def finetune_step(ctx: RunContext, model: Detector, opts: FinetuneOptions) -> StepOutput:
    """Fine-tune the current model (e.g. after pruning), distilling from the original by default."""
    if opts.distill is None:
        return _run_training(ctx, model, opts)
    teacher, source, skipped = _teacher(ctx, model, opts)
    if teacher is None:
        out = _run_training(ctx, model, opts)
        out.record["distill"] = {"skipped": skipped}
        return out
    with Distiller(model, teacher, opts.distill) as distiller:
        out = _run_training(ctx, model, opts, distiller=distiller)
    out.record["distill"] = {"teacher": source, "adapters": sorted(distiller.adapters.keys()),
                             "adapter_fit_residual": distiller.adapter_fit,
                             "config": opts.distill.model_dump(mode="json")}  # fmt: skip
    return out


def _teacher(ctx: RunContext, model: Detector, opts: FinetuneOptions) -> tuple[Detector | None, str, str]:
    """The teacher model and where it came from; (None, "", why) when the default cannot apply."""
    from slimdet.pipeline.run import INPUT_CHECKPOINT

    name = opts.distill.teacher
    if name == ORIGINAL:
        trained = [r for r in ctx.history if r.get("name") == "train" and r.get("changes_model")]
        rel = trained[-1]["checkpoint"] if trained else INPUT_CHECKPOINT
        path = ctx.run_dir / rel
    else:
        path = _resolve(ctx, name)
        rel = str(path)
    teacher = load_teacher(path)
    try:
        check_pair(model, teacher)
    except ConfigError as exc:
        if "distill" in opts.model_fields_set:  # asked for: a clear error
            raise ConfigError(f"{ctx.where('distill')}: {exc}") from None
        # the default: fine-tune without it, and say so in the record and on the console
        why = f"{exc}; fine-tuned on the detection loss alone (set distill: null to silence this)"
        if ctx.progress:
            print(f"{ctx.where('distill')}: {why}", file=sys.stderr)
        return None, "", why
    return teacher, rel, ""


def _resolve(ctx: RunContext, name: str) -> Path:
    """A teacher checkpoint path: relative to the recipe's folder, then the current folder."""
    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() else [Path(ctx.recipe.source).parent / path, path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{ctx.where('distill.teacher')}: teacher checkpoint {name!r} not found "
                      f"(looked at {', '.join(str(c) for c in candidates)})")  # fmt: skip


def _run_training(
    ctx: RunContext, model: Detector, opts: TrainOptions, *, distiller: Distiller | None = None
) -> StepOutput:
    values = {k: getattr(opts, k) for k in TrainConfig.model_fields}
    if values.get("seed") is None:
        values["seed"] = ctx.recipe.seed
    cfg = TrainConfig(**values)
    train_ds = ctx.dataset(opts.train_split, augment=cfg.augment, cache_images=cfg.cache_images)
    val_ds = ctx.dataset(opts.val_split) if opts.val_split is not None else None
    # trains in place and leaves the final weights (the EMA when enabled) in the model
    result = train(model, train_ds, val_ds, cfg, out_dir=ctx.step_dir, resume=ctx.resume, progress=ctx.progress,
                   distiller=distiller)  # fmt: skip
    last = result.history[-1] if result.history else {}
    metrics = {
        "epochs": len(result.history),
        "final_train_loss": last.get("train_loss"),
        "final_val_map": last.get("val_map"),
        "final_val_map50": last.get("val_map50"),
        "best_val_map": result.best_map if result.best_epoch >= 0 else None,
        "best_epoch": result.best_epoch if result.best_epoch >= 0 else None,
    }
    record = {
        "config": cfg.model_dump(mode="json"),
        "history": result.history,
        "last_checkpoint": _relative(result.last_checkpoint, ctx),
        "best_checkpoint": _relative(result.best_checkpoint, ctx) if result.best_checkpoint else None,
    }
    png = plots.loss_terms(result.loss_curve)
    if png is not None:
        (ctx.step_dir / "loss_terms.png").write_bytes(png)
        record["loss_terms_plot"] = _relative(ctx.step_dir / "loss_terms.png", ctx)
    return StepOutput(model, record=record, metrics=metrics)


def _relative(path: Path, ctx: RunContext) -> str:
    try:
        return str(Path(path).resolve().relative_to(ctx.run_dir.resolve()))
    except ValueError:
        return str(path)
