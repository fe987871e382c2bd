"""Meta-learned initialization for compact detectors: Reptile over a family of detection tasks.

Reptile (Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", 2018, algorithm 2)
learns a start point phi from which a few gradient steps fit a new task. Every outer iteration
samples ``meta_batch`` tasks (``slimdet.compress.metainit_tasks``: a few classes at one scale and
colour mode, labels in a random order, held-out objects painted over), runs ``inner_steps`` Adam
steps on each from phi with a fresh optimizer, and moves phi towards the mean of the adapted weights,
``phi <- phi + eps * (mean W - phi)``, with the outer step size eps annealed linearly from
``meta_lr`` to 0 as in the paper. BatchNorm running statistics are interpolated like the weights;
integer buffers are copied from the last adapted model.

``pretrain_union`` is the baseline it is measured against: the same tasks, images and number of
gradient steps, one Adam optimizer that is never reset, and no meta-update.

Both write ``out_dir/last.pt`` every ``checkpoint_every`` outer iterations (resume gives the same
final weights as an uninterrupted run: the tasks and images of iteration i come from a generator
seeded with ``(seed, i)``) and finish with ``out_dir/metainit.pt``: an ordinary slimdet checkpoint
of the model built for ``ways`` classes plus a ``metainit`` record. ``init_from`` loads it into a
model for any number of classes; ``adapt`` fine-tunes on a new task.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from slimdet.compress.metainit_adapt import (
    InitFromResult,
    adapt,
    classifier_layers,
    init_from,
    steps_to_reach,
    train_step,
)
from slimdet.compress.metainit_tasks import Background, Task, TaskDataset, TaskFamily, TaskPool
from slimdet.data import collate
from slimdet.errors import CheckpointError
from slimdet.io import load_checkpoint, save_checkpoint
from slimdet.models import create_model
from slimdet.models.base import Detector
from slimdet.profiling.latency import torch_threads

__all__ = ["Background", "InitFromResult", "MetaInitConfig", "MetaInitResult", "Task", "TaskDataset", "TaskFamily",
           "TaskPool", "adapt", "init_from", "pretrain_union", "run_metainit", "steps_to_reach"]  # fmt: skip

Kind = Literal["reptile", "union"]
#: fields that do not change the weights, so a run may resume with other values
_RUN_ONLY = ("threads", "checkpoint_every")
UNION_BETAS = (0.9, 0.999)  # ordinary Adam for the union baseline


class MetaInitConfig(BaseModel):
    """Options of one meta-training (or union pretraining) run."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: str = "yolo-n"
    input_size: int = Field(160, ge=32)
    family: TaskFamily = TaskFamily()
    #: outer iterations
    meta_iters: int = Field(400, ge=1)
    #: Adam steps per task, one batch each
    inner_steps: int = Field(4, ge=1)
    inner_lr: float = Field(1e-3, gt=0)
    #: Nichol et al. run the inner Adam with beta1 = 0 (their code's default optimizer)
    inner_beta1: float = Field(0.0, ge=0, lt=1)
    batch_size: int = Field(16, ge=1)
    #: outer step size eps at the first iteration, annealed linearly to 0 (Nichol et al. 2018)
    meta_lr: float = Field(1.0, gt=0, le=1)
    #: tasks whose adapted weights are averaged per outer step
    meta_batch: int = Field(1, ge=1)
    grad_clip: float = Field(10.0, gt=0)
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    checkpoint_every: int = Field(50, ge=1)

    def epsilon(self, iteration: int) -> float:
        """Outer step size of outer iteration ``iteration`` (0-based)."""
        return self.meta_lr * (1.0 - iteration / self.meta_iters)

    @property
    def gradient_steps(self) -> int:
        return self.meta_iters * self.meta_batch * self.inner_steps


@dataclass
class MetaInitResult:
    """A finished run: its checkpoint, the number of gradient steps and the per-iteration history."""

    kind: str
    out_dir: Path
    checkpoint: Path
    iterations: int
    gradient_steps: int
    time_s: float
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "out_dir": str(self.out_dir), "checkpoint": str(self.checkpoint),
                "iterations": self.iterations, "gradient_steps": self.gradient_steps, "time_s": self.time_s,
                "history": self.history}  # fmt: skip


def run_metainit(
    cfg: MetaInitConfig, *, out_dir: str | Path, resume: bool = False, progress: bool = True
) -> MetaInitResult:
    """Reptile meta-training; the initialization goes to ``out_dir/metainit.pt``.

    Args:
        cfg: model, task family and Reptile settings.
        out_dir: where ``last.pt`` (resumable state) and ``metainit.pt`` are written.
        resume: continue from ``out_dir/last.pt`` when present (same config, apart from threads and
            checkpoint_every); the final weights equal those of an uninterrupted run.
        progress: show a progress bar.

    Raises:
        ConfigError: an unknown model, a model without a ``cls_pred`` classifier, bad class ids.
        CheckpointError: ``last.pt`` belongs to another config or kind of run.
    """
    return _meta_train(cfg, Path(out_dir), "reptile", resume=resume, progress=progress)


def pretrain_union(
    cfg: MetaInitConfig, *, out_dir: str | Path, resume: bool = False, progress: bool = True
) -> MetaInitResult:
    """The baseline: ordinary pretraining on the union of the training tasks.

    The same task sampler, images and number of gradient steps as :func:`run_metainit` with
    ``cfg`` (``meta_iters * meta_batch * inner_steps``), one Adam optimizer (betas 0.9, 0.999,
    lr ``inner_lr``) that is never reset, no meta-update. Each batch keeps its task's own random
    label order, so this is the joint training that Nichol et al. 2018 compare Reptile with (using
    only the first inner gradient, g1, "corresponds to pre-training on the expected loss"). Same
    checkpoint format and resume behaviour as :func:`run_metainit`.
    """
    return _meta_train(cfg, Path(out_dir), "union", resume=resume, progress=progress)


def _meta_train(cfg: MetaInitConfig, out_dir: Path, kind: Kind, *, resume: bool, progress: bool) -> MetaInitResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    last_path, final_path = out_dir / "last.pt", out_dir / "metainit.pt"
    with torch_threads(cfg.threads or torch.get_num_threads()), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model, num_classes=cfg.family.ways, input_size=cfg.input_size)
        classifier_layers(model)  # refuse models without exchangeable class rows before loading data
        pool = cfg.family.load("train", input_size=cfg.input_size)
        phi = _clone(model.state_dict())
        optimizer = None if kind == "reptile" else torch.optim.Adam(model.parameters(), cfg.inner_lr, UNION_BETAS)
        start, history, time_s = 0, [], 0.0
        if resume and last_path.is_file():
            state = load_checkpoint(last_path)
            _check_resume(state, cfg, kind, last_path)
            phi, run = _clone(state["state_dict"]), state["metainit_state"]
            start, history, time_s = int(run["iteration"]), list(run["history"]), float(run["time_s"])
            model.load_state_dict(phi)
            if optimizer is not None:
                optimizer.load_state_dict(run["optimizer"])
        model.train()
        bar = tqdm(total=cfg.meta_iters, initial=start, desc=kind, unit="iter", disable=not progress)
        for it in range(start, cfg.meta_iters):
            t0 = time.perf_counter()
            rng = np.random.default_rng([cfg.seed, it])  # tasks and images of this iteration, resumable
            tasks = [pool.sample(rng) for _ in range(cfg.meta_batch)]
            batches = [_task_batches(pool.dataset(t, erase=cfg.family.erased_classes), cfg, rng) for t in tasks]
            if optimizer is None:
                eps = cfg.epsilon(it)
                loss = _reptile_step(model, phi, batches, cfg, eps)
            else:
                eps = None
                losses = [train_step(model, optimizer, collate(b), cfg.grad_clip) for bs in batches for b in bs]
                loss = float(np.mean(losses))
            time_s += time.perf_counter() - t0
            history.append({"iteration": it, "eps": eps, "loss": loss, "tasks": [t.describe() for t in tasks]})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", **({"eps": f"{eps:.3f}"} if eps is not None else {}))
            if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.meta_iters:
                weights = phi if optimizer is None else model.state_dict()
                run_state = {"kind": kind, "iteration": it + 1, "history": history, "time_s": time_s,
                             "config": _comparable(cfg)}  # fmt: skip
                if optimizer is not None:
                    run_state["optimizer"] = optimizer.state_dict()
                save_checkpoint(last_path, model_config=model.model_config, state_dict=weights,
                                metainit_state=run_state)  # fmt: skip
        bar.close()
        weights = phi if optimizer is None else model.state_dict()
        record = {"kind": kind, "config": cfg.model_dump(mode="json"), "meta_classes": list(pool.meta_classes),
                  "gradient_steps": cfg.gradient_steps, "time_s": time_s, "history": history}  # fmt: skip
        save_checkpoint(final_path, model_config=model.model_config, state_dict=weights, metainit=record)
    return MetaInitResult(kind=kind, out_dir=out_dir, checkpoint=final_path, iterations=cfg.meta_iters,
                          gradient_steps=cfg.gradient_steps, time_s=time_s, history=history)  # fmt: skip


def _task_batches(ds: TaskDataset, cfg: MetaInitConfig, rng: np.random.Generator) -> list[list[Any]]:
    """``inner_steps`` batches of distinct images of the task (repeats only when it has too few)."""
    n = cfg.inner_steps * cfg.batch_size
    picks = rng.choice(len(ds), size=n, replace=len(ds) < n).tolist()
    return [[ds[j] for j in picks[s : s + cfg.batch_size]] for s in range(0, n, cfg.batch_size)]


def _reptile_step(
    model: Detector, phi: dict[str, torch.Tensor], batches: list[list[list[Any]]], cfg: MetaInitConfig, eps: float
) -> float:
    """Adapt a copy of phi to each task, then move phi (in place) towards the mean adapted weights."""
    mean: dict[str, torch.Tensor] = {}
    losses = []
    for task_batches in batches:
        model.load_state_dict(phi)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.inner_lr, betas=(cfg.inner_beta1, 0.999))
        losses += [train_step(model, optimizer, collate(b), cfg.grad_clip) for b in task_batches]
        for name, w in model.state_dict().items():
            if not w.is_floating_point():
                mean[name] = w.clone()  # counters (BatchNorm's num_batches_tracked): the last one
            elif name in mean:
                mean[name] += w
            else:
                mean[name] = w.detach().clone()
    n = len(batches)
    with torch.no_grad():
        for name, p in phi.items():
            if p.is_floating_point():
                p += eps * (mean[name] / n - p)
            else:
                p.copy_(mean[name])
    return float(np.mean(losses))


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def _comparable(cfg: MetaInitConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _RUN_ONLY}


def _check_resume(state: dict[str, Any], cfg: MetaInitConfig, kind: Kind, path: Path) -> None:
    run = state.get("metainit_state")
    if not isinstance(run, dict):
        raise CheckpointError(f"{path}: cannot resume: the checkpoint holds no meta-training state")
    if run.get("kind") != kind:
        raise CheckpointError(f"{path}: cannot resume a {kind} run from the state of a {run.get('kind')} run; "
                              "use another out folder")  # fmt: skip
    stored, now = run.get("config", {}), _comparable(cfg)
    diffs = [f"{k}: {stored.get(k)!r} -> {now.get(k)!r}" for k in now if stored.get(k) != now.get(k)]
    if diffs:
        raise CheckpointError(f"{path}: cannot resume: the run was started with other settings ({'; '.join(diffs)}); "
                              "use another out folder or drop resume")  # fmt: skip
