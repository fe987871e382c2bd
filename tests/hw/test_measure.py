"""Measured devices: ONNX Runtime timings (fp32, int8), GPU providers skipped with a reason, node
profiling mapped to layers, and calibration recovering known roofline parameters."""

import copy

import numpy as np
import pytest
import torch

from slimdet.errors import ConfigError
from slimdet.hw.layers import ElementOp, GemmLayer, LayerTable, layer_table
from slimdet.hw.measure import (
    ProviderUnavailableError,
    Sample,
    calibrate,
    fit_roofline,
    measure,
    measure_many,
    prepare_onnx,
    profile_nodes,
    provider_status,
    scope_to_module,
)
from slimdet.hw.roofline import estimate
from slimdet.hw.spec import RooflineSpec, replace

SIZE = 64


@pytest.fixture(scope="module")
def tiny():
    from slimdet.models import create_model

    torch.manual_seed(0)
    return create_model("yolo-test", num_classes=10, input_size=SIZE).eval()


@pytest.fixture(scope="module")
def tiny_int8(tiny):
    from slimdet.compress.quant import QuantConfig, quantize

    # latency does not depend on the ranges: random images calibrate it (the targets are not read)
    images = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    batch = (images, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 4)
    q = copy.deepcopy(tiny)
    cfg = QuantConfig(calib_batches=1, auto_keep=False, runtime_aware=False, adaround=False, bias_correction=False)
    quantize(q, cfg, calib=[batch], progress=False)
    return q.eval()


@pytest.fixture(scope="module")
def fp32_file(tiny, tmp_path_factory):
    return prepare_onnx(tiny, precision="fp32", work_dir=tmp_path_factory.mktemp("onnx"))


def test_measure_fp32_and_int8_interleaved_give_positive_times(tiny, tiny_int8):
    steps = []
    got = measure_many({"fp32": tiny, "int8": tiny_int8}, precision={"fp32": "fp32", "int8": "int8"}, runs=3, warmup=1,
                       on_step=lambda: steps.append(1))  # fmt: skip
    assert set(got) == {"fp32", "int8"} and len(steps) == 6  # the re-warming calls are neither timed nor counted
    for key, m in got.items():
        assert m.precision == key and m.provider == "cpu" and m.threads == 1
        assert m.input_shape == (1, 3, SIZE, SIZE)
        assert len(m.times_s) == 3 and all(t > 0 for t in m.times_s)
        assert min(m.times_s) <= m.median_s <= max(m.times_s) and m.median_s < 1.0
        assert m.to_dict()["latency"]["runs"] == 3


def test_measure_a_given_onnx_file_and_refuse_a_precision_it_does_not_have(fp32_file, tiny, tiny_int8):
    m = measure(fp32_file, runs=2, warmup=0)
    assert m.model == fp32_file.stem and m.median_s > 0
    with pytest.raises(ConfigError, match="is a float graph"):
        measure(fp32_file, precision="int8", runs=1)
    with pytest.raises(ConfigError, match="needs a quantized model"):
        measure(tiny, precision="int8", runs=1)
    with pytest.raises(ConfigError, match="needs a float model"):
        measure(tiny_int8, precision="fp32", runs=1)
    with pytest.raises(ConfigError, match="fp16.*GPU provider"):
        measure(fp32_file, precision="fp16", runs=1)
    with pytest.raises(ConfigError, match="provider must be one of"):
        measure(fp32_file, provider="tpu", runs=1)


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_gpu_provider_is_refused_with_its_reason_when_absent(provider, fp32_file):
    ok, reason = provider_status(provider)
    if ok:
        pytest.skip(f"{provider} is available here; the refusal path is not reachable")
    assert "not available" in reason and "GPU" in reason
    with pytest.raises(ProviderUnavailableError, match="not available"):
        measure(fp32_file, provider=provider, precision="fp16", runs=1)


@pytest.mark.parametrize(("provider", "precision"), [("cuda", "fp16"), ("tensorrt", "fp16"), ("tensorrt", "int8")])
def test_gpu_provider_measures(provider, precision, tiny, tiny_int8):
    ok, reason = provider_status(provider)
    if not ok:
        pytest.skip(reason)
    m = measure(tiny_int8 if precision == "int8" else tiny, provider=provider, precision=precision, runs=3, warmup=2)
    assert m.median_s > 0 and m.provider == provider


def test_scope_to_module():
    assert scope_to_module("/backbone/stage1/stage1.1/cv1/cv1.0/Conv") == "backbone.stage1.1.cv1.0"
    assert scope_to_module("/backbone/stage1/stage1.0/stage1.0.0/Conv_output_0_nchwc") == "backbone.stage1.0.0"
    assert scope_to_module("/backbone/stage1/stage1.1/blocks.0/cv2/cv2.0/Conv") == "backbone.stage1.1.blocks.0.cv2.0"
    assert scope_to_module("/backbone/stem/stem.2/Mul/QuickGeluFusion/") == "backbone.stem.2"
    assert scope_to_module("ReorderInput_token_3") is None


def test_profile_nodes_maps_every_conv_to_its_layer(tiny, fp32_file):
    layers = layer_table(tiny, postprocess=False)
    nodes = profile_nodes(fp32_file, runs=3, warmup=1, layers=layers)
    convs = [n for n in nodes if n.op_type in ("Conv", "FusedConv")]
    assert len(convs) == len(layers.gemm)
    assert sorted(n.layer for n in convs) == sorted(g.name for g in layers.gemm)
    assert all(n.median_s > 0 and n.runs == 3 for n in nodes)
    silu = {n.layer for n in nodes if n.op_type == "QuickGelu"}
    assert silu and all(name.endswith("/silu") for name in silu)


# --- calibration on synthetic samples made by the model itself ---------------------------------

BASE = RooflineSpec(kind="cpu", name="toy", peak_macs_per_s={"fp32": 100e9, "int8": 400e9}, mem_bytes_per_s=50e9)
TRUE = {"compute_efficiency": 0.3, "memory_efficiency": 0.4, "op_overhead_s": 6e-6}


def synthetic_tables(n: int, seed: int = 0) -> list[LayerTable]:
    """Layer tables, fp32 and int8, in turn dominated by compute (large GEMMs), memory (matrix-vector
    products and large element-wise ops) and per-op overhead (many tiny ops)."""
    rng = np.random.default_rng(seed)
    tables = []
    for i in range(n):
        bits = 8 if i % 2 else 32
        kind = i % 3
        m_hi, k_hi, n_hi = ((4000, 1500, 512), (2, 4000, 2000), (8, 32, 32))[kind]
        gemm = tuple(GemmLayer(name=f"l{j}", op="linear", m=int(rng.integers(1, m_hi + 1)),
                               k=int(rng.integers(8, k_hi)), n=int(rng.integers(8, n_hi)),
                               weight_bits=bits, act_bits=bits)
                     for j in range(int(rng.integers(2, 30))))  # fmt: skip
        ops = tuple(ElementOp(f"e{j}", "activation", int(rng.integers(100, (400_000, 4_000_000, 500)[kind])), bits)
                    for j in range(int(rng.integers(5, (20, 20, 200)[kind]))))  # fmt: skip
        tables.append(LayerTable(gemm=gemm, ops=ops, model=f"t{i}"))
    return tables


def test_calibrate_recovers_known_parameters_from_noisy_samples():
    truth = replace(BASE, **TRUE)
    rng = np.random.default_rng(1)
    samples = [Sample(t, estimate(t, truth).total_latency_s * (1 + rng.normal(0, 0.01)), name=t.model)
               for t in synthetic_tables(16)]  # fmt: skip
    fit = fit_roofline(BASE, samples)
    for field, value in TRUE.items():
        assert getattr(fit.spec, field) == pytest.approx(value, rel=0.1), field
    assert np.max(np.abs(fit.errors)) < 0.05
    assert fit.spec.peak_macs_per_s == BASE.peak_macs_per_s and fit.spec.mem_bytes_per_s == BASE.mem_bytes_per_s
    assert calibrate(BASE, samples).compute_efficiency == fit.spec.compute_efficiency


def test_calibrate_fits_an_int8_peak_factor():
    truth = replace(BASE, **TRUE, peak_macs_per_s={"fp32": 100e9, "int8": 400e9 * 0.5})
    samples = [Sample(t, estimate(t, truth).total_latency_s, name=t.model) for t in synthetic_tables(16, seed=3)]
    fit = fit_roofline(BASE, samples, fit=(*TRUE, "peak_macs_per_s.int8"))
    assert fit.values["peak_macs_per_s.int8"] == pytest.approx(0.5, rel=0.05)
    assert fit.spec.peak("int8") == pytest.approx(200e9, rel=0.05)
    assert fit.spec.compute_efficiency == pytest.approx(0.3, rel=0.05)


def test_calibrate_refuses_bad_requests():
    samples = [Sample(t, 1e-3) for t in synthetic_tables(2)]
    with pytest.raises(ConfigError, match="at least as many samples"):
        calibrate(BASE, samples)
    with pytest.raises(ConfigError, match="fit must name"):
        calibrate(BASE, samples, fit=("clock_hz",))
    with pytest.raises(ConfigError, match="fit must name"):
        calibrate(BASE, samples, fit=("peak_macs_per_s.fp32",))
    with pytest.raises(ConfigError, match="latency_s > 0"):
        calibrate(BASE, [Sample(t, 0.0) for t in synthetic_tables(3)])
