"""Fake quantizers: what a tensor looks like after an integer (or binary, or k-level) round trip.

One :class:`Quantizer` module per quantized tensor. In eval mode a uniform quantizer runs PyTorch's
``fake_quantize_per_{tensor,channel}_affine``, the op the ONNX exporter writes as a
QuantizeLinear/DequantizeLinear pair, so the simulated model and the exported QDQ graph compute the
same numbers. In training mode it runs the LSQ estimator (Esser et al., ICLR 2020, "Learned step
size quantization"): straight-through rounding, and a step-size gradient scaled by
``1 / sqrt(numel * qmax)``.

ONNX allows 8-bit Q/DQ only, so narrower grids are expressed inside the 8-bit one: weights are
rounded to their grid before the 8-bit Q/DQ (exact), activations are clipped to the narrow range
first (a Clip node before the Q/DQ pair).
"""

from __future__ import annotations

import math
from enum import StrEnum

import torch
from torch import Tensor, nn


class ScaleType(StrEnum):
    UNIFORM = "uniform"  # any real step size
    POW2 = "pow2"  # step sizes 2^k: requantization is a shift (shift-only hardware)
    LEVELS = "levels"  # non-uniform: 2^bits levels learned by k-means (weights only)
    BINARY = "binary"  # 1 bit, sign(w) times the channel's mean |w| (XNOR-Net, Rastegari et al. 2016)


class Mode(StrEnum):
    OFF = "off"  # pass the float tensor through
    OBSERVE = "observe"  # pass through and record statistics
    QUANT = "quant"  # fake-quantize


def qrange(bits: int, signed: bool, *, narrow: bool = False) -> tuple[int, int]:
    """Integer range of a ``bits``-bit grid; ``narrow`` drops the most negative code (symmetric weights)."""
    if signed:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def round_ste(x: Tensor) -> Tensor:
    """Round in the forward pass, identity gradient (straight-through estimator)."""
    return (x.round() - x).detach() + x


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """Identity in the forward pass, gradient multiplied by ``scale`` (LSQ)."""
    return (x - x * scale).detach() + x * scale


class Quantizer(nn.Module):
    """A uniform fake quantizer with per-tensor or per-channel step sizes.

    Args:
        bits: 2..8 for integer grids, 1 with ``scale_type="binary"``, 16 for an fp16 round trip.
        signed: integer codes are signed (weights, symmetric activations) or unsigned.
        symmetric: zero point 0; otherwise a per-tensor zero point from the calibrated range.
        channels: number of channels for per-channel scales (axis 0); None for per-tensor.
        scale_type: uniform, pow2, levels or binary.
    """

    counts_no_macs = True  # for slimdet.profiling.macs: element-wise

    def __init__(
        self,
        bits: int,
        *,
        signed: bool,
        symmetric: bool,
        channels: int | None = None,
        scale_type: ScaleType = ScaleType.UNIFORM,
        narrow: bool = False,
    ) -> None:
        super().__init__()
        self.bits = int(bits)
        self.signed = signed
        self.symmetric = symmetric
        self.scale_type = ScaleType(scale_type)
        self.channels = channels
        self.narrow = narrow
        self.qmin, self.qmax = qrange(min(self.bits, 8), signed, narrow=narrow) if self.bits > 1 else (-1, 1)
        shape = (channels,) if channels else ()
        # Step sizes are parameters so that QAT (LSQ) can learn them; PTQ leaves them frozen.
        self.scale = nn.Parameter(torch.ones(shape), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        if self.scale_type == ScaleType.LEVELS:
            self.register_buffer("levels", torch.zeros(2**self.bits))
        self.mode = Mode.QUANT
        self.observer = None  # a RangeObserver while calibrating
        self.label = ""  # readable name of the tensor, for records and errors
        self.kind = "act"  # "act", "weight" or "shared"
        #: a shared quantizer (after slicing, max-pool, ...) uses the grid and mode of this one
        object.__setattr__(self, "source", None)
        self.frozen = False  # export: grids as constants, so the exported graph holds plain Q/DQ

    @property
    def fp16(self) -> bool:
        return self.bits >= 16

    @property
    def per_channel(self) -> bool:
        return self.channels is not None

    def extra_repr(self) -> str:
        kind = "fp16" if self.fp16 else f"{self.bits}b {self.scale_type.value}"
        gran = f"per-channel({self.channels})" if self.per_channel else "per-tensor"
        return f"{self.label or '?'}: {kind}, {'signed' if self.signed else 'unsigned'}, {gran}, mode={self.mode}"

    def grid_range(self) -> tuple[float, float]:
        """The real values of the lowest and highest codes of a per-tensor grid."""
        return float((self.qmin - self.zero_point) * self.scale), float((self.qmax - self.zero_point) * self.scale)

    # ----- setting the grid -------------------------------------------------------------------
    @torch.no_grad()
    def set_range(self, lo: Tensor | float, hi: Tensor | float) -> None:
        """Set step size and zero point so that [lo, hi] (per channel or scalar) is covered."""
        lo = torch.as_tensor(lo, dtype=torch.float32).reshape(self.scale.shape)
        hi = torch.as_tensor(hi, dtype=torch.float32).reshape(self.scale.shape)
        lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
        if self.symmetric:
            scale = torch.maximum(-lo, hi) / self.qmax
            zero = torch.zeros_like(scale, dtype=torch.int32)
        else:
            scale = ((hi - lo) / (self.qmax - self.qmin)).clamp_min(1e-8)
            zero = (self.qmin - lo / scale).round().clamp(self.qmin, self.qmax).to(torch.int32)
        scale = torch.where(scale > 0, scale, torch.full_like(scale, 1e-8))
        if self.scale_type == ScaleType.POW2:
            scale = torch.exp2(torch.ceil(torch.log2(scale)))
        self.scale.copy_(scale)
        self.zero_point.copy_(zero)

    @torch.no_grad()
    def fit_weight(self, w: Tensor, method: str = "minmax", grid: int = 40) -> None:
        """Choose the grid of a weight tensor (axis 0 = output channels).

        ``mse`` searches per channel the clipping ratio in (0.3, 1] that minimises the squared
        rounding-plus-clipping error; ``minmax`` uses the full range. Binary and k-level grids are
        fitted directly.
        """
        flat = w.detach().reshape(w.shape[0], -1) if self.per_channel else w.detach().reshape(1, -1)
        if self.scale_type == ScaleType.BINARY:
            self.scale.copy_(flat.abs().mean(dim=1).clamp_min(1e-8).reshape(self.scale.shape))
            return
        if self.scale_type == ScaleType.LEVELS:
            self.levels.copy_(kmeans_levels(w.detach().flatten(), 2**self.bits))
            return
        lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
        if method == "minmax" or self.fp16:
            self.set_range(lo, hi)
            return
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for ratio in torch.linspace(0.3, 1.0, grid):
            self.set_range(lo * ratio, hi * ratio)
            err = (self._fake(flat, per_row=True) - flat).pow(2).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, lo * ratio, best_lo), torch.where(better, hi * ratio, best_hi)
        self.set_range(best_lo, best_hi)

    # ----- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.source is not None:  # values already on the source's grid: keep them there
            return self.source(x) if self.source.mode == Mode.QUANT else x
        if self.mode == Mode.OFF:
            return x
        if self.mode == Mode.OBSERVE:
            if self.observer is not None:
                self.observer.update(x.detach())
            return x
        if self.fp16:
            return x.half().float() if x.dtype == torch.float32 else x
        if self.scale_type == ScaleType.LEVELS:
            return levels_ste(x, self.levels)
        if self.scale_type == ScaleType.BINARY:
            return binary_ste(x, self.scale, self.training)
        if self.training and self.scale.requires_grad:
            return self._lsq(x)
        return self._fake(x)

    def _shape(self, x: Tensor, t: Tensor, per_row: bool = False) -> Tensor:
        if not self.per_channel and not per_row:
            return t
        return t.reshape(-1, *([1] * (x.dim() - 1)))

    def _fake(self, x: Tensor, per_row: bool = False) -> Tensor:
        """Fake-quantize with the ops the ONNX exporter turns into Q/DQ (8-bit codes only)."""
        rows = self.per_channel or per_row
        qmin, qmax = (-128, 127) if self.signed else (0, 255)
        if self.frozen and not rows:  # python numbers: the exporter writes scalar constants
            scale, zero = float(self.scale.detach()), int(self.zero_point)
            if self.bits < 8 or self.narrow:
                x = torch.clamp(x, (self.qmin - zero) * scale, (self.qmax - zero) * scale)
            return torch.fake_quantize_per_tensor_affine(x, scale, zero, qmin, qmax)
        scale = self.scale.detach().reshape(-1) if rows else self.scale.detach().reshape(1)
        zero = self.zero_point.reshape(-1) if rows else self.zero_point.reshape(1)
        if self.frozen:
            scale, zero = scale.clone(), zero.clone()
        if (self.bits < 8 or self.narrow) and not self.frozen:  # narrow grid inside the 8-bit one: clip first
            lo = (self.qmin - zero).float() * scale
            hi = (self.qmax - zero).float() * scale
            if rows:
                lo, hi = self._shape(x, lo, True), self._shape(x, hi, True)
            x = torch.clamp(x, lo, hi)
        if rows:
            return torch.fake_quantize_per_channel_affine(x, scale, zero, 0, qmin, qmax)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, qmin, qmax)

    def _lsq(self, x: Tensor) -> Tensor:
        numel = x[0].numel() if self.per_channel else x.numel()
        s = grad_scale(self.scale, 1.0 / math.sqrt(max(numel, 1) * max(self.qmax, 1)))
        s, z = self._shape(x, s), self._shape(x, self.zero_point.float())
        q = round_ste(torch.clamp(x / s + z, self.qmin, self.qmax))  # LSQ: clip, then round
        return (q - z) * s

    # ----- integer view -----------------------------------------------------------------------
    @torch.no_grad()
    def integers(self, x: Tensor) -> Tensor:
        """The integer codes of ``x`` on this grid (uniform and binary grids)."""
        if self.scale_type == ScaleType.BINARY:
            return torch.where(x >= 0, 1, -1).to(torch.int32)
        s, z = self._shape(x, self.scale), self._shape(x, self.zero_point)
        return torch.clamp(torch.round(x / s) + z, self.qmin, self.qmax).to(torch.int32)


class _LevelsSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, levels: Tensor) -> Tensor:  # noqa: ANN001
        idx = (x.unsqueeze(-1) - levels).abs().argmin(dim=-1)
        return levels[idx]

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        return grad, None


def levels_ste(x: Tensor, levels: Tensor) -> Tensor:
    """Snap to the nearest of ``levels``; straight-through gradient."""
    if x.numel() * levels.numel() > 2**26:  # bound the N x L distance matrix
        return torch.cat([levels_ste(c, levels) for c in x.chunk(8)])
    return _LevelsSTE.apply(x, levels)


def binary_ste(w: Tensor, alpha: Tensor, training: bool) -> Tensor:
    """``alpha_c * sign(w)`` per output channel; straight-through gradient clipped to |w| <= 1."""
    a = alpha.reshape(-1, *([1] * (w.dim() - 1))) if alpha.dim() else alpha
    b = torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))
    if not training:
        return a * b
    ste = (b - w.clamp(-1, 1)).detach() + w.clamp(-1, 1)
    return a * ste


@torch.no_grad()
def kmeans_levels(values: Tensor, k: int, iters: int = 25) -> Tensor:
    """k levels minimising the squared error of snapping ``values`` to them (Lloyd's algorithm,
    initialised at quantiles; deep compression's weight sharing, Han et al., ICLR 2016)."""
    v = values.float()
    if v.numel() > 200_000:
        v = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))[:200_000]]
    centers = torch.quantile(v, torch.linspace(0, 1, k)).clone()
    for _ in range(iters):
        idx = (v.unsqueeze(1) - centers).abs().argmin(dim=1)
        sums = torch.zeros(k).index_add_(0, idx, v)
        counts = torch.zeros(k).index_add_(0, idx, torch.ones_like(v))
        centers = torch.where(counts > 0, sums / counts.clamp_min(1), centers)
    return centers.sort().values
