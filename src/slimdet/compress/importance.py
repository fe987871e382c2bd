"""Channel-importance criteria for structured pruning, looked up by name in :data:`IMPORTANCE`.

Each criterion is a Torch-Pruning importance (``criterion(group) -> Tensor``, one score per channel
of the group's root layer, higher = keep), so it also works with Torch-Pruning's own pruners. A
criterion that needs gradients gathers them in ``prepare(model, calib)`` from the detector's own
loss (``model.compute_loss``) on calibration batches, with the model in eval mode so that batch-norm
statistics are not touched.

* ``l1``: sum of |w| over the group's weights (Li et al., "Pruning Filters for Efficient ConvNets",
  ICLR 2017);
* ``l2``: sum of w^2 over the group's weights;
* ``bn_scale``: |gamma| of the group's norm layers (Liu et al., "Network Slimming", ICCV 2017);
* ``taylor``: |w * dL/dw| summed over the group (Molchanov et al., CVPR 2019);
* ``hessian``: w^2 * E[(dL/dw)^2], Optimal Brain Damage (LeCun et al., NeurIPS 1989) with the
  empirical Fisher information, from per-image gradients, as the Hessian diagonal;
* ``random``: seeded uniform noise, the control every other criterion should beat.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch_pruning as tp
from torch import Tensor, nn

from slimdet.errors import ConfigError
from slimdet.models.base import Detector, Target
from slimdet.registry import Registry

#: a calibration set: (images B x 3 x S x S, targets) batches as slimdet.data.collate makes them
Calib = Sequence[tuple[Tensor, list[Target]]]

IMPORTANCE: Registry[type[Any]] = Registry("importance criterion")


class Criterion:
    """Mixin: what slimdet needs from a criterion besides Torch-Pruning's ``__call__(group)``."""

    #: whether ``prepare`` needs calibration batches (gradients of the loss)
    needs_calib: ClassVar[bool] = False

    def prepare(self, model: Detector, calib: Calib | None) -> None:
        """Gather what the scores need (gradients) before the groups are scored."""


def make_importance(name: str, *, seed: int = 0) -> Any:
    """A fresh criterion registered as ``name``."""
    cls = IMPORTANCE.get(name)
    return cls(seed=seed) if cls is RandomCriterion else cls()


def check_calib(name: str, calib: Calib | None) -> Calib:
    if not calib:
        raise ConfigError(f"importance {name!r} needs calibration batches (calib=[(images, targets), ...])")
    return calib


@IMPORTANCE.register("l1")
class L1Criterion(tp.importance.MagnitudeImportance, Criterion):
    def __init__(self) -> None:
        super().__init__(p=1)


@IMPORTANCE.register("l2")
class L2Criterion(tp.importance.MagnitudeImportance, Criterion):
    def __init__(self) -> None:
        super().__init__(p=2)


@IMPORTANCE.register("bn_scale")
class NormScaleCriterion(tp.importance.BNScaleImportance, Criterion):
    """|gamma| of batch-norm layers; of group-norm layers where there are none (FCOS's head); the
    L1 norm of the weights for groups without any norm layer (Faster R-CNN's box head)."""

    def __init__(self) -> None:
        super().__init__()
        self._fallback = tp.importance.MagnitudeImportance(p=1)

    @torch.no_grad()
    def __call__(self, group: Any) -> Tensor | None:
        imp = super().__call__(group)
        if imp is not None:
            return imp
        scales, roots = [], []
        for item in group:
            layer = item.dep.target.module
            if isinstance(layer, nn.GroupNorm) and layer.affine:
                scales.append(layer.weight.detach().abs()[item.idxs])
                roots.append(item.root_idxs)
        if scales:
            return self._normalize(self._reduce(scales, roots), self.normalizer)
        return self._fallback(group)


@IMPORTANCE.register("taylor")
class TaylorCriterion(tp.importance.TaylorImportance, Criterion):
    needs_calib = True

    def prepare(self, model: Detector, calib: Calib | None) -> None:
        calib = check_calib("taylor", calib)
        with eval_mode(model):
            model.zero_grad(set_to_none=True)
            for images, targets in calib:
                loss, _ = model.compute_loss(images, targets)
                loss.backward()
        _fill_missing_grads(model)


@IMPORTANCE.register("hessian")
class HessianCriterion(tp.importance.HessianImportance, Criterion):
    needs_calib = True

    def prepare(self, model: Detector, calib: Calib | None) -> None:
        calib = check_calib("hessian", calib)
        params = [p for p in model.parameters() if p.requires_grad]
        fisher = [torch.zeros_like(p) for p in params]
        count = 0
        with eval_mode(model):
            for images, targets in calib:
                for i in range(images.shape[0]):  # per-image gradients: E[g^2], not E[g]^2
                    model.zero_grad(set_to_none=True)
                    loss, _ = model.compute_loss(images[i : i + 1], targets[i : i + 1])
                    loss.backward()
                    for f, p in zip(fisher, params, strict=True):
                        if p.grad is not None:
                            f += p.grad.detach() ** 2
                    count += 1
        # Torch-Pruning's Hessian importance reads the diagonal from .grad
        for f, p in zip(fisher, params, strict=True):
            p.grad = f / max(count, 1)
        self.zero_grad()


@IMPORTANCE.register("random")
class RandomCriterion(tp.importance.RandomImportance, Criterion):
    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def __call__(self, group: Any, **kwargs: Any) -> Tensor:
        return torch.rand(len(group[0].idxs), generator=self.generator)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration of a block (batch-norm statistics stay as they are)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def calib_loss(model: nn.Module, calib: Calib) -> float:
    """Mean detection loss (``model.compute_loss``) over calibration batches, in eval mode."""
    with eval_mode(model):
        losses = [float(model.compute_loss(images, targets)[0]) for images, targets in calib]
    return sum(losses) / len(losses)


def _fill_missing_grads(model: nn.Module) -> None:
    # layers the loss does not reach score zero instead of failing on a missing .grad
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
