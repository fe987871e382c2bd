"""Data-parallel training on several processes: torch.distributed, started by torchrun.

torchrun (``torch.distributed.run``) starts one process per device and tells each its place in
the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``).
:func:`process_group` joins the group from there (gloo on CPU; nccl with one GPU per process
when CUDA is available) and :func:`launch` is ``slimdet ... --nproc N``: the same command
re-run under torchrun, on this machine. On several machines, run torchrun on each::

    torchrun --nnodes 2 --node_rank 0 --master_addr 10.0.0.1 --master_port 29500 \\
        --nproc_per_node 4 -m slimdet train --model yolo-s --data digits-det --batch-size 64 --out runs/ddp

(``--node_rank 1`` on the second machine; the dataset must be readable at the same path on
every machine, and only global rank 0 writes ``--out``). ``slimdet.train.train`` turns
data-parallel by itself inside such a group: the batch size stays the global batch and the
run sees the same batches as a single process would.

Helpers here work outside a group too (one process is rank 0 of a world of 1), so callers need
no branches.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from slimdet.errors import ConfigError

T = TypeVar("T")

#: the variables torchrun sets in every process it starts
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the initialized process group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device  # where this process computes: cuda:LOCAL_RANK with nccl, else the CPU

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one process that writes files and shows progress."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True in a process that torchrun started (its environment names rank and world size)."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def current() -> DistContext | None:
    """The context of the initialized process group, None when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    backend = str(dist.get_backend())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)


@contextmanager
def process_group(*, backend: str | None = None) -> Iterator[DistContext | None]:
    """Join the process group torchrun set up for the body; yields None outside torchrun.

    The group is initialized from torchrun's environment unless one already is (then it is
    used as is and left alone); one initialized here is destroyed on exit. ``backend``: nccl
    when every process of this machine can have a GPU of its own (cuda:LOCAL_RANK), else gloo
    (on the CPU): all ranks must agree, so a machine with fewer GPUs than processes uses none.
    """
    if current() is not None or not launched_by_torchrun():
        yield current()
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend is None:
        local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
        backend = "nccl" if torch.cuda.is_available() and local_procs <= torch.cuda.device_count() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)  # object collectives and DDP use the current device
    dist.init_process_group(backend=backend)
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def is_main() -> bool:
    """True on global rank 0 and outside a process group."""
    ctx = current()
    return ctx is None or ctx.is_main


def rank() -> int:
    """Global rank; 0 outside a process group."""
    ctx = current()
    return 0 if ctx is None else ctx.rank


def world_size() -> int:
    """Number of processes in the group; 1 outside a process group."""
    ctx = current()
    return 1 if ctx is None else ctx.world_size


def barrier() -> None:
    """Wait until every rank gets here (no-op outside a process group)."""
    ctx = current()
    if ctx is not None:
        dist.barrier(device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    ctx = current()
    if ctx is None or ctx.world_size == 1:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def run_on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 only; every rank returns its result, or raises its exception.

    For work that must happen once (reading a checkpoint that may exist on rank 0's machine
    only, scoring gathered predictions): the other ranks would otherwise wait forever at their
    next collective when rank 0 fails.
    """
    ctx = current()
    if ctx is None or ctx.world_size == 1:
        return fn()
    payload: list[Any] = [None]
    error: BaseException | None = None
    if ctx.is_main:
        try:
            payload = [(True, fn())]
        except Exception as exc:
            error = exc
            payload = [(False, exc)]
    dist.broadcast_object_list(payload, src=0)
    ok, value = payload[0]
    if error is not None:
        raise error  # rank 0 keeps its own traceback
    if not ok:
        raise value
    return value


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over the ranks (the keys must be the same everywhere)."""
    ctx = current()
    if ctx is None or ctx.world_size == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / ctx.world_size).tolist(), strict=True))


_sync_normalizers = False


@contextmanager
def synced_loss_normalizers() -> Iterator[None]:
    """For the body, :func:`loss_normalizer` sums a loss's batch normalizer over the ranks.

    ``slimdet.train.train`` holds this around its training steps, where every rank computes the loss of
    its share of the same global batch in step. Anywhere else (evaluation, calibration losses in pruning
    and quantization, metainit) a collective inside the loss could wait forever for ranks that never call it,
    so the default is off.
    """
    global _sync_normalizers
    before, _sync_normalizers = _sync_normalizers, current() is not None and current().world_size > 1  # type: ignore[union-attr]
    try:
        yield
    finally:
        _sync_normalizers = before


def loss_normalizer(total: torch.Tensor, *, floor: float = 0.0) -> torch.Tensor:
    """The divisor of a loss summed over a batch: ``max(total, floor)``, ``total`` being e.g. the sum of the
    assigned target scores.

    Under :func:`synced_loss_normalizers` it is the global batch's total (summed over the ranks, then
    ``floor``) divided by the number of ranks: DistributedDataParallel averages the ranks' gradients, so each
    rank dividing its partial sum by that gives exactly the gradient of one process dividing the whole
    batch's sum by the whole batch's total. A per-rank divisor would weight a rank with few targets up.
    """
    total = total.detach()
    if not _sync_normalizers:
        return total.clamp(min=floor)
    summed = total.clone()
    dist.all_reduce(summed)
    return summed.clamp(min=floor) / dist.get_world_size()


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Overwrite every buffer of ``module`` (batch-norm statistics, EMA counters) with rank ``src``'s.

    Parameters are left alone: under DistributedDataParallel they are equal on every rank by
    construction, and a difference there is a bug to see, not to hide.
    """
    ctx = current()
    if ctx is None or ctx.world_size == 1:
        return
    for buffer in module.buffers():
        if buffer.device == ctx.device:
            dist.broadcast(buffer.data, src=src)
        else:  # e.g. AveragedModel's step counter stays on the CPU, and nccl sends CUDA tensors only
            on_device = buffer.data.to(ctx.device)
            dist.broadcast(on_device, src=src)
            buffer.data.copy_(on_device)


def wrap_ddp(module: nn.Module, ctx: DistContext) -> nn.Module:
    """``module`` in DistributedDataParallel: its gradients are averaged over the ranks in backward.

    Construction copies rank 0's parameters and buffers to every rank; at every forward the
    buffers are copied again from rank 0 (``broadcast_buffers``), so batch-norm running
    statistics follow rank 0's shard of each batch.
    """
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


@contextmanager
def sync_batchnorm(model: nn.Module) -> Iterator[nn.Module]:
    """BatchNorm layers of ``model`` swapped for SyncBatchNorm for the body, the originals put back after.

    SyncBatchNorm computes the statistics of the global batch (all ranks' images), so a
    data-parallel step normalizes as one process with the whole batch would. In torch 2.14.1 it
    refuses CPU tensors ("SyncBatchNorm expected input tensor to be on GPU"): it serves nccl
    runs only; on gloo every rank normalizes with the statistics of its own share of the batch.
    The swap shares the parameters and buffers (the optimizer keeps working); the originals
    get the final state back, so the model leaves as plain BatchNorm (ONNX export, pruning).
    """
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
                swapped.append((parent, name, child))
    try:
        yield model
    finally:
        for parent, name, child in swapped:
            sync = getattr(parent, name)
            child.load_state_dict(sync.state_dict())
            child.train(sync.training)
            setattr(parent, name, child)


def torchrun_command(args: Sequence[str], *, nproc: int, module: str | None = "slimdet") -> list[str]:
    """The torchrun command line that runs ``python -m module *args`` in ``nproc`` processes on this machine.

    With ``module=None``, ``args[0]`` is a script to run instead.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    target = ["-m", module] if module is not None else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            *target, *args]  # fmt: skip


def launch(args: Sequence[str], *, nproc: int, module: str | None = "slimdet") -> int:
    """Run ``python -m module *args`` under torchrun with ``nproc`` processes; returns torchrun's exit code.

    torchrun starts, watches and stops the processes (when one fails it stops the others);
    their output goes to this process's stdout and stderr.
    """
    if launched_by_torchrun():
        raise ConfigError("--nproc: this process already runs under torchrun; leave --nproc out of the "
                          "command torchrun starts")  # fmt: skip
    return subprocess.run(torchrun_command(args, nproc=nproc, module=module), check=False).returncode
