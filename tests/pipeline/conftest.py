"""Fakes for pipeline tests: a tiny registered model and steps registered only for the test."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from pydantic import Field
from torch import nn

from slimdet.io import save_checkpoint
from slimdet.models.base import Detector
from slimdet.models.registry import MODELS, create_model
from slimdet.pipeline import STEPS, RunContext, StepOptions, StepOutput, register_step

TINY = "pipeline-test-tiny"
CLASSES = ["zero", "one"]


class TinyDetector(Detector):
    def __init__(self, num_classes: int, input_size: int = 32) -> None:
        super().__init__(num_classes, input_size)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images)


class MeasureOptions(StepOptions):
    split: str = "test"


class ShrinkOptions(StepOptions):
    factor: float = Field(0.5, gt=0)


class Fakes:
    """Call counts per step index, and how many times the flaky step still has to fail."""

    def __init__(self) -> None:
        self.calls: Counter[int] = Counter()
        self.flaky_failures = 0
        self.class_names = list(CLASSES)


def _weight_sum(model: nn.Module) -> float:
    return float(sum(p.detach().abs().sum() for p in model.parameters()))


@pytest.fixture
def fakes() -> Fakes:
    """Registers the tiny model and the fake steps for one test, and removes them after."""
    state = Fakes()
    MODELS.register(TINY)(TinyDetector)

    @register_step("t-measure", options=MeasureOptions, changes_model=False)
    def measure(ctx: RunContext, model: Detector, opts: MeasureOptions) -> StepOutput:
        state.calls[ctx.step_index] += 1
        s = _weight_sum(model)
        aps = {name: round(s / (10 + i) % 1, 6) for i, name in enumerate(state.class_names)}
        return StepOutput(model, record={"split": opts.split},
                          metrics={"split": opts.split, "map": round(s % 1, 6), "map50": round(s / 3 % 1, 6),
                                   "per_class_ap": aps, "num_images": 5})  # fmt: skip

    @register_step("t-profile", changes_model=False)
    def prof(ctx: RunContext, model: Detector, opts: StepOptions) -> StepOutput:
        state.calls[ctx.step_index] += 1
        params = sum(p.numel() for p in model.parameters())
        latency_s = 1e-3 * (1 + _weight_sum(model) / 100)
        lat = [
            {"runtime": rt, "batch_size": b, "median_s": latency_s * b * k, "p90_s": latency_s * b * k * 1.1}
            for rt, k in (("torch-eager", 2), ("onnxruntime-cpu", 1))
            for b in (1, 8)
        ]
        metrics = {"params": params, "macs": params * 1024, "state_dict_size_bytes": params * 4, "threads": 1,
                   "latency": lat}  # fmt: skip
        return StepOutput(model, record={"layers": [{"name": "conv", "macs": params * 1024}]}, metrics=metrics)

    @register_step("t-shrink", options=ShrinkOptions, changes_model=True)
    def shrink(ctx: RunContext, model: Detector, opts: ShrinkOptions) -> StepOutput:
        state.calls[ctx.step_index] += 1
        with torch.no_grad():
            for p in model.parameters():  # random part: resume must reproduce the seeding exactly
                p.mul_(opts.factor).add_(torch.rand_like(p) * 0.01)
        return StepOutput(model, record={"factor": opts.factor}, metrics={"weight_sum": round(_weight_sum(model), 5)})

    @register_step("t-flaky", changes_model=False)
    def flaky(ctx: RunContext, model: Detector, opts: StepOptions) -> StepOutput:
        state.calls[ctx.step_index] += 1
        if state.flaky_failures > 0:
            state.flaky_failures -= 1
            raise RuntimeError("simulated crash")
        return StepOutput(model, metrics={"ok": True})

    yield state
    for name in ("t-measure", "t-profile", "t-shrink", "t-flaky"):
        STEPS.unregister(name)
    MODELS._items.pop(TINY, None)


@pytest.fixture
def tiny_checkpoint(tmp_path: Path, fakes: Fakes) -> Path:
    torch.manual_seed(0)
    model = create_model(TINY, num_classes=len(CLASSES), input_size=32)
    return save_checkpoint(tmp_path / "tiny.pt", model_config=model.model_config, state_dict=model.state_dict())


@pytest.fixture
def dataset_yaml(tmp_path: Path) -> Path:
    """A minimal dataset YAML (the fake steps never read images)."""
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    path = root / "data.yaml"
    path.write_text(f"format: yolo\nnames: {CLASSES}\nsplits:\n  test: {{images: images, labels: labels}}\n")
    return path


@pytest.fixture
def recipe_dict(tiny_checkpoint: Path, dataset_yaml: Path) -> dict:
    return {
        "checkpoint": str(tiny_checkpoint),
        "dataset": str(dataset_yaml),
        "input_size": 32,
        "steps": ["t-measure", "t-profile", {"t-shrink": {"factor": 0.5}}, "t-flaky", "t-measure", "t-profile"],
    }
