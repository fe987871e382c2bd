"""Activation calibrators: the observer's statistics and the clipping range each method picks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimdet.compress.quant.calibrate import CALIBRATORS, MIN_WIDTH, RangeObserver, calibrate, expected_sq_error
from slimdet.errors import ConfigError

METHODS = CALIBRATORS.names()
OUTLIER = 40.0


def fake_quant(x: torch.Tensor, lo: float, hi: float, bits: int, symmetric: bool) -> torch.Tensor:
    """Reference uniform quantizer: signed restricted grid if symmetric, else uint with a nudged zero point."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        s = hi / qmax
        return torch.clamp(torch.round(x / s), -qmax, qmax) * s
    s = (hi - lo) / (2**bits - 1)
    zp = round(-lo / s)
    return (torch.clamp(torch.round(x / s) + zp, 0, 2**bits - 1) - zp) * s


def quant_mse(x: torch.Tensor, lo: float, hi: float, bits: int, symmetric: bool) -> float:
    return float(((x - fake_quant(x, lo, hi, bits, symmetric)) ** 2).mean())


@pytest.fixture(scope="module")
def gauss_outliers() -> torch.Tensor:
    """100k standard normal values and 5 outliers at +40 (0.005 %, inside the 99.99th percentile's tail)."""
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.randn(100_000, generator=g), torch.full((5,), OUTLIER)])


def observe(x: torch.Tensor, batches: int = 10) -> RangeObserver:
    obs = RangeObserver()
    for chunk in x.chunk(batches):
        obs.update(chunk)
    return obs


@pytest.fixture(scope="module")
def gauss_obs(gauss_outliers: torch.Tensor) -> RangeObserver:
    return observe(gauss_outliers[torch.randperm(len(gauss_outliers), generator=torch.Generator().manual_seed(1))])


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("method", METHODS, ids=METHODS)
def test_outlier_clipped_except_by_minmax(gauss_obs: RangeObserver, method: str, symmetric: bool) -> None:
    lo, hi = calibrate(gauss_obs, method, bits=4, symmetric=symmetric)
    assert lo <= 0.0 <= hi and lo < hi
    if method == "minmax":
        assert hi == OUTLIER
        assert lo == (-OUTLIER if symmetric else gauss_obs.min)
    else:
        assert 1.5 < hi < 8.0, (method, hi)  # the outliers at 40 are clipped; the Gaussian bulk is kept
        assert -8.0 < lo < -1.5


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("method", METHODS, ids=METHODS)
def test_symmetric_gives_symmetric_range(gauss_obs: RangeObserver, method: str, bits: int) -> None:
    lo, hi = calibrate(gauss_obs, method, bits=bits, symmetric=True)
    assert lo == -hi and hi > 0


@pytest.mark.parametrize("method", METHODS, ids=METHODS)
def test_nonnegative_data_gives_zero_low_end(method: str) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.relu(torch.randn(4, 16, 32, 32, generator=g)) + 0.25 * (torch.rand(4, 16, 32, 32, generator=g) > 0.5)
    obs = observe(x, batches=4)
    assert obs.min >= 0
    lo, hi = calibrate(obs, method, bits=8, symmetric=False)
    assert lo == 0.0 and 1.0 < hi <= obs.max


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_mse_beats_minmax_and_is_near_the_best_range(
    gauss_outliers: torch.Tensor, gauss_obs: RangeObserver, symmetric: bool
) -> None:
    x = gauss_outliers
    lo, hi = calibrate(gauss_obs, "mse", bits=4, symmetric=symmetric)
    chosen = quant_mse(x, lo, hi, 4, symmetric)
    assert chosen < 0.3 * quant_mse(x, *calibrate(gauss_obs, "minmax", bits=4, symmetric=symmetric), 4, symmetric)
    # against a brute-force scan of the data's real error over symmetric ranges (asymmetric can only do better)
    best = min(quant_mse(x, -a, a, 4, True) for a in np.linspace(1.0, 6.0, 101))
    assert chosen < 1.01 * best
    # the histogram model of the error agrees with the data's error (symmetric: scored on |x|, lo = 0)
    counts, edges = (observe(x.abs()) if symmetric else gauss_obs).histogram()
    model = expected_sq_error(
        counts, edges, np.array([0.0 if symmetric else lo]), np.array([hi]), bits=4, symmetric=symmetric
    )[0]
    assert model == pytest.approx(chosen, rel=0.02)


def test_percentile_matches_numpy(gauss_outliers: torch.Tensor, gauss_obs: RangeObserver) -> None:
    x = gauss_outliers.numpy()
    lo, hi = calibrate(gauss_obs, "percentile", bits=8, symmetric=False, percentile=99.0)
    assert lo == pytest.approx(np.percentile(x, 1.0), abs=0.03)
    assert hi == pytest.approx(np.percentile(x, 99.0), abs=0.03)
    _, a = calibrate(gauss_obs, "percentile", bits=8, symmetric=True, percentile=99.0)
    assert a == pytest.approx(np.percentile(np.abs(x), 99.0), abs=0.03)


def test_entropy_threshold_grows_with_bits(gauss_obs: RangeObserver) -> None:
    """More levels make rounding cheaper, so KL calibration keeps more of the tail (int8: ~3-5 sigma)."""
    _, hi4 = calibrate(gauss_obs, "entropy", bits=4, symmetric=True)
    _, hi8 = calibrate(gauss_obs, "entropy", bits=8, symmetric=True)
    assert 2.0 < hi4 < hi8 < 5.5


def test_observer_many_batches_equal_one_batch() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(60_000, generator=g) * 2 + 0.5
    one = RangeObserver(bins=512)
    one.update(x)
    many = RangeObserver(bins=512)
    for chunk in x[torch.argsort(x.abs())].chunk(60):  # the range grows with almost every batch
        many.update(chunk)
    assert (many.min, many.max, many.count) == (one.min, one.max, one.count) == (float(x.min()), float(x.max()), len(x))
    (c1, e1), (cm, em) = one.histogram(), many.histogram()
    assert np.array_equal(e1, em) and len(c1) == 512
    assert cm.sum() == pytest.approx(len(x))
    assert np.abs(np.cumsum(cm) - np.cumsum(c1)).max() / len(x) < 2e-3  # CDFs agree
    assert np.abs(cm - c1).sum() / len(x) < 0.08  # re-binning only smears counts into neighbouring bins


@pytest.mark.parametrize("method", METHODS, ids=METHODS)
def test_constant_tensors_get_a_valid_range(method: str) -> None:
    zeros = observe(torch.zeros(3, 8))
    lo, hi = calibrate(zeros, method, bits=8, symmetric=False)
    assert lo == 0.0 and hi >= MIN_WIDTH
    lo, hi = calibrate(zeros, method, bits=8, symmetric=True)
    assert lo == -hi and hi >= MIN_WIDTH
    assert calibrate(observe(torch.full((10,), 3.0)), method, bits=8, symmetric=False) == (0.0, 3.0)
    assert calibrate(observe(torch.full((10,), -2.0)), method, bits=4, symmetric=False) == (-2.0, 0.0)
    assert calibrate(observe(torch.full((10,), -2.0)), method, bits=4, symmetric=True) == (-2.0, 2.0)


def test_constant_then_varying_data() -> None:
    obs = RangeObserver(bins=64)
    obs.update(torch.full((100,), 1.0))
    obs.update(torch.tensor([0.0, 2.0]))
    counts, edges = obs.histogram()
    assert (obs.min, obs.max, obs.count) == (0.0, 2.0, 102)
    assert counts.sum() == pytest.approx(102) and counts[32] == pytest.approx(100)  # the point mass at 1.0 kept


def test_errors() -> None:
    empty = RangeObserver()
    with pytest.raises(ConfigError, match="no data"):
        calibrate(empty, "minmax", bits=8, symmetric=False)
    with pytest.raises(ConfigError, match="no data"):
        empty.histogram()
    obs = observe(torch.randn(100, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ConfigError, match="did you mean 'entropy'"):
        calibrate(obs, "entropi", bits=8, symmetric=False)
    with pytest.raises(ConfigError, match="did you mean 'percentile'"):
        calibrate(obs, "percentil", bits=8, symmetric=False)
    with pytest.raises(ConfigError, match="no option 'percentil'.*did you mean 'percentile'"):
        calibrate(obs, "percentile", bits=8, symmetric=False, percentil=99.0)
    with pytest.raises(ConfigError, match="percentile must be in"):
        calibrate(obs, "percentile", bits=8, symmetric=False, percentile=0.0)
    with pytest.raises(ConfigError, match="bits"):
        calibrate(obs, "mse", bits=1, symmetric=False)
    with pytest.raises(ConfigError, match="non-finite"):
        obs.update(torch.tensor([1.0, float("nan")]))
