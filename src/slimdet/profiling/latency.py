"""Timing and memory measurement: thread control, interleaved latency runs, forward-pass peak memory."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LatencyStat:
    """Wall-clock latency of one runtime at one batch size, over ``runs`` warmed repetitions."""

    runtime: str  # "torch-eager" or "onnxruntime-cpu"
    batch_size: int
    median_s: float
    p90_s: float
    min_s: float
    runs: int

    @property
    def median_per_image_s(self) -> float:
        return self.median_s / self.batch_size


@contextmanager
def torch_threads(threads: int) -> Iterator[int]:
    """Run the body with ``torch.set_num_threads(threads)`` and restore the previous count after."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    warmup: int,
    runs: int,
    on_step: Callable[[], None] | None = None,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Time each callable ``runs`` times in rounds (each once per round) after ``warmup`` untimed calls each.

    Interleaving makes slow drifts of the machine (frequency, other load) hit every contender alike.
    Each round runs the callables in a fresh random order (``seed``): in a fixed order, the one timed
    right after a large model pays for the caches that model evicted (yolo-s: two identical int8 files
    timed 1.99x and 2.06x over FP32, the first right after FP32; 2.00x and 2.00x shuffled).
    Returns the per-call wall-clock seconds (time.perf_counter) for each name.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    rng = np.random.default_rng(seed)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for i in rng.permutation(len(names)):
            name, fn = names[i], fns[names[i]]
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            if on_step is not None:
                on_step()
    return times


def summarize(runtime: str, batch_size: int, times_s: Sequence[float]) -> LatencyStat:
    return LatencyStat(
        runtime=runtime,
        batch_size=batch_size,
        median_s=float(statistics.median(times_s)),
        p90_s=percentile(times_s, 90),
        min_s=float(min(times_s)),
        runs=len(times_s),
    )


@contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence the profiler backend's C++ log lines (its start/stop notices and a GPU probe that
    fails on CPU-only machines), which bypass Python's sys.stderr, for the body only."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_forward_alloc_bytes(model: nn.Module, example: Tensor) -> int:
    """Peak bytes held by PyTorch's CPU allocator during one ``model(example)`` call.

    Counts only allocations made during the call (activations, temporaries, outputs), read from
    the allocation events of torch.profiler(profile_memory=True); weights and anything allocated
    before the call are excluded, and so is memory that libraries take outside PyTorch's allocator
    (oneDNN scratch pads, Python objects). Measures one warm call: the model is run once first.
    """
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        model(example)  # warm: lazy initialisation and weight reorders are not activations
        with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(example)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        if str(e.device_type()).endswith("CPU"):  # DeviceType.CPU
            live += e.nbytes()
            peak = max(peak, live)
    return int(peak)
