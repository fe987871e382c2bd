"""One entry point to the cost models: modelled latency and energy of a layer table on any spec.

A systolic accelerator (:mod:`slimdet.hw.systolic`) runs the GEMM layers; the element-wise ops and
the post-processing are left to the host (see :mod:`slimdet.schedule`), so they cost nothing here.
A roofline device (:mod:`slimdet.hw.roofline`) runs everything, so its element-wise ops are a fixed
cost next to the GEMMs. Search code (pruning to a latency, bit allocation under a latency or energy
budget, design-space exploration) calls :func:`gemm_costs` and :func:`model_cost` and never needs
to know which kind of device it is pricing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slimdet.hw.layers import LayerTable
from slimdet.hw.spec import HardwareSpec, RooflineSpec, SystolicSpec


@dataclass(frozen=True)
class Costs:
    """Per-GEMM-layer modelled latency and energy (aligned with ``table.gemm``) and the fixed rest."""

    latency_s: np.ndarray
    energy_pj: np.ndarray
    other_latency_s: float = 0.0  # element-wise ops and post-processing (roofline devices only)
    other_energy_pj: float = 0.0

    @property
    def total_latency_s(self) -> float:
        return float(self.latency_s.sum()) + self.other_latency_s

    @property
    def total_energy_pj(self) -> float:
        return float(self.energy_pj.sum()) + self.other_energy_pj


def gemm_costs(table: LayerTable, spec: HardwareSpec) -> Costs:
    """Modelled latency and energy of every GEMM layer of ``table`` on ``spec`` (and the fixed rest)."""
    if isinstance(spec, SystolicSpec):
        from slimdet.hw.systolic import simulate

        sim = simulate(table, spec)
        return Costs(latency_s=np.asarray(sim.layer_latency_s, float), energy_pj=np.asarray(sim.layer_energy_pj, float))
    if isinstance(spec, RooflineSpec):
        from slimdet.hw.roofline import estimate

        est = estimate(table, spec)
        gemm = np.asarray(est.is_gemm, bool)
        energy_pj = np.asarray(est.energy_j, float) * 1e12
        return Costs(latency_s=np.asarray(est.latency_s, float)[gemm], energy_pj=energy_pj[gemm],
                     other_latency_s=float(np.asarray(est.latency_s, float)[~gemm].sum()),
                     other_energy_pj=float(energy_pj[~gemm].sum()))  # fmt: skip
    raise TypeError(f"no cost model for {type(spec).__name__}")


def model_cost(table: LayerTable, spec: HardwareSpec) -> tuple[float, float]:
    """(latency_s, energy_pj) of the whole table on ``spec``."""
    costs = gemm_costs(table, spec)
    return costs.total_latency_s, costs.total_energy_pj


def channel_granularity(spec: HardwareSpec) -> int:
    """Output channels the device processes side by side: a width below a multiple of it saves nothing.

    Systolic arrays map output channels (the GEMM's N) onto columns in the ws and os dataflows;
    roofline devices onto SIMD lanes / tensor-core tiles (``channel_multiple``).
    """
    if isinstance(spec, SystolicSpec):
        return spec.cols
    return spec.channel_multiple
