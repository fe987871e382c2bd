"""Independent search trials, run in this process or as Ray tasks: ``TrialRunner(...).run(fn, trials)``.

A sensitivity scan or a codesign search is a list of trials that share big read-only inputs (the
model, calibration batches) and do not talk to each other. ``TrialRunner`` runs ``fn(shared, trial)``
for each of them, either one after another here (``backend="local"``) or as Ray tasks
(``backend="ray"``: a local Ray instance by default, an existing cluster with ``address``), and
returns the results in the order of the trials whatever order they finish in. ``shared`` goes into
Ray's object store once, and each Ray worker unpickles it once, not once per trial.

Every trial runs with a fixed torch thread count (1 by default) and, when a seed is given, from the
same torch RNG state, in both backends: oneDNN kernels may sum in another order with another thread
count, so this is what makes a Ray run give bit-identical results to the in-process one.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from slimdet.errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")

INSTALL_HINT = "pip install 'slimdet[distributed]'"


class Backend(StrEnum):
    LOCAL = "local"  # one trial after another in this process
    RAY = "ray"  # Ray tasks, one CPU (x threads) each


@dataclass(frozen=True)
class TrialRunner:
    """Where the trials of a search run.

    Attributes:
        backend: "local" (this process) or "ray".
        address: an existing Ray cluster (what ``ray start --head`` prints, ``auto``, or ``ray://host:port``);
            None starts a local Ray instance for the run (unless this process already joined one).
        num_cpus: CPUs of a local Ray instance; the cores this process may use when None.
        threads: torch threads inside each trial (a Ray task reserves as many CPUs); None leaves this
            process's count (local backend only; Ray then uses 1).
    """

    backend: Backend = Backend.LOCAL
    address: str | None = None
    num_cpus: int | None = None
    threads: int | None = 1

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "backend", Backend(self.backend))
        except ValueError:
            known = [b.value for b in Backend]
            raise ConfigError(f"trial backend must be one of {known}, got {self.backend!r}") from None
        if self.address is not None and self.backend != Backend.RAY:
            raise ConfigError(f"a Ray address ({self.address!r}) needs backend='ray', got {self.backend.value!r}")
        for name in ("num_cpus", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"TrialRunner.{name} must be >= 1, got {value}")

    @classmethod
    def from_flags(cls, *, ray: bool, address: str | None, threads: int | None = 1) -> TrialRunner:
        """The runner of the CLI's ``--ray [--ray-address ADDR]`` (an address implies ``--ray``)."""
        use_ray = ray or address is not None
        return cls(Backend.RAY if use_ray else Backend.LOCAL, address=address, threads=threads)

    def session(self) -> AbstractContextManager[Any]:
        """Keeps one Ray connection (and a local instance) over several ``run`` calls; nothing locally."""
        return ray_session(self.address, self.num_cpus) if self.backend == Backend.RAY else nullcontext()

    def run(
        self,
        fn: Callable[[Any, T], R],
        trials: Sequence[T],
        *,
        shared: Any = None,
        seed: int | None = None,
        on_result: Callable[[T, R], None] | None = None,
        progress: bool = True,
        desc: str = "trials",
    ) -> list[R]:
        """``[fn(shared, trial) for trial in trials]``, run by the backend.

        Args:
            fn: a module-level function (Ray sends it to the workers by reference).
            trials: small picklable descriptions of the trials.
            shared: read-only inputs of every trial; with Ray, stored once in the object store.
            seed: each trial starts from ``torch.manual_seed(seed)`` (the caller's RNG state is kept).
            on_result: called here with ``(trial, result)`` as each trial finishes, so that a caller can
                save it at once (an interrupted search then loses only the trials still running).
            progress: a progress bar over the trials.
        """
        trials = list(trials)
        if not trials:
            return []
        bar = tqdm(total=len(trials), desc=desc, unit="trial", disable=not progress)
        try:
            if self.backend == Backend.LOCAL:
                return self._run_local(fn, trials, shared, seed, on_result, bar)
            return self._run_ray(fn, trials, shared, seed, on_result, bar)
        finally:
            bar.close()

    def _run_local(self, fn: Callable, trials: list, shared: Any, seed: int | None, on_result: Callable | None,
                   bar: Any) -> list:  # fmt: skip
        results = []
        for trial in trials:
            results.append(run_trial(fn, shared, trial, self.threads, seed))
            if on_result is not None:
                on_result(trial, results[-1])
            bar.update(1)
        return results

    def _run_ray(self, fn: Callable, trials: list, shared: Any, seed: int | None, on_result: Callable | None,
                 bar: Any) -> list:  # fmt: skip
        threads = self.threads or 1
        with ray_session(self.address, self.num_cpus) as ray:
            # in a list, so that Ray hands the reference over instead of a fresh copy per task
            shared_ref = [ray.put(shared)]
            task = ray.remote(num_cpus=threads, max_retries=0)(_ray_trial)
            refs = [task.remote(fn, shared_ref, trial, threads, seed) for trial in trials]
            index = {ref: i for i, ref in enumerate(refs)}
            results: list[Any] = [None] * len(trials)
            pending = list(refs)
            try:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    for ref in done:
                        i = index[ref]
                        results[i] = _get(ray, ref)
                        if on_result is not None:
                            on_result(trials[i], results[i])
                        bar.update(1)
            finally:
                for ref in pending:  # an error or an interrupt: the other trials are not wanted any more
                    ray.cancel(ref)
        return results


def run_trial(fn: Callable[[Any, T], R], shared: Any, trial: T, threads: int | None, seed: int | None) -> R:
    """One trial under the thread count and RNG state that make its result independent of where it runs."""
    from slimdet.profiling.latency import torch_threads

    with torch_threads(threads) if threads else nullcontext(), torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return fn(shared, trial)


_WORKER_SHARED: dict[str, Any] = {}  # in a Ray worker: the shared inputs of the latest search, by object id


def _ray_trial(fn: Callable[[Any, T], R], shared_ref: list[Any], trial: T, threads: int, seed: int | None) -> R:
    """``run_trial`` in a Ray worker, which deserializes the shared inputs once for all its trials (a
    detector takes longer to unpickle than a sensitivity trial takes to run)."""
    import ray

    key = shared_ref[0].hex()
    if key not in _WORKER_SHARED:
        _WORKER_SHARED.clear()
        _WORKER_SHARED[key] = ray.get(shared_ref[0])
    return run_trial(fn, _WORKER_SHARED[key], trial, threads, seed)


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """The ``ray`` module, connected: to ``address``, to the Ray instance this process already joined, or
    to a new local instance (``num_cpus`` CPUs, no dashboard, quiet logs) that is shut down at the end.
    Only an instance started here is shut down."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"running trials on Ray needs the ray package: {INSTALL_HINT}") from None
    if address is not None:
        _check_reachable(address)
    if ray.is_initialized():
        yield ray
        return
    # a local instance started for one search is no cluster to report on (Ray's usage stats are opt-out)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    try:
        if address is None:
            ray.init(num_cpus=num_cpus or _cores(), include_dashboard=False, **quiet)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
        raise ConfigError(f"cannot connect to {where}: {exc}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_reachable(address: str) -> None:
    """Fail fast on a ``host:port`` nobody listens on (Ray itself retries for minutes)."""
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise ConfigError(f"Ray address {address!r}: no Ray cluster answers there ({exc.strerror or exc}); "
                          "start one with 'ray start --head' or leave --ray-address out for a local "
                          "instance") from None  # fmt: skip


def _get(ray: Any, ref: Any) -> Any:
    """The result of a task; a failed trial raises its own exception (a ConfigError stays one)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception):
            raise cause from exc
        raise


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
