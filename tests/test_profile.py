import json

import pytest
import torch
from torch import nn

from slimdet.errors import ConfigError
from slimdet.models.base import Detector
from slimdet.profile import EAGER, ORT, ProfileResult, profile


class TinyDetector(Detector):
    def __init__(self):
        super().__init__(num_classes=2, input_size=32)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.head = nn.Linear(8, 6)

    def forward(self, images):
        x = self.dw(self.act(self.bn(self.conv1(images))))
        return self.head(x.flatten(2).transpose(1, 2))  # B x 256 x 6


# conv1: 16*16*8*3*9; dw: 16*16*8*1*9; head: 256 rows x 8 x 6
TINY_MACS = 16 * 16 * 8 * 3 * 9 + 16 * 16 * 8 * 9 + 256 * 8 * 6


@pytest.fixture(scope="module")
def profiled() -> tuple[ProfileResult, int]:
    torch.manual_seed(0)
    model = TinyDetector().train()
    rng = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    res = profile(model, batch_sizes=(1, 2), threads=1, warmup=1, runs=3, progress=False)
    assert model.training  # restored
    assert torch.get_num_threads() == threads  # no global side effect
    assert torch.equal(rng, torch.random.get_rng_state())
    return res, sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def result(profiled) -> ProfileResult:
    return profiled[0]


def test_counts(profiled):
    result, numel = profiled
    assert result.macs == TINY_MACS
    assert result.params == numel == 3 * 8 * 9 + 8 + 16 + 8 * 9 + 8 * 6 + 6
    assert [r.name for r in result.layers] == ["conv1", "bn", "act", "dw", "head"]
    assert result.layers[-1].output_shape == (1, 256, 6)
    assert result.uncounted_layers == ()


def test_sizes_and_memory(result):
    assert result.state_dict_size_bytes > 4 * result.params
    assert result.onnx_size_bytes is not None and result.onnx_size_bytes > 4 * (result.params - 16)
    # at least the largest activation (8 x 16 x 16 float32) is allocated during the forward
    assert result.peak_forward_alloc_bytes >= 8 * 16 * 16 * 4


def test_latency(result):
    assert result.threads == 1 and result.runs == 3
    assert {(s.runtime, s.batch_size) for s in result.latency} == {(EAGER, 1), (ORT, 1), (EAGER, 2), (ORT, 2)}
    for s in result.latency:
        assert s.runs == 3
        assert 0 < s.min_s <= s.median_s <= s.p90_s
    assert result.latency_for(ORT, 2).batch_size == 2
    with pytest.raises(KeyError):
        result.latency_for(EAGER, 8)
    assert "raw outputs" in result.latency_of


def test_to_dict_and_text(result):
    d = json.loads(json.dumps(result.to_dict()))
    assert d["macs"] == TINY_MACS and len(d["latency"]) == 4
    assert d["layers"][0]["output_shape"] == [1, 8, 16, 16]
    assert d["environment"]["torch"] == torch.__version__
    text = result.to_text(layers=True)
    assert "MACs 86 k (batch 1)" in text and "params 366 " in text
    assert "onnxruntime-cpu" in text and "conv1" in text and str(TINY_MACS) in text


def test_without_onnx_and_with_workdir(tmp_path):
    res = profile(TinyDetector(), batch_sizes=(1,), warmup=0, runs=2, onnx=False, workdir=tmp_path, progress=False)
    assert res.onnx_size_bytes is None
    assert [(s.runtime, s.batch_size) for s in res.latency] == [(EAGER, 1)]
    assert res.state_dict_size_bytes == (tmp_path / "state_dict.pt").stat().st_size


def test_bad_options():
    with pytest.raises(ConfigError, match="batch_sizes"):
        profile(TinyDetector(), batch_sizes=(0,), progress=False)
    with pytest.raises(ConfigError, match="input_size"):
        profile(nn.Conv2d(3, 3, 1), progress=False)
