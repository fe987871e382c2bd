"""Atomic writes and safe checkpoint loading.

A file is written to a temporary name in the same folder, flushed and fsynced, then renamed over
the target: a reader sees the old file or the new one, never a partial one. A write that fails
(disk full, read-only place, a file where a folder should be) removes its temporary file and raises
:class:`~slimdet.errors.OutputError` naming the target.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from slimdet.errors import CheckpointError, OutputError, SlimdetError

CHECKPOINT_FORMAT = "slimdet-checkpoint"
CHECKPOINT_VERSION = 1


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path`` and rename it into place.

    Raises:
        OutputError: the folder cannot be made or the file cannot be written; ``path`` is unchanged.
    """
    path = Path(path)
    ensure_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise output_error(path, exc, "cannot write") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, SlimdetError):
            raise output_error(path, exc, "cannot write", unchanged=True) from exc
        raise
    return path


def ensure_dir(path: str | Path, *, what: str = "output folder") -> Path:
    """Create the folder ``path`` (and its parents) or raise OutputError naming it and what is in the way."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(path, exc, f"cannot create the {what}", folder=True) from exc
    return path


def output_error(path: Path, exc: OSError, doing: str, *, folder: bool = False, unchanged: bool = False) -> OutputError:
    """``<path>: <doing>: <the OS's reason>`` (plus the file in the way, if any), keeping ``errno``.

    ``folder``: ``path`` itself should be a folder; ``unchanged``: say that the target was left as it was.
    """
    reason = exc.strerror or str(exc)
    blocker = next((p for p in ((path,) if folder else ()) + tuple(path.parents) if p.exists() and not p.is_dir()),
                   None)  # fmt: skip
    if blocker is not None:
        reason += f" ({blocker} is a file, not a folder)"
    if unchanged:
        reason += f"; nothing was written (any earlier {path.name} is unchanged)"
    err = OutputError(f"{path}: {doing}: {reason}")
    err.errno = exc.errno
    return err


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
    # Serialized in memory first: torch's zip writer turns a failed file write (disk full) into an
    # opaque "unexpected pos" RuntimeError, while a plain write raises the OS error itself.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a slimdet checkpoint safely (no code from the file is run) or raise CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # arbitrary bytes fail in many ways (UnpicklingError, KeyError, EOFError, ...)
        raise CheckpointError(
            f"{path}: not a loadable slimdet checkpoint (truncated, corrupt, or containing objects other "
            f"than tensors and plain data): {_load_failure(exc)}"
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


def _load_failure(exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one line.

    torch's own text for a refused pickle starts by explaining how to load the file anyway, unsafely
    (weights_only=False); the reason is further down, in its "WeightsUnpickler error" part.
    """
    text = str(exc)
    called = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if called:
        return (f"it refers to the Python object {called.group(1)} (code that loading would import and run), "
                "so it was refused and nothing from it was run")  # fmt: skip
    reason = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    if reason:
        return "the safe unpickler refused it: " + " ".join(reason.group(1).split())
    lines = re.sub(r"\x1b\[[0-9;]*m", "", text).strip().splitlines()
    return re.split(r"(?<=\.)\s", lines[0])[0] if lines else type(exc).__name__  # its first sentence
