"""Fake quantizers: grids, integer codes, straight-through and LSQ gradients."""

import pytest
import torch

from slimdet.compress.quant.quantizers import Quantizer, ScaleType, kmeans_levels, qrange


def _weights(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_symmetric_weight_grid_holds_integer_codes_in_range(bits, per_channel):
    w = _weights()
    q = Quantizer(bits, signed=True, symmetric=True, channels=4 if per_channel else None, narrow=True)
    q.fit_weight(w, "minmax")
    q.eval()
    out = q(w)
    scale = q.scale.reshape(-1, 1, 1, 1) if per_channel else q.scale
    codes = out / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    lo, hi = qrange(bits, True, narrow=True)
    assert codes.round().min() >= lo and codes.round().max() <= hi
    assert torch.equal(q.integers(w), codes.round().to(torch.int32))
    # minmax: the largest |w| per channel (or overall) is on the grid exactly
    peak = w.abs().flatten(1).max(dim=1).values if per_channel else w.abs().max()
    assert torch.allclose(scale.flatten() * hi, peak.flatten(), rtol=1e-5)


def test_mse_grid_beats_minmax_at_4_bits_on_heavy_tails():
    w = torch.randn(4, 64, 3, 3, generator=torch.Generator().manual_seed(1)) ** 3  # heavy tails
    errors = {}
    for method in ("minmax", "mse"):
        q = Quantizer(4, signed=True, symmetric=True, channels=4, narrow=True)
        q.fit_weight(w, method)
        q.eval()
        errors[method] = float((q(w) - w).pow(2).sum())
    assert errors["mse"] < 0.9 * errors["minmax"]


def test_asymmetric_activation_range_and_zero_point():
    q = Quantizer(8, signed=False, symmetric=False)
    q.set_range(-1.0, 3.0)
    q.eval()
    assert q.scale.item() == pytest.approx(4 / 255)
    assert q.zero_point.item() == round(1 / (4 / 255))
    x = torch.linspace(-1, 3, 1000)
    assert (q(x) - x).abs().max() <= q.scale.item() / 2 + 1e-6
    assert q(torch.tensor([10.0])).item() == pytest.approx((255 - q.zero_point.item()) * q.scale.item())  # clipped


def test_pow2_scales_are_powers_of_two_covering_the_range():
    q = Quantizer(8, signed=True, symmetric=True, channels=4, scale_type=ScaleType.POW2, narrow=True)
    q.fit_weight(_weights(), "minmax")
    log2 = torch.log2(q.scale)
    assert torch.equal(log2, log2.round())
    assert torch.all(q.scale * 127 >= _weights().abs().flatten(1).max(dim=1).values)


def test_binary_weights_are_plus_minus_channel_mean():
    w = _weights()
    q = Quantizer(1, signed=True, symmetric=True, channels=4, scale_type=ScaleType.BINARY)
    q.fit_weight(w)
    q.eval()
    out = q(w)
    alpha = w.abs().flatten(1).mean(dim=1)
    assert torch.allclose(out.abs().flatten(1), alpha[:, None].expand(4, 27))
    assert torch.equal(torch.sign(out), torch.where(w >= 0, 1.0, -1.0))


def test_levels_grid_has_at_most_2_pow_bits_values_and_kmeans_fits():
    w = _weights()
    q = Quantizer(3, signed=True, symmetric=True, scale_type=ScaleType.LEVELS)
    q.fit_weight(w)
    q.eval()
    assert q(w).unique().numel() <= 8
    uniform = Quantizer(3, signed=True, symmetric=True, narrow=True)
    uniform.fit_weight(w, "mse")
    uniform.eval()
    assert float((q(w) - w).pow(2).sum()) < float((uniform(w) - w).pow(2).sum())  # levels follow the density
    centers = kmeans_levels(torch.tensor([0.0, 0.0, 1.0, 1.0, 5.0]), 3)
    assert torch.allclose(centers, torch.tensor([0.0, 1.0, 5.0]))


def test_fp16_pass_through_rounds_to_half_precision():
    q = Quantizer(16, signed=True, symmetric=True)
    x = torch.tensor([1.0 + 2**-12, 3.14159265])
    assert torch.equal(q(x), x.half().float())


def test_lsq_gradients_reach_the_step_size_and_pass_straight_through():
    q = Quantizer(4, signed=False, symmetric=False)
    q.set_range(0.0, 1.5)
    q.scale.requires_grad_(True)
    q.train()
    x = torch.linspace(-0.5, 2.0, 200, requires_grad=True)
    q(x).sum().backward()
    assert q.scale.grad is not None and q.scale.grad.abs() > 0
    step = q.scale.item()
    inside = (x.detach() >= 0) & (x.detach() <= 1.5)
    outside = (x.detach() < -step) | (x.detach() > 1.5 + step)
    assert torch.all(x.grad[inside] == 1) and torch.all(x.grad[outside] == 0)  # clipped values get no gradient
