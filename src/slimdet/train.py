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

Under torchrun (``slimdet train ... --nproc N``, see slimdet.distributed) the same loop runs
data-parallel, one process per CPU share or GPU: ``batch_size`` stays the global batch, each
rank trains on its contiguous share of the batches a single process would draw (same seed, same
order), and DistributedDataParallel averages the gradients of model and distiller, so the ranks
keep identical weights. The loss terms logged are means over the ranks; validation splits the
images over the ranks and scores the gathered detections once, so every rank sees the same
mAP; only rank 0 writes checkpoints and logs and shows progress, and ``resume`` reads rank 0's
``last.pt``. Losses normalized by a batch-level total (the detection loss's target-score sum, the distillation
terms') divide by the global batch's total (slimdet.distributed.loss_normalizer). What remains
different from the single process is batch norm in training mode: its statistics are per rank on
CPU (``TrainConfig.sync_bn`` on GPUs); with ``freeze_bn`` (running statistics, as fine-tuning
often does anyway) a data-parallel run computes what one process computes, up to float rounding.
"""

from __future__ import annotations

import itertools
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from slimdet import distributed
from slimdet.data import DetectionDataset, make_loader
from slimdet.distributed import DistContext
from slimdet.errors import CheckpointError, ConfigError
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
    #: data-parallel runs only: batch-norm statistics over the global batch (torch.nn.SyncBatchNorm), as one
    #: process would compute them. None: on with nccl (GPUs); torch 2.14.1's SyncBatchNorm refuses CPU
    #: tensors, so on gloo (CPU) each rank normalizes with its own share of the batch (True there is an error)
    sync_bn: bool | None = None
    #: batch norm in inference mode while training: normalise with the running statistics and leave them as
    #: they are (the affine weights still train); makes a data-parallel CPU run match a single process
    freeze_bn: bool = False


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
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    with distributed.process_group() as ctx, torch_threads(cfg.threads or torch.get_num_threads()):
        rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
        progress = progress and rank == 0
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        loader = make_loader(train_ds, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, num_workers=cfg.workers,
                             drop_last=len(train_ds) > cfg.batch_size, rank=rank, world_size=world)  # fmt: skip
        steps_per_epoch = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
        origin = _place(model, distiller, ctx)
        with _batchnorm(model, cfg, ctx):
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
            # rank 0 reads last.pt and hands it to the others: its folder may exist on its machine only
            state = distributed.run_on_main(lambda: load_checkpoint(last_path) if last_path.is_file() else None) \
                if resume else None  # fmt: skip
            if state is not None:
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
            if state is None and distiller is not None and hasattr(distiller, "prepare"):
                # e.g. refit a pruned student or fit feature adapters; before DDP copies rank 0's to all
                distiller.prepare(model, loader, progress=progress)
            batch_loss: nn.Module = BatchLoss(model, distiller)
            if ctx is not None:
                batch_loss = distributed.wrap_ddp(batch_loss, ctx)

            for epoch in range(start_epoch, cfg.epochs):
                # augmentation stream of this epoch (resumable; another one on each rank)
                torch.manual_seed(cfg.seed * 1000 + epoch + (rank << 32))
                loader.generator.manual_seed(cfg.seed * 1000 + epoch)  # shuffle order of this epoch, on every rank
                t0 = time.perf_counter()
                with distributed.synced_loss_normalizers():  # the global batch's normalizers (a no-op alone)
                    sums, points = _run_epoch(batch_loss, model, loader, optimizer, scheduler, ema, cfg,
                                              steps_per_epoch, epoch, progress, ctx)  # fmt: skip
                curve.extend(points)
                record: dict[str, Any] = {"epoch": epoch, "time_s": time.perf_counter() - t0,
                                          "lr": optimizer.param_groups[0]["lr"], **sums}  # fmt: skip
                if ctx is not None:  # rank 0's batch-norm statistics (and their EMA) are the run's
                    distributed.broadcast_buffers(model)
                    if ema is not None:
                        distributed.broadcast_buffers(ema)
                eval_model = ema.module if ema is not None else model
                last_epoch = epoch == cfg.epochs - 1
                if val_ds is not None and (last_epoch or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
                    metrics = evaluate(eval_model, val_ds, conf_thres=cfg.conf_thres, progress=False,
                                       distributed=ctx is not None)  # fmt: skip
                    record.update(val_map=metrics.map, val_map50=metrics.map50)
                    if metrics.map > best_map:
                        best_map, best_epoch = metrics.map, epoch
                        if rank == 0:
                            save_checkpoint(best_path, model_config=model.model_config,
                                            state_dict=eval_model.state_dict(), epoch=epoch,
                                            metrics=metrics.to_dict())  # fmt: skip
                history.append(record)
                if progress:
                    tqdm.write(_format_record(record, cfg.epochs))
                if rank == 0:
                    _save_last(last_path, model, optimizer, scheduler, ema, distiller, cfg, epoch=epoch,
                               history=history, curve=curve, best_map=best_map, best_epoch=best_epoch)  # fmt: skip
                    atomic_write_json(out_dir / "history.json", history)
                    atomic_write_json(out_dir / "loss_curve.json", curve)

            if ema is not None:  # hand back the averaged weights
                model.load_state_dict(ema.module.state_dict())
        if origin is not None:
            model.to(origin)
        distributed.barrier()  # every rank returns once rank 0's files are written
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


class BatchLoss(nn.Module):
    """The model and the optional distiller as one module whose forward is the loss of a batch.

    What DistributedDataParallel wraps: its backward hooks then average the gradients of every
    trained parameter, the distiller's feature adapters included.
    """

    def __init__(self, model: Detector, distiller: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.distiller = distiller

    def forward(self, images: torch.Tensor, targets: list[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, float]]:
        if self.distiller is not None:
            return self.distiller(self.model, images, targets)
        return self.model.compute_loss(images, targets)


def _run_epoch(batch_loss, model, loader, optimizer, scheduler, ema, cfg, steps, epoch, progress, ctx):  # noqa: ANN001, ANN202
    """One epoch; returns the epoch's mean loss terms and the curve points (window means) it logged."""
    model.train()
    if cfg.freeze_bn:  # normalise with the running statistics, which then stay as they are
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sums: dict[str, float] = {}
    window: dict[str, float] = {}
    points: list[dict[str, float]] = []
    log_every = max(1, steps // 10)
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not progress, leave=False)
    step = 0
    for step, (images, targets) in enumerate(itertools.islice(loader, steps)):
        if ctx is not None:
            images = images.to(ctx.device, non_blocking=True)
        loss, parts = batch_loss(images, targets)
        terms = distributed.mean_over_ranks({"loss": loss.item(), **parts})
        where = f"at epoch {epoch + 1}, step {step + 1}"
        if not math.isfinite(terms["loss"]):  # the mean: every rank stops together
            raise FloatingPointError(f"training loss became {terms['loss']} {where}")
        gradient_step(loss, optimizer, params, cfg.grad_clip, where=where)
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        for k, v in terms.items():
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


def _save_last(path, model, optimizer, scheduler, ema, distiller, cfg, *, epoch, history, curve, best_map,
               best_epoch) -> None:  # noqa: ANN001  # fmt: skip
    """``last.pt``: the weights to use (the EMA when on) plus everything ``resume`` needs."""
    train_state = {"epoch": epoch, "raw_weights": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "history": history, "best_map": best_map,
                   "best_epoch": best_epoch, "config": cfg.model_dump(), "loss_curve": curve}  # fmt: skip
    if ema is not None:
        train_state["ema"] = ema.state_dict()
    if distiller is not None:
        train_state["distiller"] = distiller.state_dict()
    eval_model = ema.module if ema is not None else model
    save_checkpoint(path, model_config=model.model_config, state_dict=eval_model.state_dict(), epoch=epoch,
                    train_state=train_state)  # fmt: skip


def _place(model: nn.Module, distiller: nn.Module | None, ctx: DistContext | None) -> torch.device | None:
    """Move model and distiller (its teacher too) to this rank's device; returns where the model was.

    Only data-parallel runs on GPUs move anything: a single process trains where the model is.
    """
    if ctx is None or ctx.device.type == "cpu":
        return None
    origin = next(model.parameters()).device
    model.to(ctx.device)
    if distiller is not None:
        distiller.to(ctx.device)
        for teacher in getattr(distiller, "teacher", []):  # kept out of the distiller's modules on purpose
            teacher.to(ctx.device)
    return origin


def _batchnorm(model: nn.Module, cfg: TrainConfig, ctx: DistContext | None):  # noqa: ANN202
    """SyncBatchNorm for the run when ``cfg.sync_bn`` asks for it (see there), else nothing."""
    if ctx is None or ctx.world_size == 1:
        return nullcontext()
    sync = cfg.sync_bn if cfg.sync_bn is not None else ctx.device.type == "cuda"
    if sync and ctx.device.type != "cuda":
        raise ConfigError(f"sync_bn: torch.nn.SyncBatchNorm needs CUDA tensors (torch {torch.__version__} "
                          f"refuses CPU ones) but this run uses {ctx.backend} on the CPU; leave sync_bn unset or "
                          "false")  # fmt: skip
    return distributed.sync_batchnorm(model) if sync else nullcontext()


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
