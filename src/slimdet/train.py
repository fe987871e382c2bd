"""One loop for training and fine-tuning every detector in slimdet.

AdamW with linear warm-up then cosine decay (per step), optional EMA of the weights, gradient
clipping, seeded shuffling and augmentation. After every epoch the full state (weights, EMA,
optimizer, scheduler, history) is written atomically to ``last.pt``, so ``resume=True`` continues
from the last finished epoch; the weights with the best validation mAP go to ``best.pt``. Both
are ordinary slimdet checkpoints (state dicts plus the model config), loadable with
``torch.load(..., weights_only=True)``.

With a ``distiller`` (slimdet.compress.distill) the loss of a batch comes from it instead of the
model alone, and its own parameters (feature adapters) train alongside. Every named loss term is
averaged per epoch into the history and about ten times per epoch into ``loss_curve.json``.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from slimdet.data import DetectionDataset, make_loader
from slimdet.errors import CheckpointError
from slimdet.evaluate import evaluate
from slimdet.io import atomic_write_json, load_checkpoint, save_checkpoint
from slimdet.models.base import Detector
from slimdet.profiling.latency import torch_threads

#: The documented command that trains the shipped baseline (``slimdet train <these> --out DIR``);
#: benchmarks/bench_baseline.py times it and `slimdet demo --retrain` runs it.
BASELINE_TRAIN_ARGS = ["--model", "yolo-s", "--data", "digits-det", "--epochs", "8"]


class TrainConfig(BaseModel):
    """Options of one training or fine-tuning run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)
    min_lr_ratio: float = Field(0.05, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    ema: bool = True
    ema_decay: float = Field(0.999, gt=0, lt=1)
    grad_clip: float = Field(10.0, gt=0)
    augment: bool = True  # read by fit(), which loads the training split
    cache_images: bool = True  # keep decoded training images in RAM (read by fit())
    seed: int = 0
    workers: int = Field(0, ge=0)
    threads: int | None = Field(None, ge=1)
    max_steps_per_epoch: int | None = Field(None, ge=1)
    eval_every: int = Field(1, ge=0)  # epochs between validations; 0 = only after the last epoch
    conf_thres: float = Field(0.001, ge=0, le=1)


@dataclass
class TrainResult:
    """What a run produced: the paths of its checkpoints and the per-epoch history."""

    out_dir: Path
    last_checkpoint: Path
    best_checkpoint: Path | None
    best_map: float
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    #: every loss term averaged over windows of steps: dicts with ``step`` (global) and the terms
    loss_curve: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "last_checkpoint": str(self.last_checkpoint),
            "best_checkpoint": str(self.best_checkpoint) if self.best_checkpoint else None,
            "best_map": self.best_map,
            "best_epoch": self.best_epoch,
            "history": self.history,
        }


def train(
    model: Detector,
    train_ds: DetectionDataset,
    val_ds: DetectionDataset | None,
    cfg: TrainConfig,
    *,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    distiller: nn.Module | None = None,
) -> TrainResult:
    """Train ``model`` in place; on return it holds the final weights (the EMA when enabled).

    ``distiller``: called as ``distiller(model, images, targets) -> (loss, parts)`` for every
    batch instead of ``model.compute_loss``; its parameters are optimized with the model's.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    with torch_threads(cfg.threads or torch.get_num_threads()):
        torch.manual_seed(cfg.seed)
        loader = make_loader(train_ds, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed,
                             num_workers=cfg.workers, drop_last=len(train_ds) > cfg.batch_size)  # fmt: skip
        steps_per_epoch = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
        optimizer = _optimizer(model, cfg, extra=distiller)
        total_steps = cfg.epochs * steps_per_epoch
        warmup_steps = min(int(cfg.warmup_epochs * steps_per_epoch), total_steps // 2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: _lr_factor(step, warmup_steps, total_steps, cfg.min_lr_ratio)
        )
        ema = _ema(model, cfg.ema_decay) if cfg.ema else None
        history: list[dict[str, Any]] = []
        curve: list[dict[str, float]] = []
        start_epoch, best_map, best_epoch = 0, -1.0, -1
        if resume and last_path.is_file():
            state = load_checkpoint(last_path)
            _check_same_model(state, model, last_path)
            if ("distiller" in state["train_state"]) != (distiller is not None):
                started = "with" if distiller is None else "without"
                raise CheckpointError(f"{last_path}: cannot resume: the run started {started} distillation; "
                                      "use another --out folder or the same distillation setting")  # fmt: skip
            model.load_state_dict(state["train_state"]["raw_weights"])
            optimizer.load_state_dict(state["train_state"]["optimizer"])
            scheduler.load_state_dict(state["train_state"]["scheduler"])
            if ema is not None and "ema" in state["train_state"]:
                ema.load_state_dict(state["train_state"]["ema"])
            history = list(state["train_state"]["history"])
            curve = list(state["train_state"].get("loss_curve", []))
            if distiller is not None:
                distiller.load_state_dict(state["train_state"]["distiller"])
            start_epoch = int(state["train_state"]["epoch"]) + 1
            best_map, best_epoch = float(state["train_state"]["best_map"]), int(state["train_state"]["best_epoch"])

        for epoch in range(start_epoch, cfg.epochs):
            torch.manual_seed(cfg.seed * 1000 + epoch)  # augmentation stream of this epoch, resumable
            loader.generator.manual_seed(cfg.seed * 1000 + epoch)  # shuffle order of this epoch
            t0 = time.perf_counter()
            sums, points = _run_epoch(model, loader, optimizer, scheduler, ema, cfg, steps_per_epoch, epoch, progress,
                                      distiller)  # fmt: skip
            curve.extend(points)
            record: dict[str, Any] = {"epoch": epoch, "time_s": time.perf_counter() - t0,
                                      "lr": optimizer.param_groups[0]["lr"], **sums}  # fmt: skip
            eval_model = ema.module if ema is not None else model
            last_epoch = epoch == cfg.epochs - 1
            if val_ds is not None and (last_epoch or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
                metrics = evaluate(eval_model, val_ds, conf_thres=cfg.conf_thres, progress=False)
                record.update(val_map=metrics.map, val_map50=metrics.map50)
                if metrics.map > best_map:
                    best_map, best_epoch = metrics.map, epoch
                    save_checkpoint(best_path, model_config=model.model_config, state_dict=eval_model.state_dict(),
                                    epoch=epoch, metrics=metrics.to_dict())  # fmt: skip
            history.append(record)
            if progress:
                tqdm.write(_format_record(record, cfg.epochs))
            train_state = {"epoch": epoch, "raw_weights": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "history": history, "best_map": best_map,
                           "best_epoch": best_epoch, "config": cfg.model_dump(), "loss_curve": curve}  # fmt: skip
            if ema is not None:
                train_state["ema"] = ema.state_dict()
            if distiller is not None:
                train_state["distiller"] = distiller.state_dict()
            save_checkpoint(last_path, model_config=model.model_config, state_dict=eval_model.state_dict(),
                            epoch=epoch, train_state=train_state)  # fmt: skip
            atomic_write_json(out_dir / "history.json", history)
            atomic_write_json(out_dir / "loss_curve.json", curve)

        if ema is not None:  # hand back the averaged weights
            model.load_state_dict(ema.module.state_dict())
    return TrainResult(out_dir=out_dir, last_checkpoint=last_path,
                       best_checkpoint=best_path if best_path.is_file() else None,
                       best_map=best_map, best_epoch=best_epoch, history=history, loss_curve=curve)  # fmt: skip


def fit(
    model: Detector,
    data: str | Path,
    cfg: TrainConfig,
    *,
    out_dir: str | Path,
    resume: bool = False,
    skip_invalid: bool = False,
    progress: bool = True,
    distiller: nn.Module | None = None,
) -> TrainResult:
    """Load the ``train`` and ``val`` splits of ``data`` (a built-in name or dataset YAML) and train."""
    from slimdet.data import load_dataset

    size = model.input_size
    train_ds = load_dataset(data, "train", input_size=size, augment=cfg.augment, skip_invalid=skip_invalid,
                            cache_images=cfg.cache_images)  # fmt: skip
    val_ds = load_dataset(data, "val", input_size=size, skip_invalid=skip_invalid)
    return train(model, train_ds, val_ds, cfg, out_dir=out_dir, resume=resume, progress=progress, distiller=distiller)


def _run_epoch(model, loader, optimizer, scheduler, ema, cfg, steps, epoch, progress, distiller):  # noqa: ANN001, ANN202
    """One epoch; returns the epoch's mean loss terms and the curve points (window means) it logged."""
    model.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sums: dict[str, float] = {}
    window: dict[str, float] = {}
    points: list[dict[str, float]] = []
    log_every = max(1, steps // 10)
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not progress, leave=False)
    step = 0
    for step, (images, targets) in enumerate(itertools.islice(loader, steps)):
        if distiller is not None:
            loss, parts = distiller(model, images, targets)
        else:
            loss, parts = model.compute_loss(images, targets)
        gradient_step(loss, optimizer, params, cfg.grad_clip, where=f"at epoch {epoch + 1}, step {step + 1}")
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        for k, v in {"loss": loss.item(), **parts}.items():
            sums[k] = sums.get(k, 0.0) + v
            window[k] = window.get(k, 0.0) + v
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n_window = (step % log_every) + 1
            points.append({"step": epoch * steps + step + 1, **{k: v / n_window for k, v in window.items()}})
            window = {}
        bar.update(1)
        bar.set_postfix(loss=f"{sums['loss'] / (step + 1):.3f}")
    bar.close()
    n = step + 1
    return {f"train_{k}": v / n for k, v in sums.items()}, points


def gradient_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grad_clip: float,
    *, where: str = "",
) -> None:  # fmt: skip
    """Back-propagate ``loss`` (refusing a non-finite one), clip the gradient norm of ``params``, step."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss became {loss.item()}" + (f" {where}" if where else ""))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()


def _optimizer(model: nn.Module, cfg: TrainConfig, *, extra: nn.Module | None = None) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    params = list(model.parameters()) + (list(extra.parameters()) if extra is not None else [])
    for p in params:
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)  # no weight decay on biases and norm scales
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.999),
    )  # fmt: skip


def _lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _ema(model: nn.Module, decay: float) -> AveragedModel:
    """EMA of weights and buffers, with the decay ramped up over the first updates (as in YOLOv5)."""

    def avg(averaged: torch.Tensor, current: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        if not averaged.is_floating_point():  # counters, quantization zero points: copy, never average
            return current
        d = decay * (1 - math.exp(-float(num) / 200.0))
        return averaged * d + current * (1 - d)

    return AveragedModel(model, avg_fn=avg, use_buffers=True)


def _check_same_model(state: dict[str, Any], model: Detector, path: Path) -> None:
    if state["model"] != model.model_config:
        raise CheckpointError(
            f"{path}: cannot resume: it was written for model {state['model']} but this run trains "
            f"{model.model_config}; use another --out folder or drop --resume"
        )
    if "train_state" not in state:
        raise CheckpointError(f"{path}: cannot resume: the checkpoint holds no training state")


def _format_record(r: dict[str, Any], epochs: int) -> str:
    text = f"epoch {r['epoch'] + 1}/{epochs}  loss {r.get('train_loss', float('nan')):.3f}  {r['time_s']:.0f}s"
    if "val_map50" in r:
        text += f"  val mAP@.5 {r['val_map50']:.3f}  mAP {r['val_map']:.3f}"
    return text
