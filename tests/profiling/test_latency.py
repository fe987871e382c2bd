import pytest
import torch
from torch import nn

from slimdet.profiling.latency import peak_forward_alloc_bytes, percentile, summarize, time_interleaved, torch_threads


def test_torch_threads_sets_and_restores():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("body fails")
    assert torch.get_num_threads() == before


def test_time_interleaved_alternates_after_warmup():
    calls = []
    times = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=2, runs=3)
    assert calls == ["a", "b"] * 5
    assert [len(v) for v in times.values()] == [3, 3]
    assert all(t >= 0 for v in times.values() for t in v)


def test_summary_statistics():
    stat = summarize("x", 4, [0.4, 0.1, 0.2, 0.3, 1.0])
    assert (stat.median_s, stat.min_s, stat.runs) == (0.3, 0.1, 5)
    assert stat.p90_s == pytest.approx(percentile([0.1, 0.2, 0.3, 0.4, 1.0], 90)) == pytest.approx(0.76)
    assert stat.median_per_image_s == pytest.approx(0.075)


def test_peak_forward_alloc_covers_live_activations():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1)).eval()
    x = torch.rand(1, 3, 160, 160)
    peak = peak_forward_alloc_bytes(model, x)
    first, out = 16 * 80 * 80 * 4, 32 * 80 * 80 * 4
    assert peak >= first + out  # the first activation is alive while the output is written
    assert peak < 10 * (first + out)
