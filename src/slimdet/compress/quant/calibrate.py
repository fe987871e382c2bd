"""Activation range calibration: observe tensors over calibration batches, then pick a clipping range.

A ``RangeObserver`` keeps the running min/max of everything it saw and a fixed-size histogram
over [min, max] (re-binned when the range grows, so no data is kept). ``calibrate`` turns it
into a clipping range ``(lo, hi)`` with ``lo <= 0 <= hi`` by a registered method:

- ``minmax``: the observed range.
- ``percentile``: a percentile of |x| (symmetric) or of both tails (asymmetric).
- ``mse``: the range minimising the expected squared error of the uniform quantizer, rounding
  and clipping included, under a piecewise-uniform density (one per histogram bin).
- ``entropy``: the range minimising KL(P||Q) between the clipped reference histogram and its
  quantized version (Migacz, "8-bit Inference with TensorRT", GTC 2017).

The quantizer modelled by ``mse`` and ``entropy``: asymmetric ranges get ``2**bits`` levels from
lo to hi with zero nudged onto the grid (uint8-style zero point); symmetric ranges get the
restricted signed grid ``k * hi / (2**(bits-1) - 1)``, ``|k| <= 2**(bits-1) - 1`` (zero point 0).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import numpy as np
import torch

from slimdet.errors import ConfigError
from slimdet.registry import Registry, closest

Calibrator = Callable[..., tuple[float, float]]
CALIBRATORS: Registry[Calibrator] = Registry("calibrator")

# Narrowest range returned: an all-zero tensor still gets a non-empty range (scale > 0).
MIN_WIDTH = float(np.finfo(np.float32).eps)
_COARSE = (48, 24)  # coarse-stage candidates per free side: one free side, two free sides
_KL_FLOOR = 1e-4  # probability given to empty bins of the quantized histogram


class RangeObserver:
    """Running min/max and histogram of every value passed to ``update``."""

    def __init__(self, *, bins: int = 2048) -> None:
        if bins < 8:
            raise ConfigError(f"RangeObserver bins must be >= 8, got {bins}")
        self.bins = bins
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self._counts = np.zeros(bins, dtype=np.float64)

    def update(self, x: torch.Tensor) -> None:
        """Add the values of ``x`` (any shape, any device)."""
        x = x.detach().flatten().float()
        if x.numel() == 0:
            return
        if not bool(torch.isfinite(x).all()):
            raise ConfigError(f"RangeObserver got non-finite values (tensor of shape {tuple(x.shape)})")
        lo, hi = (float(v) for v in torch.aminmax(x))
        if self.count == 0:
            self.min, self.max = lo, hi
        elif lo < self.min or hi > self.max:
            self._rebin(min(lo, self.min), max(hi, self.max))
        if self.max > self.min:
            counts = torch.histc(x, bins=self.bins, min=self.min, max=self.max)
            self._counts += counts.cpu().double().numpy()
        else:  # constant so far: a point mass in bin 0
            self._counts[0] += x.numel()
        self.count += x.numel()

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """Counts per bin (floats: re-binning splits counts) and the ``bins + 1`` edges."""
        if self.count == 0:
            raise ConfigError("RangeObserver saw no data: run calibration batches through the model first")
        return self._counts.copy(), np.linspace(self.min, self.max, self.bins + 1)

    def _rebin(self, lo: float, hi: float) -> None:
        """Spread the counts over new edges spanning [lo, hi], assuming a uniform density per bin."""
        edges = np.linspace(lo, hi, self.bins + 1)
        if self.max > self.min:
            cum = np.concatenate([[0.0], np.cumsum(self._counts)])
            new = np.diff(np.interp(edges, np.linspace(self.min, self.max, self.bins + 1), cum))
        else:
            new = np.zeros(self.bins)
            new[min(int((self.min - lo) / (hi - lo) * self.bins), self.bins - 1)] = self._counts.sum()
        self._counts = new
        self.min, self.max = lo, hi


def calibrate(
    observer: RangeObserver, method: str, *, bits: int, symmetric: bool, **options: float
) -> tuple[float, float]:
    """The clipping range ``(lo, hi)`` chosen by ``method``; ``lo <= 0 <= hi`` and ``lo < hi``.

    Args:
        observer: statistics of the tensor over the calibration batches.
        method: a name in ``CALIBRATORS`` (minmax, percentile, mse, entropy).
        bits: bit-width of the quantizer the range is for (2..16).
        symmetric: return ``lo == -hi`` (signed, zero point 0).
        **options: method options, e.g. ``percentile=99.99``.
    """
    fn = CALIBRATORS.get(method)
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ConfigError(f"calibrate: bits must be an integer in 2..16, got {bits!r}")
    known = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
    known = [k for k in known if k not in ("bits", "symmetric")]
    for key in options:
        if key not in known:
            hint = closest(key, known)
            raise ConfigError(
                f"calibrator {method!r} has no option {key!r}; known: {', '.join(known) or 'none'}"
                + (f" (did you mean {hint!r}?)" if hint else "")
            )
    if observer.count == 0:
        raise ConfigError(f"calibrate({method!r}): the observer saw no data; run calibration batches first")
    if observer.max > observer.min:
        lo, hi = fn(observer, bits=bits, symmetric=symmetric, **options)
    else:  # a constant tensor: its value is exactly representable at an end of the range
        lo, hi = observer.min, observer.max
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        hi = max(-lo, hi, MIN_WIDTH)
        return -hi, hi
    if hi - lo < MIN_WIDTH:
        hi = lo + MIN_WIDTH
    return lo, hi


# --- histogram helpers -------------------------------------------------------------------------


def _cdf(counts: np.ndarray, edges: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Counts below ``t`` under a uniform density within each bin."""
    return np.interp(t, edges, np.concatenate([[0.0], np.cumsum(counts)]))


def _search_hist(observer: RangeObserver, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """The histogram to search over: of |x| on [0, max|x|] if symmetric, else on a range holding 0."""
    counts, edges = observer.histogram()
    if symmetric:
        new = np.linspace(0.0, max(-observer.min, observer.max), observer.bins + 1)
        return np.diff(_cdf(counts, edges, new) - _cdf(counts, edges, -new)), new
    lo, hi = min(observer.min, 0.0), max(observer.max, 0.0)
    if (lo, hi) == (observer.min, observer.max):
        return counts, edges
    new = np.linspace(lo, hi, observer.bins + 1)
    return np.diff(_cdf(counts, edges, new)), new


def _quantile(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    """The value below which a fraction ``q`` of the counts lies."""
    cum = np.concatenate([[0.0], np.cumsum(counts)])
    target = q * cum[-1]
    i = int(np.clip(np.searchsorted(cum, target, side="left"), 1, len(counts)))
    width = cum[i] - cum[i - 1]
    frac = 0.0 if width <= 0 else (target - cum[i - 1]) / width
    return float(edges[i - 1] + frac * (edges[i] - edges[i - 1]))


def _best_window(
    edges: np.ndarray, score: Callable[[np.ndarray, np.ndarray], np.ndarray], *, exhaustive: bool
) -> tuple[int, int] | None:
    """Edge indices ``(i, j)``, ``edges[i] <= 0 <= edges[j]``, ``i < j``, minimising ``score(i_array, j_array)``.

    ``exhaustive`` tries every window when zero is at an end of the histogram (one free side);
    otherwise the search is coarse-to-fine: ``_COARSE`` candidates per side, then strides halving
    around the best (local, so a cost with far-apart minima may end in the worse one). None when
    no window has a finite score.
    """
    n = len(edges) - 1
    i_max = max(int(np.searchsorted(edges, 0.0, side="right")) - 1, 0)  # last edge <= 0
    j_min = min(int(np.searchsorted(edges, 0.0, side="left")), n)  # first edge >= 0

    def best(ii: np.ndarray, jj: np.ndarray) -> tuple[int, int] | None:
        ii, jj = (a.ravel() for a in np.meshgrid(np.unique(ii), np.unique(jj), indexing="ij"))
        keep = jj > ii
        ii, jj = ii[keep], jj[keep]
        scores = np.nan_to_num(score(ii, jj), nan=np.inf) if len(ii) else np.array([np.inf])
        k = int(np.argmin(scores))
        return (int(ii[k]), int(jj[k])) if np.isfinite(scores[k]) else None

    if exhaustive and (i_max == 0 or j_min == n):
        return best(np.arange(0, i_max + 1), np.arange(j_min, n + 1))
    stride = max(1, max(i_max, n - j_min) // _COARSE[int(i_max > 0 and j_min < n)])
    found = best(np.r_[np.arange(0, i_max + 1, stride), i_max], np.r_[np.arange(j_min, n + 1, stride), n])
    while found is not None and stride > 1:
        stride = max(1, stride // 2)
        steps = np.arange(-4, 5) * stride
        found = best(np.clip(found[0] + steps, 0, i_max), np.clip(found[1] + steps, j_min, n)) or found
    return found


# --- calibrators ----------------------------------------------------------------------------------


@CALIBRATORS.register("minmax")
def minmax_range(observer: RangeObserver, *, bits: int, symmetric: bool) -> tuple[float, float]:
    """The observed range."""
    return observer.min, observer.max


@CALIBRATORS.register("percentile")
def percentile_range(
    observer: RangeObserver, *, bits: int, symmetric: bool, percentile: float = 99.99
) -> tuple[float, float]:
    """Clip the ``100 - percentile`` % largest |x| (symmetric) or that share of each tail."""
    if not 0.0 < percentile <= 100.0:
        raise ConfigError(f"percentile calibrator: percentile must be in (0, 100], got {percentile}")
    q = percentile / 100.0
    if symmetric:
        counts, edges = _search_hist(observer, symmetric=True)
        return 0.0, _quantile(counts, edges, q)
    counts, edges = observer.histogram()
    return _quantile(counts, edges, 1.0 - q), _quantile(counts, edges, q)


def _sq_error_integral(x: np.ndarray, grid_lo: np.ndarray, step: np.ndarray, levels: int) -> np.ndarray:
    """Integral of (t - Q(t))^2 from grid_lo to x, Q rounding to the grid and clipping to its ends."""
    d = x - grid_lo
    y = np.clip(d / step, 0.0, levels - 1)
    r = y - np.rint(y)
    # per unit cell the squared rounding error integrates to 1/12, a partial cell to r^3/3
    out = (step * step * step) * ((y - r) / 12.0 + r * r * r / 3.0)
    below = np.minimum(d, 0.0)  # clipped at the low end: error grows linearly
    above = np.maximum(d - (levels - 1) * step, 0.0)
    return out + (below * below * below + above * above * above) / 3.0


def expected_sq_error(
    counts: np.ndarray, edges: np.ndarray, lo: np.ndarray, hi: np.ndarray, *, bits: int, symmetric: bool
) -> np.ndarray:
    """Mean squared quantization error of the histogrammed data for each candidate range (lo[k], hi[k]).

    ``symmetric`` ranges are scored on a histogram of |x| with ``lo == 0`` (the grid is mirror-symmetric).
    """
    lo, hi = np.atleast_1d(lo).astype(float)[:, None], np.atleast_1d(hi).astype(float)[:, None]
    if symmetric:
        levels = 2 ** (bits - 1)
        step = hi / (levels - 1)
        grid_lo = np.zeros_like(lo)
    else:
        levels = 2**bits
        step = (hi - lo) / (levels - 1)
        grid_lo = -np.round(-lo / step) * step  # zero point nudged so that 0 is a level
    used = counts > 0  # empty bins add nothing: skip them
    left, right, weight = edges[:-1][used], edges[1:][used], counts[used] / np.diff(edges)[used]
    err = np.empty(lo.shape[0])
    for s in range(0, lo.shape[0], 256):
        sl = slice(s, s + 256)
        integral = _sq_error_integral(right, grid_lo[sl], step[sl], levels)
        integral -= _sq_error_integral(left, grid_lo[sl], step[sl], levels)
        err[sl] = (integral * weight).sum(axis=1)
    return err / counts.sum()


@CALIBRATORS.register("mse")
def mse_range(observer: RangeObserver, *, bits: int, symmetric: bool) -> tuple[float, float]:
    """The range minimising the expected squared quantization error (rounding + clipping)."""
    counts, edges = _search_hist(observer, symmetric)
    score = lambda i, j: expected_sq_error(counts, edges, edges[i], edges[j], bits=bits, symmetric=symmetric)
    found = _best_window(edges, score, exhaustive=False)
    if found is None:
        return observer.min, observer.max
    return float(edges[found[0]]), float(edges[found[1]])


def _kl_window(counts: np.ndarray, i: int, j: int, levels: int) -> float:
    """KL(P||Q) for the window of bins i..j-1.

    P: the window with the clipped tails added to its end bins; Q: the window merged into ``levels``
    groups, each group's mass spread evenly over its non-empty bins (TensorRT's procedure).
    """
    sliced = counts[i:j]
    p = sliced.copy()
    p[0] += counts[:i].sum()
    p[-1] += counts[j:].sum()
    n = j - i
    starts = (np.arange(levels) * n) // levels
    nonzero = (sliced > 0).astype(float)
    sums = np.add.reduceat(sliced, starts)
    used = np.add.reduceat(nonzero, starts)
    chunk = np.repeat(np.arange(levels), np.diff(np.r_[starts, n]))
    q = nonzero * (sums / np.maximum(used, 1.0))[chunk]  # each level's mass spread over its non-empty bins
    if q.sum() <= 0:
        return math.inf
    # clipped mass can land on bins Q leaves empty: give those a small floor so that KL stays finite
    q = q / q.sum() + _KL_FLOOR * (q == 0)
    p, q = p / p.sum(), q / q.sum()
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


@CALIBRATORS.register("entropy")
def entropy_range(observer: RangeObserver, *, bits: int, symmetric: bool) -> tuple[float, float]:
    """The range minimising KL divergence between the clipped and the quantized histogram (TensorRT)."""
    counts, edges = _search_hist(observer, symmetric)
    levels = 2 ** (bits - 1) if symmetric else 2**bits
    if levels >= len(counts):  # finer than the histogram: only clipping can lose information
        return observer.min, observer.max

    def score(ii: np.ndarray, jj: np.ndarray) -> np.ndarray:
        kl = [_kl_window(counts, i, j, levels) if j - i >= levels else math.inf for i, j in zip(ii, jj, strict=True)]
        return np.array(kl)

    found = _best_window(edges, score, exhaustive=True)
    if found is None:
        return observer.min, observer.max
    return float(edges[found[0]]), float(edges[found[1]])
