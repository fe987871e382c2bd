"""The systolic-array accelerator model: cycles, stalls, SRAM/DRAM traffic and energy of every GEMM layer.

``simulate(layers, spec)`` is pure and vectorized with NumPy over the layers (one call for a whole
model, no Python loop per layer in the default mode), so a search can price thousands of
(model, accelerator) pairs per second.

Mapping (the conventions of SCALE-Sim, Samajdar et al., ISPASS 2020, whose operand matrices are the
layer table's ``m x k`` input and ``k x n`` weights):

* **ws** (weight stationary): a ``k x n`` weight tile of ``rows x cols`` sits in the array, the ``m``
  input rows stream through; **os**: each PE accumulates one of ``rows x cols`` outputs (``m`` on rows,
  ``n`` on columns) while ``k`` streams; **is**: a ``k x m`` input tile of ``rows x cols`` sits in the
  array while the ``n`` weight columns stream.
* **Grouped / depthwise convs** run as ``groups`` independent GEMMs one after another, each on the
  whole array (SCALE-Sim's own depthwise convention: one layer per channel). A depthwise layer
  (``k = R*S``, ``n = 1``) therefore fills one column in ws/os and is slow, as on TPU-like arrays.
* **Precision.** The array computes on 8-bit lanes. Operands narrower than 8 bits are packed
  ``8 // bits`` per lane along the output channels (a PE holds ``8 // weight_bits`` weights of
  different output channels that share one input): the GEMM runs with ``n' = ceil(n / lanes)`` (so
  4-bit weights double the array's effective columns in ws/os and halve the streamed ``n`` in is).
  Only the weight width packs; activations narrower than 8 bits are widened to the lane. Operands
  wider than 8 bits are split into 8-bit slices (bit-serial passes): ``k' = k * ceil(wb/8) * ceil(ab/8)``.
  Widths the spec does not list run at ``spec.run_bits(bits)``; a float layer (32 bits) on an
  integer accelerator runs at the widest width the spec supports (it is assumed quantized for it).
  Traffic bytes scale with the operand bits (``word_bytes * bits / 8`` per element).
* **Zero skipping** (``spec.zero_skip``): compute cycles and MAC energy scale with the weight density
  ``1 - weight_sparsity`` — an idealized skip with no load imbalance; memory traffic is unchanged
  (weights are stored dense).
* **Stalls.** Buffers are double-buffered, so a layer's DRAM transfers overlap its compute: the layer
  takes ``max(compute, transfer)`` cycles, i.e. ``stall = max(0, dram_bytes / dram_bytes_per_cycle -
  compute_cycles)``. Buffer capacity enters through the DRAM traffic (see :mod:`slimdet.hw.dram`).
* **Energy** (pJ): MACs x ``spec.energy`` MAC energy (geometric mean of the entries at the weight and
  activation widths), SRAM bytes read/written (array accesses, DRAM fills and drains) x per-byte
  energies, DRAM bytes x per-byte energy, and static power x latency.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

import numpy as np

from slimdet.errors import ConfigError
from slimdet.hw.dram import layer_geometry, scalesim_dram_words, tiled_dram_bytes
from slimdet.hw.layers import GemmLayer, LayerTable
from slimdet.hw.spec import Dataflow, SystolicSpec


class DramModel(StrEnum):
    """How DRAM traffic is estimated (see :mod:`slimdet.hw.dram`)."""

    TILED = "tiled"  # tiling-aware from buffer capacities, never below compulsory traffic
    SCALESIM = "scalesim"  # SCALE-Sim v3 compatibility: its streaming-buffer counts and its SRAM accounting


_ARRAY_KEYS = ("m", "k", "n", "groups", "weight_bits", "act_bits", "weight_sparsity", "macs", "input_elements",
               "weight_elements", "output_elements")  # fmt: skip


@dataclass(frozen=True)
class SimResult:
    """Per-layer arrays (aligned with ``names``) and totals of one :func:`simulate` call.

    Traffic is in bytes: SRAM reads/writes made by the array (``sram_*``) and DRAM transfers (``dram_*``).
    """

    names: tuple[str, ...]
    spec_name: str
    dram_model: str
    clock_hz: float
    row_folds: np.ndarray  # per group
    col_folds: np.ndarray  # per group
    compute_cycles: np.ndarray
    stall_cycles: np.ndarray
    layer_cycles: np.ndarray  # compute + stall
    utilization: np.ndarray  # useful MACs / (cycles x peak MACs per cycle at the layer's bits)
    macs: np.ndarray  # MACs executed (dense, or non-zero ones with zero skipping)
    sram_ifmap_read_bytes: np.ndarray
    sram_filter_read_bytes: np.ndarray
    sram_ofmap_write_bytes: np.ndarray
    sram_ofmap_read_bytes: np.ndarray  # partial sums read back to accumulate
    dram_ifmap_read_bytes: np.ndarray
    dram_filter_read_bytes: np.ndarray
    dram_ofmap_write_bytes: np.ndarray
    mac_energy_pj: np.ndarray
    sram_energy_pj: np.ndarray
    dram_energy_pj: np.ndarray
    static_energy_pj: np.ndarray

    @property
    def layer_latency_s(self) -> np.ndarray:
        return self.layer_cycles / self.clock_hz

    @property
    def layer_energy_pj(self) -> np.ndarray:
        return self.mac_energy_pj + self.sram_energy_pj + self.dram_energy_pj + self.static_energy_pj

    @property
    def layer_dram_bytes(self) -> np.ndarray:
        return self.dram_ifmap_read_bytes + self.dram_filter_read_bytes + self.dram_ofmap_write_bytes

    @property
    def cycles(self) -> int:
        return int(self.layer_cycles.sum())

    @property
    def compute_cycles_total(self) -> int:
        return int(self.compute_cycles.sum())

    @property
    def stall_cycles_total(self) -> int:
        return int(self.stall_cycles.sum())

    @property
    def latency_s(self) -> float:
        return self.cycles / self.clock_hz

    @property
    def energy_pj(self) -> float:
        return float(self.layer_energy_pj.sum())

    @property
    def dram_bytes(self) -> float:
        return float(self.layer_dram_bytes.sum())

    @property
    def total_utilization(self) -> float:
        """MAC-weighted utilization of the whole run: sum of useful MACs over sum of peak MACs."""
        peak = self.macs / np.maximum(self.utilization, 1e-30)
        return float(self.macs.sum() / peak.sum()) if len(self.names) else 0.0

    def totals(self) -> dict[str, float]:
        return {"cycles": self.cycles, "compute_cycles": self.compute_cycles_total,
                "stall_cycles": self.stall_cycles_total, "latency_s": self.latency_s, "energy_pj": self.energy_pj,
                "mac_energy_pj": float(self.mac_energy_pj.sum()), "sram_energy_pj": float(self.sram_energy_pj.sum()),
                "dram_energy_pj": float(self.dram_energy_pj.sum()),
                "static_energy_pj": float(self.static_energy_pj.sum()), "dram_bytes": self.dram_bytes,
                "utilization": self.total_utilization}  # fmt: skip

    def to_text(self) -> str:
        """The per-layer table and the totals, as aligned plain text."""
        head = (f"{'layer':<36} {'folds':>9} {'compute cyc':>12} {'stall cyc':>10} {'util':>5} {'latency us':>11} "
                f"{'energy uJ':>10} {'DRAM kB':>9}")  # fmt: skip
        lines = [f"{self.spec_name}: {len(self.names)} GEMM layers, DRAM model {self.dram_model}", head]
        for i, name in enumerate(self.names):
            folds = f"{int(self.row_folds[i])}x{int(self.col_folds[i])}"
            lines.append(f"{name[-36:]:<36} {folds:>9} {int(self.compute_cycles[i]):>12} "
                         f"{int(self.stall_cycles[i]):>10} {self.utilization[i]:>5.2f} "
                         f"{self.layer_latency_s[i] * 1e6:>11.2f} {self.layer_energy_pj[i] * 1e-6:>10.3f} "
                         f"{self.layer_dram_bytes[i] / 1e3:>9.1f}")  # fmt: skip
        t = self.totals()
        lines += [
            f"total: {t['cycles']} cycles ({t['compute_cycles']} compute + {t['stall_cycles']} stall), "
            f"latency {t['latency_s'] * 1e3:.4f} ms, energy {t['energy_pj'] * 1e-6:.2f} uJ "
            f"(MAC {t['mac_energy_pj'] * 1e-6:.2f}, SRAM {t['sram_energy_pj'] * 1e-6:.2f}, "
            f"DRAM {t['dram_energy_pj'] * 1e-6:.2f}, static {t['static_energy_pj'] * 1e-6:.2f}), "
            f"utilization {t['utilization']:.1%}, DRAM {t['dram_bytes'] / 1e6:.3f} MB",
        ]
        return "\n".join(lines)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per layer (plain Python numbers), for tables and JSON."""
        arrays = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), np.ndarray)}
        arrays["latency_s"] = self.layer_latency_s
        arrays["energy_pj"] = self.layer_energy_pj
        out = []
        for i, name in enumerate(self.names):
            row: dict[str, Any] = {"name": name}
            for key, values in arrays.items():
                v = values[i].item()
                row[key] = int(v) if isinstance(v, float) and v.is_integer() and key != "utilization" else v
            out.append(row)
        return out


def simulate(layers: LayerTable | Sequence[GemmLayer], spec: SystolicSpec, *,
             dram: DramModel | str = DramModel.TILED) -> SimResult:  # fmt: skip
    """Model every GEMM layer of ``layers`` on the systolic array ``spec``.

    Args:
        layers: a :class:`LayerTable` (its ``.arrays`` are used) or a sequence of :class:`GemmLayer`.
        spec: the accelerator.
        dram: ``"tiled"`` (default): a tiling-aware DRAM estimate from the buffer capacities;
            ``"scalesim"``: SCALE-Sim v3's streaming-buffer DRAM counts and SRAM accounting, to compare with it
            (needs the conv geometry of each layer, so it is slower).

    Raises:
        ConfigError: ``spec`` is not a systolic spec, or ``dram`` is not a known model.
    """
    if not isinstance(spec, SystolicSpec):
        raise ConfigError(f"simulate: spec {getattr(spec, 'name', spec)!r} is a {type(spec).__name__}; "
                          "expected a systolic spec (roofline devices go to slimdet.hw.roofline)")  # fmt: skip
    try:
        mode = DramModel(dram)
    except ValueError:
        raise ConfigError(f"simulate: dram: expected one of {[m.value for m in DramModel]}, got {dram!r}") from None
    table = layers if isinstance(layers, LayerTable) else LayerTable(gemm=tuple(layers))
    a = table.arrays
    names = tuple(g.name for g in table.gemm)
    f64 = {key: a[key].astype(np.float64) for key in _ARRAY_KEYS}
    m, k, n, groups = f64["m"], f64["k"], f64["n"], f64["groups"]
    rows, cols = float(spec.rows), float(spec.cols)

    # precision: run widths, lanes packed along n (narrow weights), bit-serial passes along k (wide operands)
    wbits, abits = _run_bits(a["weight_bits"], spec), _run_bits(a["act_bits"], spec)
    lanes = np.where(wbits < 8, 8 // wbits, 1).astype(np.float64)
    passes = (np.ceil(wbits / 8) * np.ceil(abits / 8)).astype(np.float64)
    n_eff, k_eff = np.ceil(n / lanes), k * passes

    # SCALE-Sim v3 (compute/systolic_compute_{ws,os,is}.py): folds, cycles of one fold, SRAM accesses per group
    if spec.dataflow == Dataflow.WS:
        row_folds, col_folds = np.ceil(k_eff / rows), np.ceil(n_eff / cols)
        fold_cycles = 2 * rows + cols + m - 2  # weights load (rows), inputs stream (m), skew fill/drain
        ifmap_words, filter_words, ofmap_words = col_folds * m * k_eff, k_eff * n_eff, row_folds * m * n_eff
    elif spec.dataflow == Dataflow.OS:
        row_folds, col_folds = np.ceil(m / rows), np.ceil(n_eff / cols)
        fold_cycles = rows + cols + k_eff - 2  # k streams in, skew fill/drain
        ifmap_words, filter_words, ofmap_words = col_folds * m * k_eff, row_folds * k_eff * n_eff, m * n_eff
    else:
        row_folds, col_folds = np.ceil(k_eff / rows), np.ceil(m / cols)
        fold_cycles = 2 * rows + cols + n_eff - 2  # inputs load (rows), n streams, skew fill/drain
        ifmap_words, filter_words, ofmap_words = m * k_eff, col_folds * k_eff * n_eff, row_folds * m * n_eff
    psum_words = ofmap_words - m * n_eff  # partial sums written before the last row fold, read back
    if mode == DramModel.SCALESIM and spec.dataflow == Dataflow.OS:
        ofmap_words = ofmap_words + row_folds * col_folds * (rows + cols)  # SCALE-Sim v3 counts R + C more per fold

    density = 1.0 - f64["weight_sparsity"] if spec.zero_skip else np.ones_like(m)
    compute_cycles = np.ceil(groups * row_folds * col_folds * fold_cycles * density)
    macs = f64["macs"] * density

    wb, ab = spec.word_bytes * wbits / 8, spec.word_bytes * abits / 8  # bytes per weight / activation element
    sram_if = groups * ifmap_words * spec.word_bytes
    sram_f = groups * filter_words * spec.word_bytes
    out_bytes = lanes * ab  # one packed ofmap word holds `lanes` outputs
    sram_of_w = groups * ofmap_words * out_bytes
    sram_of_r = groups * psum_words * out_bytes

    if mode == DramModel.TILED:
        dram_if, dram_f, dram_of = tiled_dram_bytes(
            m=m, k=k_eff, n=n_eff, groups=groups, input_bytes=f64["input_elements"] * ab,
            weight_bytes=f64["weight_elements"] * wb, output_bytes=f64["output_elements"] * ab, spec=spec,
        )  # fmt: skip
    else:
        geo = layer_geometry(table.gemm)
        if_w, f_w, of_w = scalesim_dram_words(geo, m=m, k=k_eff, n=n_eff, spec=spec)
        dram_if, dram_f, dram_of = groups * if_w * ab, groups * f_w * spec.word_bytes, groups * of_w * out_bytes

    transfer_cycles = (dram_if + dram_f + dram_of) / spec.dram_bytes_per_cycle
    stall_cycles = np.ceil(np.maximum(0.0, transfer_cycles - compute_cycles))
    layer_cycles = compute_cycles + stall_cycles
    peak_per_cycle = rows * cols * lanes / passes
    utilization = macs / np.maximum(layer_cycles * peak_per_cycle, 1.0)

    e = spec.energy
    mac_pj = macs * np.sqrt(_mac_pj(wbits, spec) * _mac_pj(abits, spec))
    sram_read_bytes = sram_if + sram_f + sram_of_r + dram_of  # array reads + drains to DRAM
    sram_write_bytes = sram_of_w + dram_if + dram_f  # array writes + fills from DRAM
    sram_pj = sram_read_bytes * e.sram_read_pj_per_byte + sram_write_bytes * e.sram_write_pj_per_byte
    dram_pj = (dram_if + dram_f + dram_of) * e.dram_pj_per_byte
    static_pj = spec.static_power_w * layer_cycles / spec.clock_hz * 1e12
    return SimResult(
        names=names, spec_name=spec.name, dram_model=mode.value, clock_hz=spec.clock_hz, row_folds=row_folds,
        col_folds=col_folds, compute_cycles=compute_cycles, stall_cycles=stall_cycles, layer_cycles=layer_cycles,
        utilization=utilization, macs=macs, sram_ifmap_read_bytes=sram_if, sram_filter_read_bytes=sram_f,
        sram_ofmap_write_bytes=sram_of_w, sram_ofmap_read_bytes=sram_of_r, dram_ifmap_read_bytes=dram_if,
        dram_filter_read_bytes=dram_f, dram_ofmap_write_bytes=dram_of, mac_energy_pj=mac_pj, sram_energy_pj=sram_pj,
        dram_energy_pj=dram_pj, static_energy_pj=static_pj,
    )  # fmt: skip


def _run_bits(bits: np.ndarray, spec: SystolicSpec) -> np.ndarray:
    """Vectorized ``spec.run_bits``: the narrowest supported width >= bits, else the widest supported."""
    supported = np.asarray(spec.bits, dtype=np.int64)
    idx = np.searchsorted(supported, bits, side="left")
    return supported[np.minimum(idx, len(supported) - 1)].astype(np.float64)


def _mac_pj(bits: np.ndarray, spec: SystolicSpec) -> np.ndarray:
    """MAC energy per layer at ``bits`` (already supported run widths)."""
    supported = np.asarray(spec.bits, dtype=np.float64)
    energies = np.asarray([spec.energy.mac_energy_pj(b) for b in spec.bits], dtype=np.float64)
    return energies[np.minimum(np.searchsorted(supported, bits), len(supported) - 1)]
