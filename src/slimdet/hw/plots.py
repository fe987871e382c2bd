"""Plots of modelled hardware costs as PNG bytes (matplotlib's Agg canvas, no pyplot)."""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from slimdet.hw.layers import LayerTable
from slimdet.hw.spec import HardwareSpec, SystolicSpec
from slimdet.report.plots import _png, _short


def breakdown_png(table: LayerTable, spec: HardwareSpec, *, top: int = 25) -> bytes:
    """Per-layer modelled latency (the ``top`` slowest GEMM layers, in network order) and the energy by
    component: compute vs stall cycles on a systolic array, compute / memory / overhead on a roofline."""
    fig = Figure(figsize=(11.0, 4.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax_e = fig.subplots(1, 2, width_ratios=[3, 1])
    names = [g.name for g in table.gemm]
    if isinstance(spec, SystolicSpec):
        from slimdet.hw.systolic import simulate

        sim = simulate(table, spec)
        parts = {"compute": sim.compute_cycles / spec.clock_hz * 1e6, "stall": sim.stall_cycles / spec.clock_hz * 1e6}
        energy = {"MAC": sim.mac_energy_pj.sum(), "SRAM": sim.sram_energy_pj.sum(), "DRAM": sim.dram_energy_pj.sum(),
                  "static": sim.static_energy_pj.sum()}  # fmt: skip
        total_ms, total_uj = sim.latency_s * 1e3, sim.energy_pj / 1e6
    else:
        from slimdet.hw.roofline import estimate

        est = estimate(table, spec)
        gemm = np.asarray(est.is_gemm, bool)
        parts = {"compute": np.asarray(est.compute_s)[gemm] * 1e6, "memory": np.asarray(est.memory_s)[gemm] * 1e6,
                 "overhead": np.asarray(est.overhead_s)[gemm] * 1e6}  # fmt: skip
        # a roofline layer takes the larger of compute and memory: show the binding one
        bound = parts["compute"] >= parts["memory"]
        parts = {"compute-bound": np.where(bound, parts["compute"], 0),
                 "memory-bound": np.where(bound, 0, parts["memory"]), "overhead": parts["overhead"]}  # fmt: skip
        lat = np.asarray(est.latency_s)
        energy = {"GEMM layers": float(np.asarray(est.energy_j)[gemm].sum() * 1e12),
                  "other ops": float(np.asarray(est.energy_j)[~gemm].sum() * 1e12)}  # fmt: skip
        total_ms, total_uj = float(lat.sum()) * 1e3, sum(energy.values()) / 1e6
    per_layer = sum(parts.values())
    keep = np.sort(np.argsort(per_layer)[::-1][:top])
    bottom = np.zeros(len(keep))
    for label, values in parts.items():
        ax.bar(range(len(keep)), values[keep], bottom=bottom, label=label)
        bottom += values[keep]
    ax.set_xticks(range(len(keep)), [_short(names[i], 28) for i in keep], rotation=70, fontsize=7, ha="right")
    ax.set_ylabel("modelled latency (µs)")
    ax.set_title(f"{spec.name}: {total_ms:.3f} ms, {total_uj:,.0f} µJ per image (top {len(keep)} layers)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    labels = list(energy)
    ax_e.bar(labels, [energy[k] / 1e6 for k in labels], color="#c05621")
    ax_e.set_ylabel("energy (µJ)")
    ax_e.set_title("energy by component", fontsize=10)
    ax_e.tick_params(axis="x", labelsize=8, rotation=30)
    return _png(fig)
