"""Detector awareness: find, by measurement, the tail tensors where low precision breaks detection.

A detector's last layers are unlike a classifier's: box regression (here distributions over
distance bins, decoded by a softmax), class logits read through a sigmoid at a 0.001 threshold,
and the concatenation of both into one output tensor with a shared grid. Which of them cannot
live on an 8-bit (or narrower) grid depends on the model and its data, so it is measured: the
candidates are the tensors within ``depth`` conv layers of the graph outputs, each is switched back
to float alone, and the ones that remove a real share of the detection-loss increase caused by
quantization are kept in float, greedily, with the measured reason recorded. Decoding and NMS run
in ``postprocess`` in float, outside the quantized graph.
"""

from __future__ import annotations

import re

import torch.fx as fx
from tqdm.auto import tqdm

from slimdet.compress.importance import Calib, calib_loss
from slimdet.compress.quant.graph import Point, QuantConv2d, QuantLinear, float_mode, quantizers
from slimdet.compress.quant.quantizers import Mode
from slimdet.models.base import Detector


def tail_units(model: Detector, points: list[Point], depth: int = 2) -> dict[str, list[str]]:
    """Candidate units (a layer's weight and outputs, or one op's output) near the graph outputs.

    Walks back from the outputs; crossing a conv/linear costs one level of ``depth``.
    """
    gm = model._quant_graph
    modules = dict(gm.named_modules())
    out = next(n for n in gm.graph.nodes if n.op == "output")
    found: set[str] = set()
    frontier: list[tuple[fx.Node, int]] = [(n, depth) for n in out.all_input_nodes]
    seen: set[fx.Node] = set()
    while frontier:
        node, left = frontier.pop()
        if node in seen or left <= 0:
            continue
        seen.add(node)
        if node.op == "call_module" and node.target.startswith("quant."):
            found.add(node.target.split(".", 1)[1])
        elif node.op == "call_module" and isinstance(modules.get(node.target), (QuantConv2d, QuantLinear)):
            layer = modules[node.target]
            found.add(next(k for k, q in quantizers(model).items() if q is layer.weight_quant))
            left -= 1
        frontier.extend((a, left) for a in node.all_input_nodes)
    units: dict[str, list[str]] = {}
    for p in points:
        if p.key in found and p.kind != "shared":
            units.setdefault(re.split(r"[/:]", p.label, maxsplit=1)[0] if ":" in p.label else p.label, []).append(p.key)
    return units


def auto_keep(
    model: Detector,
    points: list[Point],
    batches: Calib,
    *,
    min_gain: float = 0.05,
    max_keep: int = 6,
    tolerance: float = 0.0,
    depth: int = 2,
    measure_batches: int = 2,
    weights: bool = True,
    progress: bool = True,
) -> dict[str, str]:
    """Switch to float the tail units whose quantization costs the most detection loss.

    Returns {unit label: reason}. ``min_gain`` is the fraction of the loss increase (quantized minus
    float, on ``measure_batches`` calibration batches) that keeping a unit in float must remove.
    ``tolerance``: a relative loss increase ((quantized - float) / float) the detector tolerates; at or
    below it nothing (more) is kept in float, since every float island costs run time (Q/DQ and
    layout changes around it) and buys no accuracy there.
    With ``weights=False`` only activations are candidates (under a mixed-precision budget the
    integer program decides the weights' precision).
    """
    qs = quantizers(model)
    batches = list(batches)[:measure_batches]
    units = {}
    for unit, keys in tail_units(model, points, depth).items():
        # tensors already float (the user's list, float_outputs) are no candidates; the rest of the unit is
        keys = [k for k in keys if (weights or qs[k].kind != "weight") and qs[k].mode == Mode.QUANT]
        if keys:
            units[unit] = keys
    with float_mode(model):
        loss_float = calib_loss(model, batches)
    loss_quant = calib_loss(model, batches)
    increase = loss_quant - loss_float
    if increase <= tolerance * abs(loss_float) or not units:
        return {}

    def without(keys: list[str]) -> float:
        for k in keys:
            qs[k].mode = Mode.OFF
        try:
            return calib_loss(model, batches)
        finally:
            for k in keys:
                qs[k].mode = Mode.QUANT

    gains = {u: (loss_quant - without(keys)) / increase
             for u, keys in tqdm(units.items(), desc="auto-keep", unit="tensor", disable=not progress)}  # fmt: skip
    kept: dict[str, str] = {}
    current = loss_quant
    for unit in sorted(gains, key=gains.get, reverse=True):
        if len(kept) >= max_keep or gains[unit] < min_gain or current - loss_float <= tolerance * abs(loss_float):
            break
        for k in units[unit]:
            qs[k].mode = Mode.OFF
        new = calib_loss(model, batches)
        if (current - new) / increase < min_gain / 2:  # no longer helps once others are float
            for k in units[unit]:
                qs[k].mode = Mode.QUANT
            continue
        share = (current - new) / increase
        kept[unit] = (
            f"measured: float here removes {share:.0%} of the detection-loss increase from quantization "
            f"(calibration loss {current:.4f} -> {new:.4f}; float model {loss_float:.4f})"
        )
        current = new
    return kept
