"""An exclusive lock on a run directory, so that two runs never write into the same one."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from slimdet.errors import ConfigError

RUN_LOCK = "run.lock"


@contextmanager
def run_lock(run_dir: Path) -> Iterator[Path]:
    """Hold ``flock`` on ``run_dir/run.lock`` for the body; raise ConfigError when another holds it.

    The lock belongs to the open file, so it is released when the process ends, even by a crash;
    the file itself stays (it holds the pid of the last holder, for messages).
    """
    path = run_dir / RUN_LOCK
    f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the lock's lifetime
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(
            f"{run_dir}: another slimdet run is writing into this run directory ({holder} holds {path}); "
            "wait for it to finish or choose another --out"
        ) from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        yield path
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()
