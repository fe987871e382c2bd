"""The factorisations behind :mod:`slimdet.compress.lowrank`, one class per method.

Each replaces one Conv2d or Linear layer by a :class:`LowRank` chain of smaller plain layers, and
prices every rank choice (MACs and weight error) from one decomposition of the weight, so the rank
selection never rebuilds a layer to try it. W is the weight ``C_out x C_in x k_h x k_w`` (a Linear's is
``C_out x C_in``), K = k_h k_w.

* ``svd``: W as a ``C_out x C_in K`` matrix ~ U_r S_r V_r^T (Eckart-Young: the best rank-r
  approximation in the Frobenius norm) -> layer with the original kernel ``C_in -> r``, then 1x1
  ``r -> C_out``. On a kxk conv this is the channel decomposition of Zhang et al. (TPAMI 2016).
* ``tucker2``: W ~ G x_1 U_out x_2 U_in (Tucker-2, Kim et al., ICLR 2016) -> 1x1 ``C_in -> R1``,
  kxk ``R1 -> R2`` (the core G), 1x1 ``R2 -> C_out``; HOSVD init (De Lathauwer et al., SIMAX 2000),
  then HOOI iterations, each of which can only lower the error.
* ``dw_separable``: per input channel i, W[:, i] as a ``C_out x K`` matrix = U_i S_i V_i^T; keeping m
  terms gives a depthwise kxk conv with depth multiplier m (kernels sqrt(s) v) and a pointwise 1x1
  conv (weights sqrt(s) u); exact at m = min(C_out, K).

The weight error reported everywhere is relative: ||W - W_hat||_F / ||W||_F; its square is the
fraction of the energy (squared singular values) discarded, which is what the tables hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from slimdet.registry import Registry

__all__ = ["FACTORIZERS", "Factorizer", "Geometry", "LowRank", "dense_macs", "kernel_size"]


class LowRank(nn.Sequential):
    """A Conv2d or Linear replaced by a chain of smaller plain layers; ``method`` and ``ranks`` say how."""

    def __init__(self, method: str, ranks: tuple[int, ...], *layers: nn.Module) -> None:
        super().__init__(*layers)
        self.method = method
        self.ranks = tuple(int(r) for r in ranks)

    # Read by code that inspects the layer this chain replaced (e.g. the C2f block's split point).
    @property
    def in_channels(self) -> int:
        return self[0].in_channels

    @property
    def out_channels(self) -> int:
        return self[-1].out_channels

    @property
    def in_features(self) -> int:
        return self[0].in_features

    @property
    def out_features(self) -> int:
        return self[-1].out_features

    def extra_repr(self) -> str:
        return f"method={self.method!r}, ranks={self.ranks}"

    @torch.no_grad()
    def dense_weight(self) -> Tensor:
        """The weight of the single layer this chain computes (the bias is the last layer's)."""
        ws = [layer.weight.detach() for layer in self]
        if self.method == "svd":
            first, last = ws
            if first.dim() == 2:
                return last @ first
            return torch.einsum("or,rihw->oihw", last.flatten(1), first)
        if self.method == "tucker2":
            first, core, last = ws
            return torch.einsum("os,srhw,ri->oihw", last.flatten(1), core, first.flatten(1))
        if self.method == "dw_separable":
            depthwise, pointwise = ws
            c_in = self[0].in_channels
            m = depthwise.shape[0] // c_in
            d = depthwise.reshape(c_in, m, *depthwise.shape[2:])
            p = pointwise.flatten(1).reshape(pointwise.shape[0], c_in, m)
            return torch.einsum("oim,imhw->oihw", p, d)
        raise ValueError(f"unknown low-rank method {self.method!r}")


@dataclass(frozen=True)
class Geometry:
    """Where a layer runs in a batch-1 forward: input and output pixels, summed over its calls
    (a Linear's rows count as pixels)."""

    in_pixels: int
    out_pixels: int


def kernel_size(layer: nn.Module) -> tuple[int, int]:
    return tuple(layer.kernel_size) if isinstance(layer, nn.Conv2d) else (1, 1)  # type: ignore[return-value]


def dense_macs(layer: nn.Module, geo: Geometry) -> int:
    """MACs of the undecomposed layer: every output pixel takes C_out C_in K (groups = 1), as
    slimdet.profiling.macs counts them."""
    c_out, c_in = layer.weight.shape[:2]
    return geo.out_pixels * c_out * c_in * math.prod(kernel_size(layer))


def _weight64(layer: nn.Module) -> Tensor:
    return layer.weight.detach().to("cpu", torch.float64)


def _energy_rank(cum: np.ndarray, energy: float) -> int:
    """Smallest r whose first r terms keep ``energy`` of the total (cum: cumulative kept energy)."""
    total = cum[-1]
    if total <= 0:
        return 1
    return int(min(len(cum), np.searchsorted(cum / total, energy - 1e-12) + 1))


def _round_up(rank: int, round_to: int, full: int) -> int:
    return min(full, -(-rank // round_to) * round_to)


def _grid(full: int, round_to: int) -> np.ndarray:
    return np.unique(np.r_[np.arange(round_to, full + 1, round_to), full]).astype(np.int64)


def _leading(a: Tensor, r: int) -> Tensor:
    """The ``r`` leading left singular vectors of ``a``; completed to an orthonormal set when ``a`` has fewer."""
    u = torch.linalg.svd(a, full_matrices=r > min(a.shape))[0]
    return u[:, :r]


def _conv_like(layer: nn.Conv2d, c_in: int, c_out: int, *, bias: bool, groups: int = 1) -> nn.Conv2d:
    """A conv with ``layer``'s kernel, stride, padding and dilation and new channel counts."""
    return nn.Conv2d(c_in, c_out, layer.kernel_size, layer.stride, layer.padding, layer.dilation,  # type: ignore[arg-type]
                     groups, bias=bias, padding_mode=layer.padding_mode, device=layer.weight.device,
                     dtype=layer.weight.dtype)  # fmt: skip


def _pointwise(layer: nn.Module, c_in: int, c_out: int, *, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, bias=bias, device=layer.weight.device, dtype=layer.weight.dtype)


def _assign(chain: LowRank, weights: list[Tensor], layer: nn.Module) -> LowRank:
    with torch.no_grad():
        for module, w in zip(chain, weights, strict=True):
            module.weight.copy_(w.reshape(module.weight.shape))
        if layer.bias is not None:
            chain[-1].bias.copy_(layer.bias.detach())
    return chain


class Factorizer:
    """One method's decomposition of one layer's weight, and its price table.

    Ranks are tuples in the order the chain meets them (tucker2: ``(R1, R2)``, input side first).
    """

    name: ClassVar[str]

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    @staticmethod
    def unsupported(layer: nn.Module) -> str | None:
        """Why this method cannot decompose ``layer``, or None."""
        return None

    @property
    def max_ranks(self) -> tuple[int, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def candidates(self, round_to: int) -> np.ndarray:
        """Rank choices to price, ``n x len(max_ranks)``."""
        grids = [_grid(full, round_to) for full in self.max_ranks]
        return np.stack([g.ravel() for g in np.meshgrid(*grids, indexing="ij")], axis=1)

    def err2(self, ranks: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """Squared relative weight error of each row of ``ranks`` (before HOOI refinement)."""
        raise NotImplementedError

    def macs(self, ranks: np.ndarray, geo: Geometry) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def energy_ranks(self, energy: float, round_to: int) -> tuple[int, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def skeleton(cls, layer: nn.Module, ranks: tuple[int, ...]) -> LowRank:  # pragma: no cover - abstract
        """The chain's layers with the right shapes, weights not set (what load_model rebuilds)."""
        raise NotImplementedError

    def factors(self, ranks: tuple[int, ...], hooi_iters: int) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def build(self, ranks: tuple[int, ...], *, hooi_iters: int = 0) -> LowRank:
        """The chain for ``ranks``, initialised from the layer's weights."""
        return _assign(self.skeleton(self.layer, ranks), self.factors(ranks, hooi_iters), self.layer)


FACTORIZERS: Registry[type[Factorizer]] = Registry("low-rank method")


@FACTORIZERS.register("svd")
class Svd(Factorizer):
    name = "svd"

    def __init__(self, layer: nn.Module) -> None:
        super().__init__(layer)
        w = _weight64(layer)
        self.c_out, self.c_in = w.shape[:2]
        self.k = math.prod(kernel_size(layer))
        self.u, self.s, self.vh = torch.linalg.svd(w.reshape(self.c_out, -1), full_matrices=False)
        self.cum = (self.s**2).cumsum(0).numpy()

    @property
    def max_ranks(self) -> tuple[int, ...]:
        return (len(self.s),)

    def err2(self, ranks: np.ndarray) -> np.ndarray:
        return np.clip(1.0 - self.cum[ranks[:, 0] - 1] / max(self.cum[-1], 1e-300), 0.0, 1.0)

    def macs(self, ranks: np.ndarray, geo: Geometry) -> np.ndarray:
        # first layer: C_in K MACs per rank per output pixel; second: C_out per rank
        return geo.out_pixels * ranks[:, 0] * (self.c_in * self.k + self.c_out)

    def energy_ranks(self, energy: float, round_to: int) -> tuple[int, ...]:
        return (_round_up(_energy_rank(self.cum, energy), round_to, self.max_ranks[0]),)

    @classmethod
    def skeleton(cls, layer: nn.Module, ranks: tuple[int, ...]) -> LowRank:
        (r,) = ranks
        c_out, c_in = layer.weight.shape[:2]
        bias = layer.bias is not None
        if isinstance(layer, nn.Linear):
            kw = {"device": layer.weight.device, "dtype": layer.weight.dtype}
            return LowRank(cls.name, ranks, nn.Linear(c_in, r, bias=False, **kw), nn.Linear(r, c_out, bias=bias, **kw))
        return LowRank(cls.name, ranks, _conv_like(layer, c_in, r, bias=False), _pointwise(layer, r, c_out, bias=bias))

    def factors(self, ranks: tuple[int, ...], hooi_iters: int) -> list[Tensor]:
        (r,) = ranks
        root = self.s[:r].sqrt()  # split S evenly between the two layers
        return [root[:, None] * self.vh[:r], self.u[:, :r] * root]


@FACTORIZERS.register("tucker2")
class Tucker2(Factorizer):
    name = "tucker2"

    def __init__(self, layer: nn.Module) -> None:
        super().__init__(layer)
        w = self.w = _weight64(layer)
        self.c_out, self.c_in, kh, kw = w.shape
        self.k = kh * kw
        self.u_out, s_out, _ = torch.linalg.svd(w.reshape(self.c_out, -1), full_matrices=False)
        self.u_in, s_in, _ = torch.linalg.svd(w.transpose(0, 1).reshape(self.c_in, -1), full_matrices=False)
        self.cum_out, self.cum_in = (s_out**2).cumsum(0).numpy(), (s_in**2).cumsum(0).numpy()
        # HOSVD: the core in the full mode bases holds all of W; truncating the bases to (R1, R2) keeps
        # the leading block of the core, whose energy a 2-D cumulative sum gives for every pair
        full_core = torch.einsum("oihw,oa,ib->abhw", w, self.u_out, self.u_in)
        self.kept = full_core.pow(2).sum((2, 3)).cumsum(0).cumsum(1).numpy()  # [R2 - 1, R1 - 1]
        self.total = float(w.pow(2).sum())

    @staticmethod
    def unsupported(layer: nn.Module) -> str | None:
        if not isinstance(layer, nn.Conv2d) or kernel_size(layer) == (1, 1):
            return "tucker2 decomposes kxk convs; 1x1 convs and Linear layers take svd (method auto does)"
        return None

    @property
    def max_ranks(self) -> tuple[int, ...]:
        return (self.u_in.shape[1], self.u_out.shape[1])

    def err2(self, ranks: np.ndarray) -> np.ndarray:
        kept = self.kept[ranks[:, 1] - 1, ranks[:, 0] - 1]
        return np.clip(1.0 - kept / max(self.total, 1e-300), 0.0, 1.0)

    def macs(self, ranks: np.ndarray, geo: Geometry) -> np.ndarray:
        r1, r2 = ranks[:, 0], ranks[:, 1]
        # the first 1x1 runs on the input pixels (before the kxk core's stride), the rest on the output's
        return geo.in_pixels * self.c_in * r1 + geo.out_pixels * r2 * (r1 * self.k + self.c_out)

    def energy_ranks(self, energy: float, round_to: int) -> tuple[int, ...]:
        r1 = _round_up(_energy_rank(self.cum_in, energy), round_to, self.max_ranks[0])
        r2 = _round_up(_energy_rank(self.cum_out, energy), round_to, self.max_ranks[1])
        return (r1, r2)

    @classmethod
    def skeleton(cls, layer: nn.Module, ranks: tuple[int, ...]) -> LowRank:
        r1, r2 = ranks
        c_out, c_in = layer.weight.shape[:2]
        return LowRank(cls.name, ranks, _pointwise(layer, c_in, r1, bias=False), _conv_like(layer, r1, r2, bias=False),
                       _pointwise(layer, r2, c_out, bias=layer.bias is not None))  # fmt: skip

    def factors(self, ranks: tuple[int, ...], hooi_iters: int) -> list[Tensor]:
        r1, r2 = ranks
        w, u_in, u_out = self.w, self.u_in[:, :r1], self.u_out[:, :r2]
        for _ in range(hooi_iters):  # HOOI: each mode's basis is refit with the other held fixed
            u_in = _leading(torch.einsum("oihw,oa->iahw", w, u_out).reshape(self.c_in, -1), r1)
            u_out = _leading(torch.einsum("oihw,ib->obhw", w, u_in).reshape(self.c_out, -1), r2)
        core = torch.einsum("oihw,oa,ib->abhw", w, u_out, u_in)
        return [u_in.T, core, u_out]


@FACTORIZERS.register("dw_separable")
class DwSeparable(Factorizer):
    name = "dw_separable"

    def __init__(self, layer: nn.Module) -> None:
        super().__init__(layer)
        w = _weight64(layer)
        self.c_out, self.c_in, kh, kw = w.shape
        self.k = kh * kw
        per_input = w.permute(1, 0, 2, 3).reshape(self.c_in, self.c_out, self.k)
        self.u, self.s, self.vh = torch.linalg.svd(per_input, full_matrices=False)  # batched over input channels
        energy = (self.s**2).sum(0)  # the j-th terms of all input channels together
        self.cum = np.pad(energy.cumsum(0).numpy(), (0, self.k - energy.numel()), mode="edge")
        self.total = float(w.pow(2).sum())

    @staticmethod
    def unsupported(layer: nn.Module) -> str | None:
        if not isinstance(layer, nn.Conv2d) or kernel_size(layer) == (1, 1):
            return "dw_separable replaces kxk convs; 1x1 convs and Linear layers take svd (method auto does)"
        return None

    @property
    def max_ranks(self) -> tuple[int, ...]:
        return (self.k,)  # the depth multiplier; exact from min(C_out, K) on

    def candidates(self, round_to: int) -> np.ndarray:
        return np.arange(1, self.k + 1, dtype=np.int64)[:, None]  # multipliers are small: no rounding

    def err2(self, ranks: np.ndarray) -> np.ndarray:
        return np.clip(1.0 - self.cum[ranks[:, 0] - 1] / max(self.total, 1e-300), 0.0, 1.0)

    def macs(self, ranks: np.ndarray, geo: Geometry) -> np.ndarray:
        # depthwise: K MACs per output pixel and channel (C_in m); pointwise: C_in m C_out per output pixel
        return geo.out_pixels * self.c_in * ranks[:, 0] * (self.k + self.c_out)

    def energy_ranks(self, energy: float, round_to: int) -> tuple[int, ...]:
        return (_energy_rank(self.cum, energy),)

    @classmethod
    def skeleton(cls, layer: nn.Module, ranks: tuple[int, ...]) -> LowRank:
        (m,) = ranks
        c_out, c_in = layer.weight.shape[:2]
        return LowRank(cls.name, ranks, _conv_like(layer, c_in, c_in * m, bias=False, groups=c_in),
                       _pointwise(layer, c_in * m, c_out, bias=layer.bias is not None))  # fmt: skip

    def factors(self, ranks: tuple[int, ...], hooi_iters: int) -> list[Tensor]:
        (m,) = ranks
        q = self.s.shape[1]
        s = torch.nn.functional.pad(self.s, (0, max(0, m - q)))[:, :m].sqrt()  # beyond q the terms are zero
        u = torch.nn.functional.pad(self.u, (0, max(0, m - q)))[:, :, :m]  # C_in x C_out x m
        vh = torch.nn.functional.pad(self.vh, (0, 0, 0, max(0, m - q)))[:, :m]  # C_in x m x K
        depthwise = s[:, :, None] * vh  # channel i m + j of the depthwise conv reads input channel i
        pointwise = (u * s[:, None, :]).permute(1, 0, 2)  # C_out x C_in x m
        return [depthwise, pointwise]
