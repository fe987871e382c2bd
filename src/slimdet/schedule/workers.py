"""The worker side of :mod:`slimdet.schedule.executor`: messages, the stage loop, queues and processes.

Every queue carries tuples whose first element says what they are: ``(setup, fn)`` (always the first
message a worker gets), ``(item, frame, payload)``, ``(ready, stage)``, ``(error, frame, stage, cause,
traceback)`` and ``(stop,)``. A worker passes on what is not an item, so errors and the stop message
flow down the pipeline behind the frames before them. Between processes a message is pickled by the
sender itself (so an object that cannot be sent is an error of the stage that made it, not a message
silently dropped by a queue's feeder thread), with CPU tensors sent as NumPy arrays.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import pickle
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

SETUP, ITEM, ERROR, READY, STOP = "setup", "item", "error", "ready", "stop"
#: frame index of messages that belong to no frame (setup, stop)
NO_FRAME = -1
#: ``progress`` slots per stage: frame being processed (-1: none; LEFT: exited on purpose), since when
#: (monotonic seconds, system-wide on Linux), frames done, seconds spent in the stage function
SLOTS = 4
LEFT = -2.0


class WorkerKind(StrEnum):
    PROCESS = "process"  # one OS process per stage: true parallelism, items are pickled between stages
    THREAD = "thread"  # one thread per stage: no copies; parallel only where stages release the GIL


@dataclass
class Runtime:
    """Queues, workers, stop event and progress counters of one started pipeline."""

    kind: WorkerKind
    queues: list[Any]  # queues[k] feeds stage k; queues[-1] is the output
    stop: Any  # an Event: every worker leaves at its next queue operation
    progress: Any  # SLOTS doubles per stage, shared with the workers
    workers: list[Any] = field(default_factory=list)

    @classmethod
    def create(cls, kind: WorkerKind, n_stages: int, queue_size: int) -> Runtime:
        init = [-1.0, 0.0, 0.0, 0.0] * n_stages
        if kind == WorkerKind.PROCESS:
            # spawn, not fork: forking a process that runs PyTorch's or ONNX Runtime's thread pools can deadlock
            ctx = mp.get_context("spawn")
            queues = [ctx.Queue(maxsize=queue_size) for _ in range(n_stages + 1)]
            return cls(kind, queues, ctx.Event(), ctx.Array("d", init, lock=False))
        return cls(kind, [queue.Queue(maxsize=queue_size) for _ in range(n_stages + 1)], threading.Event(), init)

    def start_worker(self, k: int, name: str, threads: int, poll_s: float) -> None:
        args = (k, threads, self.queues[k], self.queues[k + 1], self.stop, self.progress, poll_s,
                self.kind == WorkerKind.PROCESS)  # fmt: skip
        label = f"slimdet-stage-{k}-{name}"
        if self.kind == WorkerKind.PROCESS:
            w = mp.get_context("spawn").Process(target=worker_main, args=args, name=label, daemon=True)
        else:
            w = threading.Thread(target=worker_main, args=args, name=label, daemon=True)
        w.start()
        self.workers.append(w)

    def pack(self, msg: tuple) -> Any:
        return dumps(msg) if self.kind == WorkerKind.PROCESS else msg

    def get(self, timeout: float) -> tuple | None:
        """The next message out of the last stage, or None after ``timeout`` seconds."""
        try:
            return unpack(self.queues[-1].get(timeout=timeout))
        except queue.Empty:
            return None

    def frame_of(self, k: int) -> tuple[float, float]:
        """(frame index or -1 or LEFT, since when) of stage ``k``."""
        return self.progress[SLOTS * k], self.progress[SLOTS * k + 1]

    def counters(self, k: int) -> tuple[int, float]:
        return int(self.progress[SLOTS * k + 2]), float(self.progress[SLOTS * k + 3])

    def shutdown(self, grace_s: float) -> None:
        """Set the stop event, wait ``grace_s`` for the workers, then terminate and kill what is left."""
        self.stop.set()
        deadline = time.monotonic() + grace_s
        for w in self.workers:
            w.join(max(0.0, deadline - time.monotonic()))
        if self.kind == WorkerKind.PROCESS:
            for w in self.workers:
                if w.is_alive():
                    w.terminate()
                    w.join(1.0)
                if w.is_alive():
                    w.kill()
                    w.join(1.0)
            for q in self.queues:  # never block this process's exit on buffers no one will read
                q.cancel_join_thread()
                q.close()
        # a thread stuck inside its stage function cannot be killed: it is a daemon, and nobody reads
        # its queues any more, so it is left to finish on its own


def worker_main(k: int, threads: int, inq: Any, outq: Any, stop: Any, progress: Any, poll_s: float,
                is_process: bool) -> None:  # fmt: skip
    """One stage: receive its function, set it up, then item -> fn(item) until a stop message or event."""
    base = SLOTS * k

    def send(data: Any) -> bool:
        while not stop.is_set():
            try:
                outq.put(data, timeout=poll_s)
                return True
            except queue.Full:
                continue
        return False

    def pack(msg: tuple) -> Any:
        return dumps(msg) if is_process else msg

    def receive() -> tuple | None:
        while not stop.is_set():
            try:
                return unpack(inq.get(timeout=poll_s))
            except queue.Empty:
                continue
        return None

    frame, doing = NO_FRAME, "setup: "  # what a failure is reported as
    try:
        msg = receive()
        if msg is None:
            return
        fn = msg[1]  # the first message is always (SETUP, fn)
        torch = sys.modules.get("torch")  # imported while unpickling the function, if it uses PyTorch
        if is_process and torch is not None:
            torch.set_num_threads(threads)
        setup = getattr(fn, "setup", None)
        if callable(setup):
            setup()
        doing = ""
        if not send(pack((READY, k))):
            return
        while True:
            frame, doing = NO_FRAME, "receiving: "
            if (msg := receive()) is None:
                return
            doing = ""
            if msg[0] != ITEM:  # ready / error / stop from upstream: pass it on
                if not send(pack(msg)) or msg[0] in (STOP, ERROR):
                    return
                continue
            _, frame, item = msg
            t0 = time.monotonic()
            progress[base + 1], progress[base] = t0, float(frame)
            result = fn(item)
            progress[base], progress[base + 2] = -1.0, progress[base + 2] + 1
            progress[base + 3] += time.monotonic() - t0
            doing = "its result cannot be sent to the next stage: "
            data = pack((ITEM, frame, result))
            if not send(data):
                return
    except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt too: the caller must hear
        cause = f"{doing}{describe(exc)}"
        send(pack((ERROR, frame, k, cause, traceback.format_exc())))
    finally:
        progress[base] = LEFT  # a deliberate exit: its last message is on its way down the pipeline
        if is_process and stop.is_set():
            outq.cancel_join_thread()  # the reader may be gone: do not block this process's exit on the pipe


class _Pickler(pickle.Pickler):
    """The standard pickler, except that CPU tensors travel as NumPy arrays.

    PyTorch pickles a tensor's storage through ``torch.save`` (about 0.2 ms per small tensor) and its
    multiprocessing reduction moves it to shared memory (a file descriptor per tensor); a NumPy array
    is a plain buffer copy. The tensor is rebuilt with ``torch.from_numpy``: same dtype, shape, values.
    """

    def reducer_override(self, obj: Any) -> Any:
        torch = sys.modules.get("torch")
        if torch is not None and type(obj) is torch.Tensor and obj.device.type == "cpu" and not obj.requires_grad:
            try:
                return _tensor_from_numpy, (obj.numpy(),)
            except (TypeError, RuntimeError):  # dtypes NumPy lacks (bfloat16), sparse, conjugate views
                return NotImplemented
        return NotImplemented


def dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def unpack(data: Any) -> tuple:
    return pickle.loads(data) if isinstance(data, bytes) else data


def _tensor_from_numpy(array: Any) -> Any:
    import torch

    return torch.from_numpy(array)


def describe(exc: BaseException) -> str:
    """``ExceptionType: first line of the message``."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
