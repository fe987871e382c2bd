"""Roofline model of a CPU or GPU: per-layer latency and energy of a :class:`~slimdet.hw.layers.LayerTable`.

A GEMM layer takes (Williams, Waterman and Patterson, "Roofline", CACM 2009, plus a fixed per-op cost)::

    latency_s = max(macs_padded / (peak(dtype) x compute_efficiency),
                    bytes / (mem_bytes_per_s x memory_efficiency)) + op_overhead_s

* ``macs_padded`` rounds output channels up to ``spec.channel_multiple``: a SIMD unit or tensor core
  computes whole vectors, so pruning 100 to 97 channels on a 16-wide unit saves nothing (both are 7
  vectors) while 96 saves one vector. Weight sparsity is ignored: dense CPU/GPU kernels multiply zeros.
* ``bytes`` = distinct inputs + weights + outputs, each at its bits (compulsory traffic, no im2col copies).
* ``dtype`` follows the layer's bits: <= 8 -> ``int8``, <= 16 -> ``fp16``, else ``fp32``. A device without
  that type runs the layer in fp32 (as :meth:`RooflineSpec.peak` does) and then moves its activations
  as fp32 too (the runtime dequantizes them); weights stay stored at their bits.

Non-GEMM ops are memory-bound: ``latency_s = traffic x elements x bytes / (bandwidth x efficiency) +
calls x op_overhead_s``, with ``traffic`` the elements read and written per output element
(:data:`TRAFFIC`). Defaults that match what deployment runtimes execute:

* batch-norm ops are skipped: ONNX export and runtimes fold inference batch norm into the conv before
  it (``include_norm=True`` costs them, for an eager-PyTorch device). Group and layer norms cannot be
  folded and are always costed: a statistics pass and a normalizing pass (3 element transfers);
* ReLU-family activations (ReLU, ReLU6 / hardtanh / clamp, LeakyReLU) are fused into the conv before
  them by deployment runtimes (ONNX Runtime's FusedConv, TensorRT; a QDQ graph folds them into the
  output's quantization range) and are skipped (``fuse_activations=False`` costs them). The layer
  table does not say what an activation follows, so one after an addition is dropped too;
* fake-quantize ops of a simulated quantized model are skipped: a QDQ runtime folds them into its
  integer kernels;
* ``decode`` ops (box decoding in ``postprocess``) are element-wise; ``nms`` is modelled as a sort of its
  candidate boxes (5 fp32 values each), ``ceil(log2(n))`` passes over them, plus one overhead. Both are
  skipped with ``postprocess=False`` (an exported graph without post-processing, as
  :mod:`slimdet.hw.measure` times it).

Energy is ``power_w x latency_s`` (the device at full load for the layer's duration).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from slimdet.errors import ConfigError
from slimdet.hw.layers import FLOAT_BITS, ElementOp, LayerTable
from slimdet.hw.spec import RooflineSpec

#: operand width of each compute type, bits
DTYPE_BITS = {"fp32": 32, "tf32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4}
#: elements read + written per output element of a non-GEMM op (a binary element-wise op reads two)
TRAFFIC = {"activation": 2.0, "elementwise": 3.0, "norm": 3.0, "concat": 2.0, "resize": 2.0, "reduce": 2.0,
           "copy": 2.0, "decode": 3.0}  # fmt: skip
#: values per candidate box that NMS sorts and compares (4 coordinates + score), each fp32
NMS_VALUES_PER_BOX = 5
_FOLDED_MARKER = "fake_quantize"  # aten op of a simulated quantizer, folded by a QDQ runtime
#: aten activations a runtime fuses into the conv before them (ONNX Runtime FusedConv: Relu, Clip, LeakyRelu)
FUSED_ACTIVATIONS = frozenset({"relu", "relu6", "hardtanh", "clamp", "clamp_min", "clamp_max", "leaky_relu"})


class Bound(StrEnum):
    COMPUTE = "compute"
    MEMORY = "memory"


def dtype_for_bits(bits: int) -> str:
    """The compute type of an operand of ``bits`` bits: int8 up to 8, fp16 up to 16, else fp32."""
    return "int8" if bits <= 8 else "fp16" if bits <= 16 else "fp32"


@dataclass(frozen=True)
class RooflineTerms:
    """The parts of a roofline estimate that do not depend on the fitted parameters (efficiencies,
    overhead): what :func:`estimate` combines and :func:`slimdet.hw.measure.calibrate` fits against.

    ``ideal_compute_s`` and ``ideal_memory_s`` are at efficiency 1; ``calls`` counts op launches
    (the multiplier of ``op_overhead_s``).
    """

    names: tuple[str, ...]
    ops: tuple[str, ...]
    dtypes: tuple[str, ...]
    macs: np.ndarray  # padded MACs, 0 for non-GEMM ops
    traffic_bytes: np.ndarray
    ideal_compute_s: np.ndarray
    ideal_memory_s: np.ndarray
    calls: np.ndarray
    is_gemm: np.ndarray

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class RooflineResult:
    """Per-row (GEMM layers, then costed non-GEMM ops) latency, bound and energy on one device."""

    device: str
    names: tuple[str, ...]
    ops: tuple[str, ...]
    dtypes: tuple[str, ...]
    macs: np.ndarray  # padded MACs (what the device computes), 0 for non-GEMM ops
    traffic_bytes: np.ndarray
    compute_s: np.ndarray
    memory_s: np.ndarray
    overhead_s: np.ndarray
    latency_s: np.ndarray
    energy_j: np.ndarray
    bound: tuple[Bound, ...]
    is_gemm: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def intensity_macs_per_byte(self) -> np.ndarray:
        """Arithmetic intensity: padded MACs per byte moved (0 for non-GEMM ops)."""
        return self.macs / np.maximum(self.traffic_bytes, 1.0)

    @property
    def total_latency_s(self) -> float:
        return float(self.latency_s.sum())

    @property
    def total_energy_j(self) -> float:
        return float(self.energy_j.sum())

    @property
    def total_macs(self) -> int:
        return int(self.macs.sum())

    def rows(self) -> list[dict[str, Any]]:
        """One dict per row, for tables and JSON."""
        intensity = self.intensity_macs_per_byte
        return [{"name": self.names[i], "op": self.ops[i], "dtype": self.dtypes[i], "macs": int(self.macs[i]),
                 "traffic_bytes": int(self.traffic_bytes[i]), "intensity_macs_per_byte": float(intensity[i]),
                 "compute_s": float(self.compute_s[i]), "memory_s": float(self.memory_s[i]),
                 "overhead_s": float(self.overhead_s[i]), "latency_s": float(self.latency_s[i]),
                 "energy_j": float(self.energy_j[i]), "bound": self.bound[i].value}
                for i in range(len(self.names))]  # fmt: skip

    def totals(self) -> dict[str, Any]:
        """Whole-model sums, and how many GEMM layers are compute- or memory-bound."""
        gemm = self.is_gemm
        compute = np.asarray([b == Bound.COMPUTE for b in self.bound], dtype=bool)
        return {"device": self.device, "latency_s": self.total_latency_s, "energy_j": self.total_energy_j,
                "macs": self.total_macs, "traffic_bytes": int(self.traffic_bytes.sum()),
                "gemm_latency_s": float(self.latency_s[gemm].sum()),
                "other_latency_s": float(self.latency_s[~gemm].sum()),
                "compute_bound_layers": int((gemm & compute).sum()),
                "memory_bound_layers": int((gemm & ~compute).sum())}  # fmt: skip


def roofline_terms(
    layers: LayerTable,
    spec: RooflineSpec,
    *,
    dtype: str | None = None,
    include_norm: bool = False,
    fuse_activations: bool = True,
    postprocess: bool = True,
) -> RooflineTerms:
    """The efficiency-independent terms of every costed row (see the module docstring for the rules)."""
    if dtype is not None and dtype not in DTYPE_BITS:
        raise ConfigError(f"roofline: dtype must be one of {sorted(DTYPE_BITS)} or None (from the layers' bits), "
                          f"got {dtype!r}")  # fmt: skip
    cm = spec.channel_multiple
    a = layers.arrays
    gemm_ops = np.asarray([g.op for g in layers.gemm], dtype=object)
    wbits, abits = a["weight_bits"].astype(np.float64), a["act_bits"].astype(np.float64)
    if dtype is not None:
        wbits = abits = np.full(len(layers.gemm), float(DTYPE_BITS[dtype]))
    g_dtypes, fallback = _run_dtypes(np.maximum(wbits, abits), spec)
    abits = np.where(fallback, float(FLOAT_BITS), abits)
    # channel rounding: a matmul's "groups" are independent batch entries, a conv's groups share the channel axis
    is_mm = gemm_ops == "matmul"
    n, groups = a["n"], a["groups"]
    padded_cout = np.where(is_mm, np.ceil(n / cm) * cm * groups, np.ceil(n * groups / cm) * cm)
    macs = a["m"] * a["k"] * padded_cout
    g_bytes = (a["input_elements"] * abits + a["weight_elements"] * wbits + a["output_elements"] * abits) / 8.0
    peaks = np.asarray([spec.peak(d) for d in g_dtypes], dtype=np.float64)

    kept = [op for op in layers.ops if _costed(op, include_norm, fuse_activations, postprocess)]
    e_names = [op.name for op in kept]
    e_ops = [op.op for op in kept]
    e_elements = np.asarray([op.elements for op in kept], dtype=np.float64)
    e_calls = np.asarray([op.calls for op in kept], dtype=np.float64)
    e_bits = np.asarray([DTYPE_BITS[dtype] if dtype is not None else op.bits for op in kept], dtype=np.float64)
    e_dtypes, e_fallback = _run_dtypes(e_bits, spec)
    e_bits = np.where(e_fallback, float(FLOAT_BITS), e_bits)
    traffic = np.asarray([TRAFFIC.get(op, TRAFFIC["elementwise"]) for op in e_ops], dtype=np.float64)
    e_bytes = traffic * e_elements * e_bits / 8.0
    nms = np.asarray([op == "nms" for op in e_ops], dtype=bool)
    if nms.any():  # a sort: ceil(log2 n) passes over n boxes of NMS_VALUES_PER_BOX fp32 values
        passes = np.maximum(1.0, np.ceil(np.log2(np.maximum(e_elements, 2.0))))
        e_bytes = np.where(nms, e_elements * NMS_VALUES_PER_BOX * 4.0 * passes, e_bytes)

    mem = spec.mem_bytes_per_s
    n_e = len(e_names)
    return RooflineTerms(
        names=tuple(g.name for g in layers.gemm) + tuple(e_names),
        ops=tuple(gemm_ops.tolist()) + tuple(e_ops),
        dtypes=tuple(g_dtypes) + tuple(e_dtypes),
        macs=np.concatenate([macs.astype(np.float64), np.zeros(n_e)]),
        traffic_bytes=np.concatenate([g_bytes, e_bytes]),
        ideal_compute_s=np.concatenate([macs / peaks if len(peaks) else np.zeros(0), np.zeros(n_e)]),
        ideal_memory_s=np.concatenate([g_bytes, e_bytes]) / mem,
        calls=np.concatenate([np.ones(len(layers.gemm)), e_calls]),
        is_gemm=np.concatenate([np.ones(len(layers.gemm), bool), np.zeros(n_e, bool)]),
    )


def estimate(
    layers: LayerTable,
    spec: RooflineSpec,
    *,
    dtype: str | None = None,
    include_norm: bool = False,
    fuse_activations: bool = True,
    postprocess: bool = True,
) -> RooflineResult:
    """Latency and energy of ``layers`` on the roofline device ``spec``. Pure; vectorized over rows.

    Args:
        layers: the model's layer table.
        spec: a CPU/GPU roofline spec (e.g. ``load_spec("cpu-zen5-2c")``).
        dtype: run every row at this type ("fp32", "fp16", "int8", ...); default: each row's own bits.
        include_norm: cost batch-norm ops (default: folded into the conv before them, free).
        fuse_activations: ReLU-family activations are fused into the conv before them (default, free).
        postprocess: cost box decoding and NMS (default True; False for an exported graph without them).

    Raises:
        ConfigError: ``spec`` is not a roofline spec, or an unknown ``dtype``.
    """
    if not isinstance(spec, RooflineSpec):
        raise ConfigError(
            f"roofline.estimate: spec must be a cpu/gpu RooflineSpec, got {type(spec).__name__} "
            f"{getattr(spec, 'name', '')!r} (a systolic spec goes to slimdet.hw.systolic)"
        )
    t = roofline_terms(
        layers, spec, dtype=dtype, include_norm=include_norm, fuse_activations=fuse_activations, postprocess=postprocess
    )
    compute_s = t.ideal_compute_s / spec.compute_efficiency
    memory_s = t.ideal_memory_s / spec.memory_efficiency
    overhead_s = t.calls * spec.op_overhead_s
    latency_s = np.maximum(compute_s, memory_s) + overhead_s
    bound = tuple(Bound.COMPUTE if c > m else Bound.MEMORY for c, m in zip(compute_s, memory_s, strict=True))
    return RooflineResult(device=spec.name, names=t.names, ops=t.ops, dtypes=t.dtypes, macs=t.macs,
                          traffic_bytes=t.traffic_bytes, compute_s=compute_s, memory_s=memory_s,
                          overhead_s=overhead_s, latency_s=latency_s, energy_j=latency_s * spec.power_w,
                          bound=bound, is_gemm=t.is_gemm,
                          meta={"model": layers.model, "input_shape": list(layers.input_shape), "dtype": dtype,
                                "include_norm": include_norm, "fuse_activations": fuse_activations,
                                "postprocess": postprocess})  # fmt: skip


def _costed(op: ElementOp, include_norm: bool, fuse_activations: bool, postprocess: bool) -> bool:
    """Whether a non-GEMM op runs on the device as a separate op (see the module docstring)."""
    if _FOLDED_MARKER in op.name or (op.op == "norm" and "batch_norm" in op.name and not include_norm):
        return False
    if fuse_activations and op.op == "activation" and op.name.rsplit("/", 1)[-1] in FUSED_ACTIVATIONS:
        return False
    return postprocess or op.op not in ("decode", "nms")


def _run_dtypes(bits: np.ndarray, spec: RooflineSpec) -> tuple[list[str], np.ndarray]:
    """The type each row runs at on ``spec`` and whether it fell back to fp32 from a narrower one."""
    names = {b: dtype_for_bits(int(b)) for b in set(bits.tolist())}
    wanted = [names[b] for b in bits.tolist()]
    run = [d if d in spec.peak_macs_per_s else "fp32" for d in wanted]
    return run, np.asarray([r != w for r, w in zip(run, wanted, strict=True)], dtype=bool)


def plot_roofline(result: RooflineResult, spec: RooflineSpec, path: str | Path, *, title: str | None = None) -> Path:
    """Draw the device's roofline (attainable MAC/s vs MACs per byte, at the spec's efficiencies) with
    every GEMM layer as a point at its intensity and modelled throughput; writes a PNG or SVG."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display (Agg canvas)

    path = Path(path)
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    gemm = result.is_gemm
    x = result.intensity_macs_per_byte[gemm]
    y = result.macs[gemm] / np.maximum(result.latency_s[gemm], 1e-12)
    lo, hi = max(min(x.min(initial=1.0), 1.0) / 4, 1e-3), max(x.max(initial=1.0), 1.0) * 4
    grid = np.geomspace(lo, hi, 200)
    bw = spec.mem_bytes_per_s * spec.memory_efficiency
    for dt in sorted({d for d, g in zip(result.dtypes, gemm, strict=True) if g}):
        peak = spec.peak(dt) * spec.compute_efficiency
        ax.plot(grid, np.minimum(peak, bw * grid), label=f"roof {dt}")
    dts = np.asarray(result.dtypes, dtype=object)[gemm]
    for dt in sorted(set(dts)):
        sel = dts == dt
        ax.scatter(x[sel], y[sel], s=14, alpha=0.75, label=f"layers ({dt})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (MACs / byte)")
    ax.set_ylabel("MACs / s")
    ax.set_title(title or f"{result.meta.get('model', '')} on {spec.name}")
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
