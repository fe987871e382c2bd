"""Per-layer parameters and multiply-accumulates (MACs), counted by forward hooks on leaf modules.

One MAC is one multiply plus one add (FLOPs ~= 2 x MACs). Only work done inside leaf modules is
seen: tensor arithmetic written directly in a ``forward`` (``x * y``, ``torch.cat``, box decoding)
is not counted, and leaf modules with weights that have no formula here are reported as uncounted
instead of being guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

# Modules that do no multiply-accumulates worth counting; listed with their output element counts.
_ELEMENTWISE = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.LeakyReLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.GELU,
    nn.Mish,
    nn.Identity,
    nn.Dropout,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Upsample,
    nn.Flatten,
)


_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass(frozen=True)
class LayerProfile:
    """One call of one leaf module during a batch-1 forward."""

    name: str  # qualified module name; "name#2" for its second call when a module is reused
    type: str
    output_shape: tuple[int, ...]
    params: int  # parameters owned by this module (counted once, on its first call)
    macs: int
    output_elements: int
    counted: bool  # False: a leaf with weights but no MAC formula here (macs reported as 0)


def conv_macs(weight_shape: tuple[int, ...], out_elements: int) -> int:
    """Conv1d/2d/3d: every output element takes (in_ch / groups) x kernel-volume MACs.

    weight is (out_ch, in_ch / groups, *kernel); stride, padding and dilation change the output
    size only, so they are in ``out_elements``. Conv2d: out_elems * (in_ch/groups) * kh * kw.
    """
    return out_elements * weight_shape[1] * math.prod(weight_shape[2:])


def conv_transpose_macs(weight_shape: tuple[int, ...], in_elements: int) -> int:
    """ConvTranspose: every input element is scattered onto (out_ch / groups) x kernel-volume outputs.

    weight is (in_ch, out_ch / groups, *kernel); input-centric count, as in fvcore and ptflops
    (outputs cropped away by padding are still counted).
    """
    return in_elements * weight_shape[1] * math.prod(weight_shape[2:])


def linear_macs(in_features: int, out_features: int, out_elements: int) -> int:
    """Linear: (out_elems / out_features) rows, each in_features x out_features MACs."""
    return (out_elements // out_features) * in_features * out_features


def layer_macs(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> int | None:
    """MACs of one call of a leaf module, 0 for element-wise modules, None when unknown."""
    out = _first_tensor(output)
    out_elements = out.numel() if out is not None else 0
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return conv_transpose_macs(tuple(module.weight.shape), _first_tensor(inputs).numel())
    if isinstance(module, nn.modules.conv._ConvNd):
        return conv_macs(tuple(module.weight.shape), out_elements)
    if isinstance(module, nn.Linear):
        return linear_macs(module.weight.shape[1], module.weight.shape[0], out_elements)
    if (
        isinstance(module, _ELEMENTWISE)
        or getattr(module, "counts_no_macs", False)  # e.g. fake quantizers: element-wise, own step sizes
        or not any(True for _ in module.parameters(recurse=False))
    ):
        return 0
    return None


def layer_table(model: nn.Module, example: Tensor) -> list[LayerProfile]:
    """Run ``model(example)`` once (no grad, eval mode, training flag restored after) and return one
    row per leaf-module call, in call order. Eval mode: counting must not move batch-norm statistics."""
    names = {m: n for n, m in model.named_modules()}
    rows: list[LayerProfile] = []
    calls: dict[str, int] = {}

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        name = names[module] or type(module).__name__
        calls[name] = calls.get(name, 0) + 1
        first_call = calls[name] == 1
        macs = layer_macs(module, inputs, output)
        out = _first_tensor(output)
        rows.append(
            LayerProfile(
                name=name if first_call else f"{name}#{calls[name]}",
                type=type(module).__name__,
                output_shape=tuple(out.shape) if out is not None else (),
                params=sum(p.numel() for p in module.parameters(recurse=False)) if first_call else 0,
                macs=macs or 0,
                output_elements=out.numel() if out is not None else 0,
                counted=macs is not None,
            )
        )

    # leaves, and layers that own their weights but hold helpers (a quantized conv's weight quantizer)
    leaves = [m for m in model.modules() if next(m.children(), None) is None or isinstance(m, _WEIGHTED)]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return rows


def total_macs(model: nn.Module, example: Tensor) -> int:
    """MACs of one ``model(example)`` call, summed over the layer table."""
    return sum(r.macs for r in layer_table(model, example))


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None
