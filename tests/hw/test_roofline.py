"""Roofline model: hand-computed compute- and memory-bound layers, overhead, channel rounding, element ops."""

import math

import numpy as np
import pytest

from slimdet.errors import ConfigError
from slimdet.hw.layers import ElementOp, GemmLayer, LayerTable
from slimdet.hw.roofline import Bound, estimate, plot_roofline
from slimdet.hw.spec import RooflineSpec, load_spec

SPEC = RooflineSpec(kind="cpu", name="toy", peak_macs_per_s={"fp32": 1e9, "int8": 4e9}, mem_bytes_per_s=1e9,
                    op_overhead_s=1e-6, compute_efficiency=0.5, memory_efficiency=0.25, channel_multiple=16,
                    power_w=10.0)  # fmt: skip
COMPUTE_BW = 1e9 * 0.5  # MAC/s reached
MEMORY_BW = 1e9 * 0.25  # bytes/s reached


def linear(name: str, m: int, k: int, n: int, bits: int = 32) -> GemmLayer:
    return GemmLayer(name=name, op="linear", m=m, k=k, n=n, weight_bits=bits, act_bits=bits)


def table(*gemm: GemmLayer, ops: tuple[ElementOp, ...] = ()) -> LayerTable:
    return LayerTable(gemm=tuple(gemm), ops=ops, input_shape=(1, 3, 8, 8), model="toy")


def test_compute_bound_layer_hand_computed():
    r = estimate(table(linear("fc", m=100, k=1000, n=32)), SPEC)
    macs = 100 * 1000 * 32  # 32 channels: two full 16-wide vectors, no padding
    nbytes = (100 * 1000 + 1000 * 32 + 100 * 32) * 4  # input + weight + output, fp32
    assert r.macs[0] == macs and r.traffic_bytes[0] == nbytes
    assert r.compute_s[0] == pytest.approx(macs / COMPUTE_BW)  # 6.4 ms
    assert r.memory_s[0] == pytest.approx(nbytes / MEMORY_BW)  # 2.16 ms
    assert r.bound[0] == Bound.COMPUTE
    assert r.latency_s[0] == pytest.approx(6.4e-3 + 1e-6)
    assert r.energy_j[0] == pytest.approx(10.0 * (6.4e-3 + 1e-6))
    assert r.intensity_macs_per_byte[0] == pytest.approx(macs / nbytes)
    assert r.dtypes == ("fp32",)


def test_memory_bound_layer_hand_computed():
    r = estimate(table(linear("gemv", m=1, k=1000, n=1000)), SPEC)
    assert r.macs[0] == 1 * 1000 * 1008  # 1000 channels run as 63 vectors of 16
    nbytes = (1000 + 1000 * 1000 + 1000) * 4
    assert r.bound[0] == Bound.MEMORY
    assert r.latency_s[0] == pytest.approx(nbytes / MEMORY_BW + 1e-6)  # 16.03 ms
    assert r.compute_s[0] == pytest.approx(1_008_000 / COMPUTE_BW)


@pytest.mark.parametrize(("channels", "padded"), [(96, 96), (97, 112), (100, 112), (112, 112), (113, 128)])
def test_output_channels_round_up_to_the_simd_width(channels, padded):
    r = estimate(table(linear("fc", m=256, k=512, n=channels)), SPEC)
    assert r.macs[0] == 256 * 512 * padded
    assert r.bound[0] == Bound.COMPUTE


def test_pruning_100_to_97_channels_saves_nothing_96_saves_a_vector():
    lat = {c: estimate(table(linear("fc", m=256, k=512, n=c)), SPEC).total_latency_s for c in (100, 97, 96)}
    assert lat[97] == lat[100]
    assert (lat[96] - 1e-6) == pytest.approx((lat[100] - 1e-6) * 96 / 112)


def test_grouped_conv_rounds_its_total_output_channels_and_matmul_each_batch_entry():
    dw = GemmLayer(name="dw", op="dwconv", m=100, k=9, n=1, groups=24, in_chw=(24, 10, 10), kernel=(3, 3))
    mm = GemmLayer(name="mm", op="matmul", m=10, k=10, n=20, groups=3)
    r = estimate(table(dw, mm), SPEC)
    assert r.macs[0] == 100 * 9 * 32  # 24 depthwise channels -> 2 vectors of 16
    assert r.macs[1] == 10 * 10 * 32 * 3  # every batch entry of a matmul rounds its own 20 columns
    assert r.traffic_bytes[0] == (24 * 10 * 10 + 9 * 24 + 100 * 24) * 4  # distinct input, not im2col copies


def test_int8_layer_uses_the_int8_peak_and_one_byte_operands_and_falls_back_without_it():
    layer = linear("q", m=100, k=1000, n=32, bits=8)
    r = estimate(table(layer), SPEC)
    assert r.dtypes == ("int8",)
    assert r.compute_s[0] == pytest.approx(100 * 1000 * 32 / (4e9 * 0.5))
    assert r.traffic_bytes[0] == 100 * 1000 + 1000 * 32 + 100 * 32
    no_int8 = SPEC.model_copy(update={"peak_macs_per_s": {"fp32": 1e9}})
    f = estimate(table(layer), no_int8)
    assert f.dtypes == ("fp32",)
    assert f.compute_s[0] == pytest.approx(100 * 1000 * 32 / COMPUTE_BW)
    # activations are dequantized to fp32 by the runtime, weights stay stored in 8 bits
    assert f.traffic_bytes[0] == (100 * 1000 + 100 * 32) * 4 + 1000 * 32


def test_dtype_override_runs_every_row_at_that_type():
    r = estimate(table(linear("fc", m=100, k=1000, n=32)), SPEC, dtype="int8")
    assert r.dtypes == ("int8",) and r.traffic_bytes[0] == 100 * 1000 + 1000 * 32 + 100 * 32
    with pytest.raises(ConfigError, match="dtype must be one of"):
        estimate(table(linear("fc", 1, 1, 1)), SPEC, dtype="fp8x")


def test_element_ops_are_memory_bound_with_overhead_per_call():
    ops = (ElementOp("a/silu", "activation", elements=1000, bits=32, calls=1),
           ElementOp("b/add", "elementwise", elements=1000, bits=32, calls=3),
           ElementOp("c/cat", "concat", elements=500, bits=8, calls=1))  # fmt: skip
    r = estimate(table(ops=ops), SPEC)
    assert r.names == ("a/silu", "b/add", "c/cat")
    assert r.latency_s[0] == pytest.approx(2 * 1000 * 4 / MEMORY_BW + 1e-6)  # read + write
    assert r.latency_s[1] == pytest.approx(3 * 1000 * 4 / MEMORY_BW + 3e-6)  # two reads + write, 3 launches
    assert r.latency_s[2] == pytest.approx(2 * 500 * 1 / MEMORY_BW + 1e-6)
    assert all(b == Bound.MEMORY for b in r.bound) and not r.is_gemm.any()
    assert r.total_macs == 0


def test_batch_norms_are_folded_by_default_group_norms_never_and_fake_quantizers_always():
    ops = (
        ElementOp("bn/native_batch_norm", "norm", elements=1000, bits=32),
        ElementOp("gn/native_group_norm", "norm", elements=1000, bits=32, calls=5),
        ElementOp("quant.x/_fake_quantize_per_tensor_affine_cachemask_tensor_qparams", "elementwise", 1000, 8),
    )
    r = estimate(table(ops=ops), SPEC)
    assert r.names == ("gn/native_group_norm",)
    assert r.latency_s[0] == pytest.approx(3 * 1000 * 4 / MEMORY_BW + 5e-6)  # statistics pass + normalizing pass
    with_bn = estimate(table(ops=ops), SPEC, include_norm=True)
    assert with_bn.names == ("bn/native_batch_norm", "gn/native_group_norm")
    assert with_bn.latency_s[0] == pytest.approx(3 * 1000 * 4 / MEMORY_BW + 1e-6)


def test_relu_family_is_fused_into_the_conv_unless_asked_not_to():
    ops = (
        ElementOp("a/relu", "activation", 1000, 32),
        ElementOp("b/hardtanh", "activation", 1000, 32),
        ElementOp("c/hardswish", "activation", 1000, 32),
        ElementOp("d/silu", "activation", 1000, 32),
    )
    assert estimate(table(ops=ops), SPEC).names == ("c/hardswish", "d/silu")
    unfused = estimate(table(ops=ops), SPEC, fuse_activations=False)
    assert len(unfused.names) == 4 and unfused.latency_s[0] == pytest.approx(2 * 1000 * 4 / MEMORY_BW + 1e-6)


def test_decode_and_nms_costs_and_postprocess_switch():
    ops = (
        ElementOp("postprocess", "decode", elements=2000, bits=32, calls=4),
        ElementOp("postprocess/nms", "nms", elements=1000, bits=32),
    )
    r = estimate(table(ops=ops), SPEC)
    assert r.latency_s[0] == pytest.approx(3 * 2000 * 4 / MEMORY_BW + 4e-6)
    passes = math.ceil(math.log2(1000))  # 10 sorting passes over 5 fp32 values per box
    assert r.latency_s[1] == pytest.approx(1000 * 5 * 4 * passes / MEMORY_BW + 1e-6)
    assert len(estimate(table(ops=ops), SPEC, postprocess=False).names) == 0


def test_totals_rows_and_energy_add_up():
    t = table(linear("fc", m=100, k=1000, n=32), linear("gemv", 1, 1000, 1000),
              ops=(ElementOp("a/silu", "activation", 1000, 32),))  # fmt: skip
    r = estimate(t, SPEC)
    tot = r.totals()
    assert tot["latency_s"] == pytest.approx(r.latency_s.sum())
    assert tot["gemm_latency_s"] + tot["other_latency_s"] == pytest.approx(tot["latency_s"])
    assert (tot["compute_bound_layers"], tot["memory_bound_layers"]) == (1, 1)
    assert r.total_energy_j == pytest.approx(10.0 * r.total_latency_s)
    rows = r.rows()
    assert [row["bound"] for row in rows] == ["compute", "memory", "memory"]
    assert sum(row["latency_s"] for row in rows) == pytest.approx(r.total_latency_s)


def test_systolic_spec_is_refused():
    with pytest.raises(ConfigError, match="RooflineSpec"):
        estimate(table(linear("fc", 1, 1, 1)), load_spec("edge-npu"))  # type: ignore[arg-type]


def test_real_model_on_the_cpu_preset_and_plot(tmp_path):
    from slimdet.hw.layers import layer_table
    from slimdet.models import create_model

    model = create_model("yolo-test", num_classes=10, input_size=64)
    layers = layer_table(model)
    spec = load_spec("cpu-zen5-2c")
    r = estimate(layers, spec, postprocess=False)
    assert r.is_gemm.sum() == len(layers.gemm)
    assert r.total_macs >= layers.macs  # padding only adds
    assert np.all(r.latency_s > 0) and 0 < r.total_latency_s < 1.0
    assert not any(op in ("norm", "decode", "nms") for op in r.ops)
    with_post = estimate(layers, spec)
    assert with_post.total_latency_s > r.total_latency_s
    path = plot_roofline(r, spec, tmp_path / "roofline.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
