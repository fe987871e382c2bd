"""A real pipelined executor: the stages of a partitioned model as workers joined by bounded queues.

Each stage is a :class:`StageWorker` (a name and a picklable function of one item). ``Pipeline``
starts one worker per stage (a process by default, or a thread) and connects them by bounded FIFO
queues: frame ``i`` goes through stage 1, then stage 2, ..., while stage 1 already works on frame
``i + 1``. With one worker per stage and FIFO queues, frames cannot overtake each other; the
collector checks the index of every result anyway, so a lost or reordered frame is an error, not a
silent mix-up. Throughput is bounded by the slowest stage (plus the cost of moving data between
workers), latency by the sum of the stages.

Failure handling, so that a broken stage never hangs the caller:

* an exception in a stage's function travels down the pipeline as a message and is raised by the
  caller as :class:`PipelineError` naming the stage and the frame (with the remote traceback);
* a worker that dies without a word (killed, segfault, ``os._exit``) is noticed by a liveness check
  every ``poll_s`` and reported with its exit code and the frame it was working on;
* a stage that stops making progress for ``timeout_s`` is reported with the frame it is stuck on;
* every queue operation has a timeout, and shutting down escalates from a stop message to
  ``terminate`` and ``kill``.

Process workers are started with the ``spawn`` method (forking a process that already runs
PyTorch's or ONNX Runtime's thread pools can deadlock), so stage functions must be picklable: a
top-level function, or an object whose heavy state (a session, a model) is built in an optional
``setup()`` method that the worker calls once before the first frame. Items cross process
boundaries pickled with the standard pickler (NumPy arrays are cheapest; CPU tensors are sent as
arrays). The worker side (message protocol, stage loop, processes) is :mod:`slimdet.schedule.workers`;
cutting a detector into stages is :mod:`slimdet.schedule.split`.
"""

from __future__ import annotations

import queue
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from slimdet.errors import ConfigError, SlimdetError
from slimdet.schedule.workers import (
    ERROR,
    ITEM,
    LEFT,
    NO_FRAME,
    READY,
    SETUP,
    STOP,
    Runtime,
    WorkerKind,
    describe,
)

__all__ = ["Pipeline", "PipelineError", "StageStats", "StageWorker", "WorkerKind", "run_pipeline", "run_sequential"]


class PipelineError(SlimdetError):
    """A stage failed: raised by the caller's thread, after every worker was stopped.

    Attributes:
        stage: name of the stage that failed ("input" when iterating the frames raised).
        stage_index: its position (0-based; -1 for "input").
        frame: index of the frame it was working on, or None (during setup, or between frames).
        cause: ``"ExceptionType: message"`` of the original error, or what happened to the worker.
        remote_traceback: the formatted traceback from the worker, when there is one.
    """

    def __init__(self, stage: str, stage_index: int, frame: int | None, cause: str, remote_traceback: str = "") -> None:
        where = f" on frame {frame}" if frame is not None else ""
        super().__init__(f"pipeline stage {stage!r} (#{stage_index}) failed{where}: {cause}")
        self.stage, self.stage_index, self.frame = stage, stage_index, frame
        self.cause, self.remote_traceback = cause, remote_traceback

    def __reduce__(self):  # noqa: ANN204 - keep the fields when pickled
        return type(self), (self.stage, self.stage_index, self.frame, self.cause, self.remote_traceback)


@dataclass(frozen=True)
class StageWorker:
    """One stage of a pipeline.

    Attributes:
        name: shown in errors and statistics.
        fn: maps one item to the next stage's item; must be picklable for process workers. If it has a
            ``setup()`` method, the worker calls it once before the first frame (build sessions there).
        threads: PyTorch intra-op threads set in the worker process (process workers only: in a thread
            worker the setting would be global). ONNX Runtime sessions take their own thread count.
    """

    name: str
    fn: Callable[[Any], Any]
    threads: int = 1

    def __post_init__(self) -> None:
        if not self.name or self.threads < 1:
            raise ConfigError(f"StageWorker: need a name and threads >= 1, got {self.name!r}, {self.threads}")


@dataclass(frozen=True)
class StageStats:
    """Work done by one stage since the pipeline started."""

    name: str
    frames: int
    busy_s: float  # time spent inside the stage function

    @property
    def per_frame_s(self) -> float:
        return self.busy_s / self.frames if self.frames else 0.0


def run_pipeline(
    stages: Sequence[StageWorker],
    frames: Iterable[Any],
    *,
    queue_size: int = 4,
    workers: WorkerKind | str = WorkerKind.PROCESS,
    timeout_s: float = 60.0,
) -> Iterator[Any]:
    """Run ``frames`` through ``stages`` in a fresh :class:`Pipeline`; yields results in frame order.

    The workers are started on the first ``next()`` and stopped when the frames run out, when the
    caller stops iterating (closes the generator), or when a stage fails (:class:`PipelineError`).
    """
    with Pipeline(stages, queue_size=queue_size, workers=workers, timeout_s=timeout_s) as pipe:
        yield from pipe.run(frames)


def run_sequential(stages: Sequence[StageWorker], frames: Iterable[Any]) -> Iterator[Any]:
    """The same stage functions back to back in this thread: the reference a pipeline must equal.

    Thread counts are the caller's (``StageWorker.threads`` is not applied here). A failure raises
    :class:`PipelineError` like the pipeline does.
    """
    for k, stage in enumerate(stages):
        setup = getattr(stage.fn, "setup", None)
        if callable(setup):
            try:
                setup()
            except Exception as exc:  # noqa: BLE001 - reported with the stage's name
                raise PipelineError(stage.name, k, None, f"setup: {describe(exc)}", traceback.format_exc()) from exc
    i = NO_FRAME
    it = iter(frames)
    while True:
        try:
            i += 1
            item = next(it)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001
            raise PipelineError("input", -1, i, describe(exc), traceback.format_exc()) from exc
        for k, stage in enumerate(stages):
            try:
                item = stage.fn(item)
            except Exception as exc:  # noqa: BLE001
                raise PipelineError(stage.name, k, i, describe(exc), traceback.format_exc()) from exc
        yield item


class Pipeline:
    """Long-lived workers for ``stages``; :meth:`run` streams frames through them, as often as needed.

    Use as a context manager (``with Pipeline(stages) as pipe: for r in pipe.run(frames): ...``):
    starting workers (spawning processes, building sessions) costs seconds, so a benchmark or a
    server starts them once. After a :class:`PipelineError`, or when the caller stops iterating a
    run early, the pipeline is closed.

    Args:
        stages: the stages, in order.
        queue_size: capacity of each queue between two stages (and before the first, after the last).
        workers: "process" (default) or "thread".
        timeout_s: a stage that makes no progress for this long while it holds a frame is an error.
        start_timeout_s: limit for starting the workers and running every stage's ``setup()``.
        poll_s: how often blocked queue operations wake up to check the workers.
    """

    def __init__(
        self,
        stages: Sequence[StageWorker],
        *,
        queue_size: int = 4,
        workers: WorkerKind | str = WorkerKind.PROCESS,
        timeout_s: float = 60.0,
        start_timeout_s: float = 180.0,
        poll_s: float = 0.05,
    ) -> None:
        if not stages:
            raise ConfigError("Pipeline: need at least one stage")
        if queue_size < 1 or timeout_s <= 0 or start_timeout_s <= 0 or poll_s <= 0:
            raise ConfigError(f"Pipeline: need queue_size >= 1 and positive timeouts, got queue_size={queue_size}, "
                              f"timeout_s={timeout_s}, start_timeout_s={start_timeout_s}, poll_s={poll_s}")  # fmt: skip
        try:
            self.kind = WorkerKind(workers)
        except ValueError:
            raise ConfigError(f"Pipeline: workers must be one of {[k.value for k in WorkerKind]}, "
                              f"got {workers!r}") from None  # fmt: skip
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"Pipeline: stage names must be unique, got {names}")
        self.stages = tuple(stages)
        self.queue_size, self.poll_s = queue_size, poll_s
        self.timeout_s, self.start_timeout_s = timeout_s, start_timeout_s
        self._state = "new"  # new -> running -> closed
        self._busy = False  # a run is being iterated
        self._ready = False  # every worker has set up
        self._rt: Runtime | None = None
        self._counters: list[tuple[int, float]] = [(0, 0.0)] * len(self.stages)  # kept after close

    @property
    def workers(self) -> list[Any]:
        """The worker processes (or threads) while the pipeline runs."""
        return list(self._rt.workers) if self._rt is not None else []

    def __enter__(self) -> Pipeline:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the workers and wait until every stage has run its ``setup()``."""
        if self._state != "new":
            raise ConfigError(f"Pipeline.start: the pipeline is {self._state}")
        self._rt = rt = Runtime.create(self.kind, len(self.stages), self.queue_size)
        self._state = "running"
        try:
            # A stage's function is the first message on its queue, not a process argument: spawn writes
            # those to a pipe whose read end it holds until the write is done, so a child that died while
            # starting would block this process forever on a large function (a model, an ONNX graph).
            for k, stage in enumerate(self.stages):
                try:
                    rt.queues[k].put(rt.pack((SETUP, stage.fn)))
                except Exception as exc:  # noqa: BLE001 - typically a function that cannot be pickled
                    raise PipelineError(stage.name, k, None, f"setup: cannot send the stage function to its "
                                        f"worker: {describe(exc)}", traceback.format_exc()) from exc  # fmt: skip
            for k, stage in enumerate(self.stages):
                rt.start_worker(k, stage.name, stage.threads, self.poll_s)
            ready: set[int] = set()
            deadline = time.monotonic() + self.start_timeout_s
            while len(ready) < len(self.stages):
                msg = rt.get(self.poll_s)
                if msg is None:
                    self._check_workers()
                    if time.monotonic() > deadline:
                        k = max(set(range(len(self.stages))) - ready)  # the readies before it wait behind it
                        raise PipelineError(self.stages[k].name, k, None, f"setup: not ready after "
                                            f"{self.start_timeout_s:g} s (start_timeout_s)")  # fmt: skip
                elif msg[0] == READY:
                    ready.add(msg[1])
                elif msg[0] == ERROR:
                    raise self._error(msg)
            self._ready = True
        except BaseException:
            self._abort()
            raise

    def close(self) -> None:
        """Stop the workers: a stop message first (each worker passes it on and exits), then
        ``terminate``/``kill`` for any that has not exited within a few seconds."""
        rt = self._rt
        if self._state != "running" or rt is None:
            self._state = "closed"
            return
        try:
            deadline = time.monotonic() + min(self.timeout_s, 10.0)
            stop = rt.pack((STOP,))
            while time.monotonic() < deadline:
                try:
                    rt.queues[0].put(stop, timeout=self.poll_s)
                    break
                except queue.Full:
                    continue
            while time.monotonic() < deadline:  # drain the output until the stop comes out of the last stage
                msg = rt.get(self.poll_s)
                if (msg is not None and msg[0] == STOP) or not any(w.is_alive() for w in rt.workers):
                    break
        finally:
            self._abort()

    def run(self, frames: Iterable[Any]) -> Iterator[Any]:
        """Stream ``frames`` through the stages; yields one result per frame, in frame order.

        Frames are taken from ``frames`` lazily, at most about ``queue_size * (stages + 1)`` ahead of
        the results.

        Raises:
            PipelineError: a stage raised, died or hung (the pipeline is then closed), or iterating
                ``frames`` raised (stage "input").
        """
        if self._state != "running":
            how = " (start it, or use it as a context manager)" if self._state == "new" else ""
            raise ConfigError(f"Pipeline.run: the pipeline is {self._state}{how}")
        if self._busy:
            raise ConfigError("Pipeline.run: another run of this pipeline is still being iterated")
        self._busy = True
        try:
            yield from self._run(frames)
        except BaseException:  # an error, or the caller stopped early (GeneratorExit) with frames in flight
            self._abort()
            raise
        finally:
            self._busy = False

    def stats(self) -> list[StageStats]:
        """Frames done and time spent in each stage's function since the start."""
        rt = self._rt
        if rt is None:
            return [StageStats(s.name, *c) for s, c in zip(self.stages, self._counters, strict=True)]
        return [StageStats(s.name, *rt.counters(k)) for k, s in enumerate(self.stages)]

    def _run(self, frames: Iterable[Any]) -> Iterator[Any]:
        rt = self._rt
        assert rt is not None
        max_in_flight = self.queue_size * (len(self.stages) + 1) + len(self.stages)
        it = iter(frames)
        sent = received = 0
        pending: Any = None
        exhausted = False
        last_progress = time.monotonic()
        while True:
            # keep the pipeline full, never blocking: a blocked put would stop us draining the output
            while not exhausted and sent - received < max_in_flight:
                if pending is None:
                    try:
                        frame = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    except Exception as exc:  # noqa: BLE001
                        raise PipelineError("input", -1, sent, describe(exc), traceback.format_exc()) from exc
                    try:
                        pending = rt.pack((ITEM, sent, frame))
                    except Exception as exc:  # noqa: BLE001
                        raise PipelineError("input", -1, sent, f"the frame cannot be sent to a worker: "
                                            f"{describe(exc)}", traceback.format_exc()) from exc  # fmt: skip
                try:
                    rt.queues[0].put_nowait(pending)
                except queue.Full:
                    break
                sent, pending = sent + 1, None
            if exhausted and received == sent:
                return
            msg = rt.get(self.poll_s)
            if msg is None:
                self._check_workers()
                if time.monotonic() - last_progress > self.timeout_s:
                    raise self._hang_error()
                continue
            last_progress = time.monotonic()
            last = len(self.stages) - 1
            if msg[0] == ERROR:
                raise self._error(msg)
            if msg[0] != ITEM:
                raise PipelineError(self.stages[last].name, last, None, f"protocol error: unexpected {msg[0]!r}")
            if msg[1] != received:
                raise PipelineError(self.stages[last].name, last, received, f"frame {msg[1]} came out where frame "
                                    f"{received} was expected (a lost or reordered frame)")  # fmt: skip
            received += 1
            yield msg[2]

    def _check_workers(self) -> None:
        """Raise if a worker is gone without having said why (killed, crashed, ``os._exit``)."""
        rt = self._rt
        assert rt is not None
        for k, w in enumerate(rt.workers):
            frame, _ = rt.frame_of(k)
            if w.is_alive() or frame == LEFT:
                continue
            hint = ""
            if not self._ready and self.kind == WorkerKind.PROCESS:
                hint = ("; a spawned worker imports the main module again: guard the code that starts the "
                        "pipeline with `if __name__ == '__main__':`, and define stage functions in an importable "
                        "module")  # fmt: skip
            code = getattr(w, "exitcode", None)
            raise PipelineError(self.stages[k].name, k, int(frame) if frame >= 0 else None,
                                f"the worker exited unexpectedly (exit code {code}){hint}")  # fmt: skip

    def _hang_error(self) -> PipelineError:
        """The stage that has held its frame longest, for a pipeline that stopped making progress."""
        rt = self._rt
        assert rt is not None
        held = [(since, k, int(frame)) for k in range(len(self.stages)) for frame, since in [rt.frame_of(k)]
                if frame >= 0]  # fmt: skip
        if not held:
            return PipelineError(self.stages[0].name, 0, None, f"no progress for {self.timeout_s:g} s and no stage "
                                 "holds a frame")  # fmt: skip
        since, k, frame = min(held)
        return PipelineError(self.stages[k].name, k, frame, f"timed out: working on the frame for "
                             f"{time.monotonic() - since:.1f} s (timeout_s={self.timeout_s:g})")  # fmt: skip

    def _error(self, msg: tuple) -> PipelineError:
        _, frame, k, cause, tb = msg
        return PipelineError(self.stages[k].name, k, None if frame == NO_FRAME else frame, cause, tb)

    def _abort(self) -> None:
        rt, self._rt = self._rt, None
        self._state = "closed"
        if rt is not None:
            self._counters = [rt.counters(k) for k in range(len(self.stages))]
            rt.shutdown(grace_s=min(self.timeout_s, 5.0))
