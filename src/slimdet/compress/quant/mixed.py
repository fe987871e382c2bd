"""Mixed precision: per-layer sensitivity, then the weight bits chosen by an integer program.

Sensitivity of layer i at b bits:

* ``hessian``: ``Tr(H_i) / n_i * ||Q_b(W_i) - W_i||^2``, the second-order estimate of the loss
  increase (HAWQ-v2/v3, Dong et al. 2020, Yao et al. 2021), traces by Hutchinson's method;
* ``distortion``: the measured detection-loss increase with only that layer at b bits.

The allocation itself (:func:`slimdet.search.mixed_precision.allocate_bits`) minimises the summed
sensitivity under budgets on weight bytes and bit-operations, relative to uniform W8A8.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from slimdet.compress.importance import Calib, calib_loss, eval_mode
from slimdet.compress.quant.config import QuantConfig
from slimdet.compress.quant.graph import Point, float_mode, quantizers
from slimdet.compress.quant.quantizers import Mode, Quantizer
from slimdet.models.base import Detector
from slimdet.profiling.macs import layer_table
from slimdet.search.mixed_precision import BitAllocation, allocate_bits, hutchinson_trace


def choose_bits(
    model: Detector, cfg: QuantConfig, points: list[Point], batches: Calib, *, progress: bool = True
) -> tuple[BitAllocation, dict[str, dict[int, float]]]:
    """Weight bits per layer under ``cfg``'s budgets; layers kept in float are fixed costs."""
    qs = quantizers(model)
    weights = [p for p in points if p.kind == "weight"]
    searched = [p for p in weights if qs[p.key].mode == Mode.QUANT and not qs[p.key].fp16]
    with eval_mode(model):
        macs = {r.name: r.macs for r in layer_table(model, model.example_inputs(1))}
    with float_mode(model):  # sensitivities of the float (BN-folded) model
        if cfg.sensitivity == "hessian":
            sens = _hessian(model, cfg, searched, batches[:2])
        else:
            sens = _distortion(model, cfg, searched, batches[:2], progress)

    costs: dict[str, dict[str, dict[int, float]]] = {}
    budgets: dict[str, float] = {}
    numel = {p.layer: model.get_submodule(p.layer).weight.numel() for p in weights}
    fixed_layers = [p for p in weights if p not in searched]
    if cfg.weight_bytes_ratio is not None:
        costs["weight_bytes"] = {p.layer: {b: numel[p.layer] * b / 8 for b in cfg.candidate_bits} for p in searched}
        fixed = sum(numel[p.layer] * (4 if qs[p.key].mode == Mode.OFF else qs[p.key].bits / 8) for p in fixed_layers)
        budgets["weight_bytes"] = cfg.weight_bytes_ratio * sum(numel.values()) - fixed
    if cfg.bitops_ratio is not None:
        costs["bitops"] = {p.layer: {b: macs.get(p.layer, 0) * b * 8 for b in cfg.candidate_bits} for p in searched}
        budgets["bitops"] = cfg.bitops_ratio * sum(macs.get(p.layer, 0) * 64 for p in weights)
    if cfg.latency_ratio is not None or cfg.energy_ratio is not None:
        hw_costs, hw_budgets = _hardware_budgets(model, cfg, searched, fixed_layers)
        costs.update(hw_costs)
        budgets.update(hw_budgets)
    allocation = allocate_bits(sens, costs, budgets)
    return allocation, sens


def _hardware_budgets(
    model: Detector, cfg: QuantConfig, searched: list[Point], fixed_layers: list[Point]
) -> tuple[dict[str, dict[str, dict[int, float]]], dict[str, float]]:
    """Per-layer modelled latency (s) and energy (pJ) at each candidate weight bit-width on ``cfg.device``
    (HAQ, Wang et al., CVPR 2019: hardware feedback instead of proxies), and the budgets: the given
    fractions of uniform W8A8 on the same device. Activations stay at ``cfg.act_bits``; the layers kept
    out of the search (float or fixed by the user) are a fixed cost taken off the budgets."""
    from slimdet.hw.cost import gemm_costs
    from slimdet.hw.layers import layer_table as hw_layer_table
    from slimdet.hw.spec import load_spec

    spec = load_spec(cfg.device)  # type: ignore[arg-type]
    qs = quantizers(model)
    with float_mode(model), eval_mode(model):
        table = hw_layer_table(model, model.example_inputs(1), postprocess=False)
    rows = {g.name: i for i, g in enumerate(table.gemm)}
    searched_layers = [p.layer for p in searched if p.layer in rows]
    fixed_bits = {p.layer: (32 if qs[p.key].mode == Mode.OFF else qs[p.key].bits) for p in fixed_layers}
    per_bits = {}
    for b in sorted({*cfg.candidate_bits, 8}):
        weight_bits = {**dict.fromkeys(rows, b), **fixed_bits}
        per_bits[b] = gemm_costs(table.with_bits(weight_bits=weight_bits, act_bits=cfg.act_bits), spec)
    tables: dict[str, dict[str, dict[int, float]]] = {}
    budgets: dict[str, float] = {}
    for resource, ratio, pick in (("latency_s", cfg.latency_ratio, lambda c: c.latency_s),
                                  ("energy_pj", cfg.energy_ratio, lambda c: c.energy_pj)):  # fmt: skip
        if ratio is None:
            continue
        tables[resource] = {layer: {b: float(pick(per_bits[b])[rows[layer]]) for b in cfg.candidate_bits}
                            for layer in searched_layers}  # fmt: skip
        int8 = per_bits[8]
        other = int8.other_latency_s if resource == "latency_s" else int8.other_energy_pj
        uniform = float(pick(int8).sum()) + other
        not_searched = [i for name, i in rows.items() if name not in searched_layers]
        budgets[resource] = ratio * uniform - float(pick(int8)[not_searched].sum()) - other
    return tables, budgets


def _grid_error(w: torch.Tensor, q: Quantizer, bits: int) -> float:
    probe = Quantizer(bits, signed=q.signed, symmetric=q.symmetric, channels=q.channels, narrow=q.narrow)
    probe.fit_weight(w, "mse" if bits < 8 else "minmax")
    probe.eval()
    with torch.no_grad():
        return float((probe(w) - w).pow(2).sum())


def _hessian(model: Detector, cfg: QuantConfig, searched: list[Point], batches: Calib) -> dict[str, dict[int, float]]:
    qs = quantizers(model)
    params = {p.layer: model.get_submodule(p.layer).weight for p in searched}

    def loss_fn() -> torch.Tensor:
        return sum(model.compute_loss(images, targets)[0] for images, targets in batches) / len(batches)

    with eval_mode(model):
        traces = hutchinson_trace(loss_fn, params, samples=16)
    out: dict[str, dict[int, float]] = {}
    for p in searched:
        w = params[p.layer]
        mean_trace = max(traces[p.layer], 0.0) / w.numel()
        out[p.layer] = {b: mean_trace * _grid_error(w, qs[p.key], b) for b in cfg.candidate_bits}
    return out


@torch.no_grad()
def _distortion(
    model: Detector, cfg: QuantConfig, searched: list[Point], batches: Calib, progress: bool
) -> dict[str, dict[int, float]]:
    base = calib_loss(model, batches)
    out: dict[str, dict[int, float]] = {}
    for p in tqdm(searched, desc="sensitivity", unit="layer", disable=not progress):
        layer = model.get_submodule(p.layer)
        original = layer.weight_quant
        out[p.layer] = {}
        for b in cfg.candidate_bits:
            probe = Quantizer(b, signed=original.signed, symmetric=original.symmetric, channels=original.channels,
                              narrow=original.narrow)  # fmt: skip
            probe.fit_weight(layer.weight, "mse" if b < 8 else "minmax")
            layer.weight_quant = probe
            try:
                out[p.layer][b] = max(calib_loss(model, batches) - base, 0.0)
            finally:
                layer.weight_quant = original
    return out

