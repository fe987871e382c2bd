"""The detector interface every model in slimdet follows.

Images go in as a float tensor ``B x 3 x H x W`` with values in [0, 1] (letterboxed to the model's
input size by the data pipeline). ``forward`` returns raw tensors only, so that a model can be
exported, pruned and quantized; ``postprocess`` turns them into detections; ``loss`` scores them
against targets. A target is a dict with ``boxes`` (N x 4, xyxy pixels in the input frame, float)
and ``labels`` (N, int64, 0..num_classes-1). A detection is a dict with ``boxes``, ``scores`` and
``labels`` in the same frame and conventions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

Raw = Tensor | tuple[Tensor, ...]
Target = dict[str, Tensor]
Detections = dict[str, Tensor]


class Detector(nn.Module):
    """Base class: raw ``forward``, ``postprocess``, ``loss``; built by name from the registry."""

    #: registry name and the keyword arguments that rebuild this model (set by ``create_model``).
    model_config: dict[str, Any]

    def __init__(self, num_classes: int, input_size: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.input_size = input_size
        self.model_config = {}

    def forward(self, images: Tensor) -> Raw:  # pragma: no cover - abstract
        raise NotImplementedError

    def postprocess(
        self, raw: Raw, *, conf_thres: float = 0.001, iou_thres: float = 0.6, max_det: int = 100
    ) -> list[Detections]:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, raw: Raw, targets: list[Target]) -> tuple[Tensor, dict[str, float]]:  # pragma: no cover
        raise NotImplementedError

    def output_layers(self) -> list[str]:  # pragma: no cover - abstract
        """Module names of the final prediction layers, whose output channels fix the output format
        (class logits, box regression); compression keeps their outputs intact."""
        raise NotImplementedError

    def feature_layers(self) -> list[str]:
        """Module names whose *inputs* are the features the heads read (one per level), where
        distillation imitates the teacher's features; models without them cannot be distilled."""
        raise NotImplementedError(f"{type(self).__name__} names no feature layers")

    def compute_loss(self, images: Tensor, targets: list[Target]) -> tuple[Tensor, dict[str, float]]:
        """Total loss and its named parts for one batch; models whose loss needs the targets during
        the forward pass (two-stage detectors) override this."""
        return self.loss(self(images), targets)

    @torch.no_grad()
    def predict(self, images: Tensor, **kw: Any) -> list[Detections]:
        """Detections for a batch, in eval mode."""
        was_training = self.training
        self.eval()
        try:
            return self.postprocess(self(images), **kw)
        finally:
            self.train(was_training)

    def example_inputs(self, batch_size: int = 1) -> Tensor:
        """A batch of the right shape for tracing, export and profiling."""
        return torch.rand(batch_size, 3, self.input_size, self.input_size)
