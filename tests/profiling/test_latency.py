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


def test_time_interleaved_runs_each_once_per_round_in_a_seeded_random_order_after_warmup():
    def run(seed: int) -> tuple[list[str], dict[str, list[float]]]:
        calls: list[str] = []
        fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
        return calls, time_interleaved(fns, warmup=2, runs=40, seed=seed)

    calls, times = run(0)
    assert calls[:6] == list("abc") * 2  # warm-up
    rounds = [tuple(calls[i : i + 3]) for i in range(6, len(calls), 3)]
    assert len(rounds) == 40 and all(sorted(r) == list("abc") for r in rounds)
    # every contender is timed in every position, after every other one: no fixed predecessor
    assert all({r[k] for r in rounds} == set("abc") for k in range(3))
    pairs = {(r[0], r[1]) for r in rounds} | {(r[1], r[2]) for r in rounds}
    assert pairs == {(x, y) for x in "abc" for y in "abc" if x != y}
    assert run(0)[0] == calls and run(1)[0] != calls
    assert [len(v) for v in times.values()] == [40, 40, 40]
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
