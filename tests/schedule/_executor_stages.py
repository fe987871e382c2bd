"""Stage functions for tests/schedule/test_executor.py, importable by spawned workers (no heavy imports)."""

from __future__ import annotations

import os
import time


def add_one(x: int) -> int:
    time.sleep(0.001 * (x % 3))  # uneven stage times: a stage that can overtake would do it here
    return x + 1


def times_ten(x: int) -> int:
    time.sleep(0.002 * ((x + 1) % 2))
    return 10 * x


class FailOn:
    """Raises on one frame value."""

    def __init__(self, bad: int) -> None:
        self.bad = bad

    def __call__(self, x: int) -> int:
        if x == self.bad:
            raise ValueError(f"bad frame value {x}")
        return x


class ExitOn:
    """Kills its own process on one frame value (no exception, no message: a crash)."""

    def __init__(self, bad: int) -> None:
        self.bad = bad

    def __call__(self, x: int) -> int:
        if x == self.bad:
            os._exit(3)
        return x


class SleepOn:
    def __init__(self, bad: int, seconds: float) -> None:
        self.bad, self.seconds = bad, seconds

    def __call__(self, x: int) -> int:
        if x == self.bad:
            time.sleep(self.seconds)
        return x


class BadSetup:
    def setup(self) -> None:
        raise RuntimeError("no such device")

    def __call__(self, x: int) -> int:
        return x


def make_tensor(x: int) -> dict:
    import torch

    return {"v": torch.full((3,), float(x)), "i": torch.arange(x % 4)}


def unpicklable(x: int):  # noqa: ANN201
    return lambda: x  # a result that cannot be sent to another process
