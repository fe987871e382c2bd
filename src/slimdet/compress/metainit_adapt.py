"""Using a meta-learned initialization: load it into a model for any classes, fine-tune on a new task.

``init_from`` copies every tensor of a ``slimdet metainit`` checkpoint into a model of the same
architecture. The classifier rows are the exception: meta-training relabels every task's classes in
a random order, so each row learnt "whichever class this task puts here" and no row belongs to a
class; every class row of the new model starts as the mean of the meta rows. ``adapt`` fine-tunes a
model on one task and records its validation mAP@.5 along the way (the curve that shows how fast a
start point adapts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from slimdet.data import collate
from slimdet.errors import CheckpointError, ConfigError
from slimdet.evaluate import evaluate
from slimdet.io import load_checkpoint
from slimdet.models.base import Detector
from slimdet.train import gradient_step

__all__ = ["InitFromResult", "adapt", "classifier_layers", "init_from", "steps_to_reach", "train_step"]


@dataclass(frozen=True)
class InitFromResult:
    """What ``init_from`` did: tensors copied as they are, and classifier layers set to the mean row."""

    checkpoint: str
    kind: str  # "reptile" or "union": how the checkpoint was trained
    ways: int  # classifier rows in the checkpoint
    num_classes: int  # classifier rows in the model
    copied: int
    mean_rows: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def classifier_layers(model: nn.Module) -> list[str]:
    """The model's class-logit convs (``heads.{i}.cls_pred`` of the YOLO family)."""
    layers = [n for n in getattr(model, "output_layers", list)() if n.rsplit(".", 1)[-1] == "cls_pred"]
    if not layers:
        name = getattr(model, "model_config", {}).get("name", type(model).__name__)
        raise ConfigError(
            f"model {name!r}: no classifier layer named '*.cls_pred' among its output layers; meta-learned "
            "initialization supports the native YOLO family (yolo-test, yolo-n, yolo-s)"
        )
    return layers


def init_from(model: Detector, checkpoint: str | Path) -> InitFromResult:
    """Load a metainit checkpoint into ``model`` (same architecture, any number of classes), in place.

    Raises:
        CheckpointError: the file is not a metainit checkpoint, or was made for another architecture
            (model name, input size, or any other setting than the number of classes).
    """
    path = Path(checkpoint)
    payload = load_checkpoint(path)
    record = payload.get("metainit")
    if not isinstance(record, dict):
        raise CheckpointError(
            f"{path}: not a metainit checkpoint (no 'metainit' record); make one with 'slimdet metainit'"
        )
    theirs = {k: v for k, v in payload["model"].items() if k != "num_classes"}
    mine = {k: v for k, v in model.model_config.items() if k != "num_classes"}
    diffs = [f"{k}: {theirs.get(k, '<absent>')!r} in the checkpoint, {mine.get(k, '<absent>')!r} in the model"
             for k in sorted(set(theirs) | set(mine)) if theirs.get(k) != mine.get(k)]  # fmt: skip
    if diffs:
        raise CheckpointError(f"{path}: metainit checkpoint made for another architecture: {'; '.join(diffs)}")
    rows = {f"{layer}.{p}" for layer in classifier_layers(model) for p in ("weight", "bias")}
    source = payload["state_dict"]
    new: dict[str, torch.Tensor] = {}
    for name, own in model.state_dict().items():
        if name not in source:
            raise CheckpointError(f"{path}: checkpoint has no tensor {name!r} of model {mine.get('name')!r}")
        src = source[name]
        if name in rows and src.shape[1:] == own.shape[1:]:
            new[name] = src.mean(0, keepdim=True).expand_as(own).clone()
        elif src.shape == own.shape:
            new[name] = src
        else:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(src.shape)} in the checkpoint, "
                                  f"{tuple(own.shape)} in the model")  # fmt: skip
    model.load_state_dict(new)
    layers = tuple(sorted(n.rsplit(".", 1)[0] for n in rows if n.endswith(".weight")))
    return InitFromResult(checkpoint=str(path), kind=str(record.get("kind", "?")),
                          ways=int(payload["model"]["num_classes"]), num_classes=model.num_classes,
                          copied=len(new) - len(rows), mean_rows=layers)  # fmt: skip


def train_step(model: Detector, optimizer: torch.optim.Optimizer, batch: Sequence[Any], grad_clip: float) -> float:
    """One gradient step on ``(images, targets)``; returns the loss."""
    images, targets = batch
    loss, _ = model.compute_loss(images, targets)
    gradient_step(loss, optimizer, list(model.parameters()), grad_clip)
    return float(loss.item())


def adapt(
    model: Detector,
    task: Any,
    *,
    steps: int,
    eval_every: int,
    lr: float,
    batch_size: int,
    eval_ds: Any,
    seed: int = 0,
    beta1: float = 0.9,
    grad_clip: float = 10.0,
    progress: bool = False,
) -> list[tuple[int, float]]:
    """Fine-tune ``model`` in place on ``task`` (a dataset) with Adam; returns ``(step, mAP@.5)`` on
    ``eval_ds`` at step 0, every ``eval_every`` steps and after the last step.

    Batches are drawn from a stream of seeded permutations of ``task``, so every start point sees
    the same images in the same order for the same ``seed``.
    """
    if steps < 0 or eval_every < 1 or batch_size < 1:
        raise ConfigError(f"adapt: expected steps >= 0, eval_every >= 1, batch_size >= 1; got {steps}, "
                          f"{eval_every}, {batch_size}")  # fmt: skip
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(beta1, 0.999))
    curve = [(0, evaluate(model, eval_ds, progress=False).map50)]
    order: list[int] = []
    model.train()
    bar = tqdm(total=steps, desc="adapt", unit="step", disable=not progress, leave=False)
    for step in range(1, steps + 1):
        while len(order) < batch_size:
            order += rng.permutation(len(task)).tolist()
        chosen, order = order[:batch_size], order[batch_size:]
        loss = train_step(model, optimizer, collate([task[j] for j in chosen]), grad_clip)
        bar.update(1)
        if step % eval_every == 0 or step == steps:
            curve.append((step, evaluate(model, eval_ds, progress=False).map50))
            bar.set_postfix(loss=f"{loss:.3f}", map50=f"{curve[-1][1]:.3f}")
    bar.close()
    return curve


def steps_to_reach(curve: Sequence[tuple[int, float]], threshold: float) -> int | None:
    """The first evaluated step whose mAP@.5 is >= ``threshold``; None when the curve never gets there."""
    return next((step for step, value in curve if value >= threshold), None)
