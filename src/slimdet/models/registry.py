"""Models made by name: ``create_model("yolo-s", num_classes=10)``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from slimdet.errors import CheckpointError
from slimdet.io import load_checkpoint
from slimdet.models.base import Detector
from slimdet.registry import Registry

ModelFactory = Callable[..., Detector]
MODELS: Registry[ModelFactory] = Registry("model")


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register ``factory(num_classes, **kw) -> Detector`` under ``name``."""
    return MODELS.register(name)


def list_models() -> list[str]:
    _import_builtin_models()
    return MODELS.names()


def create_model(name: str, num_classes: int, **kw: Any) -> Detector:
    _import_builtin_models()
    model = MODELS.get(name)(num_classes=num_classes, **kw)
    model.model_config = {"name": name, "num_classes": num_classes, **kw}
    return model


def model_from_config(config: dict[str, Any]) -> Detector:
    cfg = dict(config)
    return create_model(cfg.pop("name"), **cfg)


def load_model(path: str | Path) -> tuple[Detector, dict[str, Any]]:
    """Rebuild a model from a checkpoint; returns the model and the checkpoint payload."""
    payload = load_checkpoint(path)
    model = model_from_config(payload["model"])
    try:
        result = model.load_state_dict(payload["state_dict"], strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = str(exc).strip().splitlines()
        detail = next((ln.strip() for ln in first if "size mismatch" in ln), first[0] if first else "")
        raise CheckpointError(
            f"{path}: checkpoint does not match model {payload['model'].get('name')!r}: {detail}"
        ) from None
    mismatched = list(result.missing_keys) + list(result.unexpected_keys)
    if mismatched:
        raise CheckpointError(
            f"{path}: checkpoint does not match model {payload['model'].get('name')!r}: "
            f"{len(result.missing_keys)} missing and {len(result.unexpected_keys)} unexpected tensors "
            f"(first: {mismatched[0]!r})"
        )
    return model, payload


def _import_builtin_models() -> None:
    # Importing the modules runs their @register_model decorators.
    from slimdet.models import torchvision as _tv  # noqa: F401
    from slimdet.models import yolo as _yolo  # noqa: F401
