"""Post-training corrections on a calibrated model: learned rounding and bias correction."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from slimdet.compress.importance import Calib, eval_mode
from slimdet.compress.quant.graph import Point, QuantConv2d
from slimdet.compress.quant.quantizers import Mode, ScaleType
from slimdet.models.base import Detector

# AdaRound's rectified sigmoid stretch (Nagel et al., ICML 2020, eq. 23)
_ZETA, _GAMMA = 1.1, -0.1


def _layers(model: Detector, points: list[Point], *, max_bits: int) -> list[tuple[str, nn.Module]]:
    out = []
    for p in points:
        if p.kind != "weight":
            continue
        layer = model.get_submodule(p.layer)
        wq = layer.weight_quant
        if wq.mode == Mode.QUANT and wq.scale_type in (ScaleType.UNIFORM, ScaleType.POW2) and wq.bits <= max_bits:
            out.append((p.layer, layer))
    return out


def _layer_out(layer: nn.Module, x: Tensor, w: Tensor) -> Tensor:
    if isinstance(layer, QuantConv2d):
        return layer._conv_forward(x, w, None)
    return F.linear(x, w)


@torch.no_grad()
def _inputs(model: Detector, layer: nn.Module, batches: Calib, max_images: int) -> Tensor:
    """The inputs ``layer`` receives in the (partly quantized) model, for up to ``max_images`` images."""
    got: list[Tensor] = []
    seen = 0

    def hook(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
        got.append(args[0].detach())

    handle = layer.register_forward_pre_hook(hook)
    try:
        with eval_mode(model):
            for images, _ in batches:
                if seen >= max_images:
                    break
                model(images[: max_images - seen])
                seen += min(len(images), max_images - seen)
    finally:
        handle.remove()
    return torch.cat(got)


def adaround(
    model: Detector, points: list[Point], batches: Calib, *, iters: int = 300, max_images: int = 32,
    batch_size: int = 4, reg: float = 0.01, max_bits: int = 7, progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Learned rounding of every uniform or power-of-two weight grid of at most ``max_bits`` bits, layer
    by layer in graph order.

    Each layer's rounding (up or down per weight) is optimised to reproduce the float layer's
    output on the inputs it sees in the already-rounded model, with AdaRound's regulariser pushing
    every soft rounding to 0 or 1 (Nagel et al., ICML 2020). The result is written into the weight
    (it lies on the grid), so the state dict carries it.
    """
    layers = _layers(model, points, max_bits=max_bits)
    errors = {}
    for name, layer in tqdm(layers, desc="adaround", unit="layer", disable=not progress):
        x = _inputs(model, layer, batches, max_images)
        errors[name] = _round_layer(layer, x, iters=iters, batch_size=batch_size, reg=reg)
    return {"layers": len(layers), "output_mse": errors}


def _round_layer(layer: nn.Module, x: Tensor, *, iters: int, batch_size: int, reg: float) -> dict[str, float]:
    wq = layer.weight_quant
    w = layer.weight.detach()
    s = wq.scale.detach().reshape(-1, *([1] * (w.dim() - 1))) if wq.per_channel else wq.scale.detach()
    base = torch.floor(w / s)
    rest = (w / s - base).clamp(1e-4, 1 - 1e-4)
    v = nn.Parameter(-torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1))  # h(v) = rest at the start
    opt = torch.optim.Adam([v], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        target = torch.cat([_layer_out(layer, xb, w) for xb in x.split(16)])

    def soft() -> Tensor:
        return (torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA).clamp(0, 1)

    def quantized(h: Tensor) -> Tensor:
        return s * torch.clamp(base + h, wq.qmin, wq.qmax)

    def mse(wt: Tensor) -> float:
        with torch.no_grad():
            pairs = zip(x.split(16), target.split(16), strict=True)
            total = sum(float(F.mse_loss(_layer_out(layer, xb, wt), tb, reduction="sum")) for xb, tb in pairs)
            return total / target.numel()

    before = mse(_nearest(w, s, wq))
    warmup = int(0.2 * iters)
    for it in range(iters):
        idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=gen)
        out = _layer_out(layer, x[idx], quantized(soft()))
        loss = F.mse_loss(out, target[idx])
        if it >= warmup:  # beta anneals 20 -> 2 after the warm-up (AdaRound, section 5)
            beta = 2 + 18 * (1 - (it - warmup) / max(iters - warmup, 1))
            loss = loss + reg * (1 - (2 * soft() - 1).abs().pow(beta)).sum() / v.numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        hard = quantized((soft() >= 0.5).float())
        after = mse(hard)
        if after <= before:  # never worse than rounding to nearest on these inputs
            layer.weight.copy_(hard)
    return {"nearest": before, "adaround": min(after, before)}


def _nearest(w: Tensor, s: Tensor, wq: Any) -> Tensor:
    return s * torch.clamp(torch.round(w / s), wq.qmin, wq.qmax)


@torch.no_grad()
def bias_correction(model: Detector, points: list[Point], batches: Calib) -> dict[str, Any]:
    """Add to each quantized layer's bias the mean output shift its weight rounding causes.

    Empirical bias correction (Nagel et al., ICCV 2019, "Data-free quantization", section 4.2,
    with calibration data): ``E[W x] - E[Q(W) x]`` per output channel, on the inputs the layer sees
    in the quantized model.
    """
    targets = [(p.layer, model.get_submodule(p.layer)) for p in points if p.kind == "weight"]
    targets = [(n, m) for n, m in targets if m.bias is not None and m.weight_quant.mode == Mode.QUANT]
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for name, layer in targets:

        def hook(m: nn.Module, args: tuple[Tensor, ...], name: str = name) -> None:
            x = args[0]
            delta = _layer_out(m, x, m.weight - m.weight_quant(m.weight))
            channel = 1 if isinstance(m, QuantConv2d) else delta.dim() - 1
            sums[name] = sums.get(name, 0) + delta.sum(dim=[d for d in range(delta.dim()) if d != channel])
            counts[name] = counts.get(name, 0) + delta.numel() // delta.shape[channel]

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        with eval_mode(model):
            for images, _ in batches:
                model(images)
    finally:
        for h in handles:
            h.remove()
    shifts = {}
    for name, layer in targets:
        if name in sums:
            shift = sums[name] / counts[name]
            layer.bias.add_(shift)
            shifts[name] = float(shift.abs().mean())
    return {"layers": len(shifts), "mean_abs_shift": shifts}

