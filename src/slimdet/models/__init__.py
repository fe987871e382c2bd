"""Detectors by name: the native YOLO-style family and torchvision adapters."""

from slimdet.models.base import Detections, Detector, Target
from slimdet.models.registry import (
    create_model,
    list_models,
    load_model,
    model_from_config,
    record_transform,
    register_model,
    register_replay,
)

__all__ = [
    "Detections",
    "Detector",
    "Target",
    "create_model",
    "list_models",
    "load_model",
    "model_from_config",
    "record_transform",
    "register_model",
    "register_replay",
]
