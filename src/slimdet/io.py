"""Atomic writes and safe checkpoint loading.

A file is written to a temporary name in the same folder, flushed and fsynced, then renamed over
the target: a reader sees the old file or the new one, never a partial one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from slimdet.errors import CheckpointError

CHECKPOINT_FORMAT = "slimdet-checkpoint"
CHECKPOINT_VERSION = 1


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def save_checkpoint(
    path: str | Path, *, model_config: dict[str, Any], state_dict: dict[str, Any], **extra: Any
) -> Path:
    """Save a state dict plus the config that rebuilds the model; loadable with ``weights_only=True``.

    ``extra`` holds plain data only (numbers, strings, lists, dicts, tensors): epoch, optimizer
    state, metrics, records of earlier transforms.
    """
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": model_config,
        "state_dict": state_dict,
        **extra,
    }
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a slimdet checkpoint safely (no code from the file is run) or raise CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # arbitrary bytes fail in many ways (UnpicklingError, KeyError, EOFError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: not a loadable slimdet checkpoint (truncated, corrupt, or containing objects other "
            f"than tensors and plain data): {first}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: not a slimdet checkpoint (expected a dict with format={CHECKPOINT_FORMAT!r}; "
            "make one with 'slimdet train' or slimdet.io.save_checkpoint)"
        )
    for key in ("model", "state_dict"):
        if key not in payload:
            raise CheckpointError(f"{path}: checkpoint has no {key!r} field")
    return payload
