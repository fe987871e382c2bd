"""Models made by name: ``create_model("yolo-s", num_classes=10)``.

A model's ``model_config`` rebuilds it: the registry name, the factory's keyword arguments, and,
for a compressed model, the ordered list ``transforms`` of what was done to it (each a dict with a
``kind`` and a plain-data record). ``model_from_config`` builds the original architecture and
replays each transform with the replayer registered for its kind, so a pruned model is rebuilt from
its record rather than unpickled.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from slimdet.errors import CheckpointError, ConfigError
from slimdet.io import load_checkpoint
from slimdet.models.base import Detector
from slimdet.registry import Registry

ModelFactory = Callable[..., Detector]
MODELS: Registry[ModelFactory] = Registry("model")
Replayer = Callable[[Detector, dict[str, Any]], Detector]
REPLAYERS: Registry[Replayer] = Registry("model transform")
#: transforms after which no other transform may run (their parametrisation owns the weights)
FINAL_TRANSFORMS: set[str] = set()


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


def register_replay(kind: str, *, final: bool = False) -> Callable[[Replayer], Replayer]:
    """Register ``replay(model, entry) -> model`` that redoes a recorded transform of ``kind``;
    ``final``: no transform may follow one of this kind (see :func:`refuse_after_final`)."""
    if final:
        FINAL_TRANSFORMS.add(kind)
    return REPLAYERS.register(kind)


def refuse_after_final(model: nn.Module, verb: str) -> None:
    """Raise ConfigError when ``model`` went through a final transform (weight sharing): ``verb``
    would rewrite weights that the final transform's parametrisation owns."""
    done = [e.get("kind") for e in getattr(model, "model_config", {}).get("transforms", [])]
    final = [kind for kind in done if kind in FINAL_TRANSFORMS]
    if final:
        raise ConfigError(
            f"{verb}: the model's weights were already transformed by {final[-1]!r}, which must be the last "
            f"transform (transforms so far: {', '.join(map(str, done))}); run {verb} before it"
        )


def record_transform(model: Detector, entry: dict[str, Any]) -> None:
    """Append a transform (``{"kind": ..., plain data}``) to ``model.model_config``."""
    if "kind" not in entry:
        raise ValueError("a transform entry needs a 'kind'")
    done = list(model.model_config.get("transforms", []))
    model.model_config = {**model.model_config, "transforms": [*done, entry]}


def model_from_config(config: dict[str, Any]) -> Detector:
    """Build the registered architecture, then replay the recorded transforms in order."""
    cfg = dict(config)
    transforms = cfg.pop("transforms", [])
    model = create_model(cfg.pop("name"), **cfg)
    if transforms:
        _import_builtin_transforms()
    for entry in transforms:
        model = REPLAYERS.get(entry["kind"])(model, entry)
    model.model_config = dict(config)
    return model


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


def _import_builtin_transforms() -> None:
    # The compression modules register their replayers on import.
    import importlib.util

    if importlib.util.find_spec("slimdet.compress") is not None:
        import slimdet.compress  # noqa: F401


def _import_builtin_models() -> None:
    # Importing the modules runs their @register_model decorators.
    from slimdet.models import torchvision as _tv  # noqa: F401
    from slimdet.models import yolo as _yolo  # noqa: F401
