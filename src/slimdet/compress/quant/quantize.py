"""``quantize(model, QuantConfig(...), calib=...) -> QuantResult``: simulated quantization of a detector.

Steps, in order: trace and fold BN, place quantizers (:mod:`.graph`); with a mixed-precision
budget, measure each layer's sensitivity and choose its weight bits by an integer program
(:mod:`.mixed`); calibrate activation ranges on the calibration batches (SiLU inputs clipped where
SiLU's output stops mattering; each concatenation and its inputs on one grid) and fit the weight grids;
learned rounding for low-bit weights and bias correction (:mod:`.ptq`); find the tail layers where
low precision breaks detection and keep them in float (:mod:`.keep`). The model records the
resolved per-tensor settings, so ``load_model`` rebuilds the same quantized graph.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from slimdet.compress.importance import Calib, calib_loss, eval_mode
from slimdet.compress.quant.calibrate import RangeObserver, calibrate
from slimdet.compress.quant.config import Granularity, QuantConfig
from slimdet.compress.quant.graph import (
    Point,
    build,
    concatenations,
    float_mode,
    grid_root,
    output_keys,
    quantizers,
    set_mode,
    silu_inputs,
)
from slimdet.compress.quant.quantizers import Mode, Quantizer, ScaleType
from slimdet.errors import CheckpointError, ConfigError
from slimdet.models.base import Detector
from slimdet.models.registry import record_transform, refuse_after_final, register_replay

RECORD_VERSION = 1


@dataclass(frozen=True)
class QuantResult:
    """What quantization did: bits per layer, what was kept in float and why, and the cost."""

    config: dict[str, Any]
    weight_bits: dict[str, int]  # conv/linear -> weight bits (32: kept float)
    act_bits: dict[str, int]  # activation label -> bits (32: kept float)
    kept_float: dict[str, str]  # label -> why it was kept in float
    folded_bn: tuple[str, ...]
    weight_bytes: float  # weights at their chosen bits (float layers at 4 bytes per weight)
    weight_bytes_int8: float  # the same weights all at 8 bits
    weight_bytes_fp32: float
    bitops: float  # sum over layers of MACs x weight bits x input bits
    bitops_w8a8: float
    calib_loss_float: float
    calib_loss_quant: float
    time_s: float
    record: dict[str, Any]
    allocation: dict[str, Any] | None = None  # the mixed-precision solution, when searched
    sensitivity: dict[str, dict[int, float]] | None = None
    steps: dict[str, Any] = field(default_factory=dict)  # adaround / bias correction summaries

    @property
    def weight_bytes_ratio(self) -> float:
        return self.weight_bytes / self.weight_bytes_int8

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weight_bytes_ratio"] = self.weight_bytes_ratio
        if self.sensitivity is not None:
            d["sensitivity"] = {k: {str(b): v for b, v in s.items()} for k, s in self.sensitivity.items()}
        return d

    def to_text(self) -> str:
        lines = [
            f"quantized: weights {self.weight_bytes / 1e3:,.1f} kB ({self.weight_bytes_ratio:.1%} of int8, "
            f"{self.weight_bytes / self.weight_bytes_fp32:.1%} of fp32), bitops {self.bitops / self.bitops_w8a8:.1%} "
            f"of W8A8; calibration loss {self.calib_loss_float} -> {self.calib_loss_quant}",
            f"kept in float: {', '.join(self.kept_float) or 'nothing'}",
        ]
        lines += [f"  {k}: {v}" for k, v in self.kept_float.items()]
        lines.append(f"{'layer':<48} {'w bits':>6}")
        lines += [f"{n[:48]:<48} {b:>6}" for n, b in self.weight_bits.items()]
        return "\n".join(lines)


def quantize(model: Detector, cfg: QuantConfig, *, calib: Calib | None, progress: bool = True) -> QuantResult:
    """Quantize ``model`` in place (simulated: fake quantizers) and record how.

    Args:
        model: a registered detector whose forward torch.fx can trace.
        cfg: bit-widths, grids, calibrator, overrides, budgets.
        calib: (images, targets) batches; the first ``cfg.calib_batches`` calibrate the ranges and
            drive the sensitivity, AdaRound, bias correction and auto-keep measurements. Targets
            are used by the loss-based measurements only.
        progress: progress bars for the longer phases.

    Raises:
        ConfigError: no calibration data, an untraceable model, an override that matches nothing,
            an unreachable mixed-precision budget.
    """
    refuse_after_final(model, "quantize")
    start = time.perf_counter()
    batches = list(calib or [])[: cfg.calib_batches]
    if not batches:
        raise ConfigError("quantize needs calibration batches: pass calib=[(images, targets), ...]")
    _check_patterns(model, cfg)
    specs: dict[str, dict[str, Any]] = {}

    def make(point: Point) -> Quantizer:
        spec = _spec(cfg, point)
        specs[point.key] = spec
        return _quantizer(spec)

    points, folded = build(model, make)  # an untraceable model fails here, before any measurement
    with float_mode(model):
        loss_float = calib_loss(model, batches)  # the folded float model computes what the original did
    for p in points:  # patterns of the user's keep list and float overrides: off from the start
        if cfg.kept_float(p.label) or (p.layer and cfg.kept_float(p.layer)):
            quantizers(model)[p.key].mode = Mode.OFF

    steps: dict[str, Any] = {}
    kept = {p.label: "user: keep_float / override" for p in points
            if p.kind != "shared" and quantizers(model)[p.key].mode == Mode.OFF}  # fmt: skip
    if cfg.float_outputs:
        kept.update(_float_outputs(model, points))
    if cfg.runtime_aware:
        from slimdet.compress.quant.runtime import runtime_fallback

        kept.update(runtime_fallback(model, progress=progress))
    allocation = sensitivity = None
    if cfg.mixed_precision:
        # Float activations of the tail are found first (at the default bits); the weights' precision
        # is then the integer program's to choose, under the budget.
        _calibrate(model, cfg, points, batches, progress, steps)
        kept.update(_auto_keep(model, cfg, points, batches, progress, weights=False))
        from slimdet.compress.quant.mixed import choose_bits

        allocation, sensitivity = choose_bits(model, cfg, points, batches, progress=progress)
        for layer, bits in allocation.bits.items():
            key = next(p.key for p in points if p.kind == "weight" and p.layer == layer)
            specs[key] = {**specs[key], "bits": bits}
            _replace_quantizer(model, key, _quantizer(specs[key]))

    _calibrate(model, cfg, points, batches, progress, steps)
    from slimdet.compress.quant import ptq

    low_bits = any(s["bits"] < 8 for s in specs.values() if s["kind"] == "weight")
    if cfg.adaround if cfg.adaround is not None else low_bits:
        max_bits = 8 if cfg.adaround else 7  # asked for explicitly: every grid, int8 included
        steps["adaround"] = ptq.adaround(model, points, batches, iters=cfg.adaround_iters, max_bits=max_bits,
                                         progress=progress)  # fmt: skip
    if cfg.bias_correction:
        steps["bias_correction"] = ptq.bias_correction(model, points, batches)
    if not cfg.mixed_precision:
        kept.update(_auto_keep(model, cfg, points, batches, progress))
    if cfg.qat:
        for q in quantizers(model).values():
            q.scale.requires_grad_(q.source is None and q.scale_type in (ScaleType.UNIFORM, ScaleType.POW2))

    record = {
        "kind": "quantize",
        "version": RECORD_VERSION,
        "folded_bn": folded,
        "specs": specs,
        "modes": {k: str(q.mode) for k, q in quantizers(model).items()},
        "qat": cfg.qat,
    }
    record_transform(model, record)
    costs = cost_summary(model, points)
    return QuantResult(
        config=cfg.model_dump(mode="json"),
        weight_bits=costs.pop("weight_bits"),
        act_bits=costs.pop("act_bits"),
        kept_float=kept,
        folded_bn=tuple(folded),
        **costs,
        calib_loss_float=loss_float,
        calib_loss_quant=calib_loss(model, batches),
        time_s=time.perf_counter() - start,
        record=record,
        allocation=allocation.to_dict() if allocation is not None else None,
        sensitivity=sensitivity,
        steps=steps,
    )


def _float_outputs(model: Detector, points: list[Point]) -> dict[str, str]:
    """Switch the raw predictions' quantizers off; returns {label: reason} for those that were on."""
    qs, outputs = quantizers(model), output_keys(model)
    kept = {}
    for p in points:
        if p.key in outputs and qs[p.key].mode != Mode.OFF:
            qs[p.key].mode = Mode.OFF
            if p.kind != "shared":
                kept[p.label] = ("prediction read by the float decoder (float_outputs): an 8-bit grid would make "
                                 "the class scores tie across images; its conv returns the dequantized "
                                 "accumulator")  # fmt: skip
    return kept


def _auto_keep(
    model: Detector, cfg: QuantConfig, points: list[Point], batches: Calib, progress: bool, *, weights: bool = True
) -> dict[str, str]:
    if not cfg.auto_keep or cfg.auto_keep_max == 0:
        return {}
    from slimdet.compress.quant.keep import auto_keep

    return auto_keep(model, points, batches, min_gain=cfg.auto_keep_min_gain, max_keep=cfg.auto_keep_max,
                     tolerance=cfg.auto_keep_tolerance, weights=weights, progress=progress)  # fmt: skip


@register_replay("quantize")
def replay_quantize(model: Detector, entry: dict[str, Any]) -> Detector:
    """Rebuild the quantized graph from its record (``load_model``); scales come with the state dict."""
    if entry.get("version") != RECORD_VERSION:
        raise CheckpointError(f"quantize record version {entry.get('version')!r} is not {RECORD_VERSION}")
    specs, modes = entry["specs"], entry["modes"]
    missing: list[str] = []

    def make(point: Point) -> Quantizer:
        if point.key not in specs:
            missing.append(point.key)
            return _quantizer({"kind": point.kind, "bits": 8, "signed": False, "symmetric": False,
                               "channels": None, "scale_type": "uniform", "narrow": False})  # fmt: skip
        return _quantizer(specs[point.key])

    build(model, make)
    if missing or set(specs) != set(quantizers(model)):
        raise CheckpointError(
            f"quantize record does not fit model {model.model_config.get('name')!r}: "
            f"{len(missing)} tensors of the traced graph are not in the record, "
            f"{len(set(specs) - set(quantizers(model)))} recorded tensors are not in the graph"
        )
    for key, q in quantizers(model).items():
        q.mode = Mode(modes[key])
        if entry.get("qat"):
            q.scale.requires_grad_(q.source is None and q.scale_type in (ScaleType.UNIFORM, ScaleType.POW2))
    return model


def _spec(cfg: QuantConfig, point: Point) -> dict[str, Any]:
    name = point.layer or point.label
    over = cfg.layer(name)
    if point.kind == "weight":
        bits = over.weight_bits or cfg.weight_bits
        scale_type = over.scale_type or cfg.scale_type
        if bits == 1:
            scale_type = ScaleType.BINARY
        elif scale_type == ScaleType.BINARY:
            scale_type = ScaleType.UNIFORM  # an override gave more bits to a layer of a binary model
        per_channel = (over.granularity or cfg.granularity) == Granularity.CHANNEL or scale_type == ScaleType.BINARY
        return {"kind": "weight", "bits": bits, "signed": cfg.weight_symmetric, "symmetric": cfg.weight_symmetric,
                "channels": point.shape[0] if per_channel else None, "scale_type": str(scale_type),
                "narrow": cfg.weight_symmetric}  # fmt: skip
    bits = over.act_bits or cfg.act_bits
    scale_type = ScaleType.POW2 if (over.scale_type or cfg.scale_type) == ScaleType.POW2 else ScaleType.UNIFORM
    return {"kind": point.kind, "bits": bits, "signed": cfg.act_symmetric, "symmetric": cfg.act_symmetric,
            "channels": None, "scale_type": str(scale_type), "narrow": False}  # fmt: skip


def _quantizer(spec: dict[str, Any]) -> Quantizer:
    q = Quantizer(spec["bits"], signed=spec["signed"], symmetric=spec["symmetric"], channels=spec["channels"],
                  scale_type=ScaleType(spec["scale_type"]), narrow=spec["narrow"])  # fmt: skip
    q.kind = spec["kind"]
    return q


def _replace_quantizer(model: Detector, key: str, new: Quantizer) -> None:
    old = quantizers(model)[key]
    new.label, new.kind, new.mode = old.label, old.kind, old.mode
    model.quant[key] = new
    for m in model.modules():
        if getattr(m, "weight_quant", None) is old:
            m.weight_quant = new
    holder = getattr(model._quant_graph, "quant", None)  # the traced graph calls activation quantizers only
    if holder is not None and hasattr(holder, key):
        setattr(holder, key, new)


@torch.no_grad()
def _calibrate(
    model: Detector, cfg: QuantConfig, points: list[Point], batches: Calib, progress: bool, steps: dict[str, Any]
) -> None:
    qs = quantizers(model)
    acts = [p for p in points if p.kind == "act" and qs[p.key].mode != Mode.OFF and not qs[p.key].fp16]
    with float_mode(model), eval_mode(model):  # statistics of the float activations
        for p in acts:
            qs[p.key].observer = RangeObserver()
            qs[p.key].mode = Mode.OBSERVE
        for images, _ in tqdm(batches, desc="calibrate", unit="batch", disable=not progress):
            model(images)
    options = dict(cfg.calibrator_options)
    outputs = output_keys(model)
    for p in acts:
        q = qs[p.key]
        # The raw predictions are never clipped: a clipped box logit moves a box, a clipped class
        # logit changes a score's rank. Every other tensor uses the configured calibrator.
        method, opts = ("minmax", {}) if p.key in outputs else (cfg.calibrator, options)
        lo, hi = calibrate(q.observer, method, bits=q.bits, symmetric=q.symmetric, **opts)
        q.set_range(lo, hi)
        q.observer = None
    if cfg.clip_silu_inputs:
        steps["clipped_silu_inputs"] = clip_silu_inputs(model)
    for p in points:
        if p.kind == "weight":
            q = qs[p.key]
            method = cfg.weight_method if cfg.weight_method != "auto" else ("mse" if q.bits < 8 else "minmax")
            q.fit_weight(model.get_submodule(p.layer).weight, method)
    _bias_headroom(model)
    if cfg.share_concat_grids:
        steps["shared_concat_grids"] = share_concat_grids(model)


@torch.no_grad()
def _bias_headroom(model: Detector) -> None:
    """Widen input grids so that every bias fits the int32 accumulator (step ``s_in * s_w``) with 2x headroom.

    A nearly dead input (a tiny calibrated range) would otherwise push ``b / (s_in * s_w)`` past 2^31:
    the integer kernel's accumulator overflows (the golden model reports it).
    """
    need: dict[int, tuple[Quantizer, float]] = {}
    for m in model.modules():
        iq, wq = getattr(m, "input_quant", None), getattr(m, "weight_quant", None)
        if iq is None or wq is None or m.bias is None or wq.scale_type in (ScaleType.LEVELS,) or wq.fp16:
            continue
        root = grid_root(iq)
        ratio = float((m.bias.abs() / wq.scale.detach().expand(m.bias.shape)).max()) / 2**30
        if ratio > need.get(id(root), (root, 0.0))[1]:
            need[id(root)] = (root, ratio)
    for q, min_scale in need.values():
        if float(q.scale) < min_scale:
            lo, hi = q.grid_range()
            factor = min_scale / float(q.scale)
            q.set_range(lo * factor, hi * factor)


@torch.no_grad()
def clip_silu_inputs(model: Detector) -> dict[str, float]:
    """Raise the low end of each SiLU input's grid to where SiLU's output stops mattering.

    Below about -7, ``SiLU(x) = x * sigmoid(x)`` is within a fraction of a step of 0 on any 8-bit output
    grid, yet a calibrator sizes the input's grid for the whole negative tail of the conv's output.
    Clipping that tail changes the SiLU's output by at most a quarter of its own step and gives the
    positive values, the ones that pass, a finer step. Only inputs that feed the SiLU alone are
    changed. Returns {input's label: new low end}.
    """
    qs = quantizers(model)
    clipped = {}
    for in_key, out_key in silu_inputs(model):
        q, out = qs[in_key], qs[out_key]
        if q.mode != Mode.QUANT or out.mode != Mode.QUANT or q.per_channel or q.fp16 or out.fp16:
            continue
        if q.scale_type not in (ScaleType.UNIFORM, ScaleType.POW2):
            continue
        lo, hi = q.grid_range()
        floor = -_silu_tail(0.25 * float(out.scale))
        if floor > lo and hi > 0:
            q.set_range(floor, hi)
            clipped[q.label] = floor
    return clipped


def _silu_tail(tolerance: float) -> float:
    """The smallest ``t`` (>= 1.2785, where SiLU has its minimum) with ``|SiLU(x)| <= tolerance`` for all x <= -t."""
    lo, hi = 1.2785, 80.0
    for _ in range(60):  # |SiLU(-t)| = t / (1 + e^t) falls monotonically past the minimum: bisection
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if mid / (1.0 + math.exp(mid)) <= tolerance else (mid, hi)
    return hi


#: a concatenation's inputs join its grid only if that widens their own calibrated range at most this
#: much (2: at most one bit of resolution lost)
MAX_WIDEN = 2.0


@torch.no_grad()
def share_concat_grids(model: Detector, max_widen: float = MAX_WIDEN) -> dict[str, list[str]]:
    """Put each concatenation and its inputs on one grid, so that an integer runtime concatenates by copying.

    On separate grids, ONNX Runtime's QLinearConcat requantizes every input through a lookup table
    (yolo-s: about 3.5% of the int8 model's latency at 1 thread). The shared grid covers the union of the
    members' calibrated ranges, so nothing is clipped more than its own calibration did (within the
    zero point's rounding, half a step); an input whose range that union would widen more than
    ``max_widen`` times keeps its own grid (and is requantized). A grid already shared with an earlier
    concatenation is not changed again. The inputs are then rounded once, on the grid the concatenation
    reads, instead of twice.
    Returns {concatenation's label: labels of the inputs that joined its grid}.
    """
    qs = quantizers(model)
    joined: set[str] = set()
    shared: dict[str, list[str]] = {}

    def same_kind(a: Quantizer, b: Quantizer) -> bool:
        grid = (a.bits, a.signed, a.symmetric, a.scale_type) == (b.bits, b.signed, b.symmetric, b.scale_type)
        return grid and a.mode == b.mode == Mode.QUANT and not a.per_channel and not a.fp16

    for out_key, in_keys in concatenations(model):
        out = qs[out_key]
        if out_key in joined or out.scale_type not in (ScaleType.UNIFORM, ScaleType.POW2):
            continue
        members = [out_key]
        for k in dict.fromkeys(in_keys):
            if k not in joined and k not in members and same_kind(qs[k], out):
                members.append(k)
        while len(members) > 1:  # drop inputs until the union widens no member too much
            spans = {k: qs[k].grid_range() for k in members}
            lo, hi = min(s[0] for s in spans.values()), max(s[1] for s in spans.values())
            width = {k: max(s[1] - s[0], 1e-12) for k, s in spans.items()}
            worst = min(members, key=width.get)
            if (hi - lo) / width[worst] <= max_widen:
                break
            # the narrowest input leaves; if the concatenation itself is the narrowest, the widest input
            members.remove(worst if worst != out_key else max(members[1:], key=width.get))
        if len(members) < 2:
            continue
        for k in members:
            qs[k].set_range(lo, hi)
        joined.update(members)
        shared[out.label] = [qs[k].label for k in members[1:]]
    return shared


def _check_patterns(model: Detector, cfg: QuantConfig) -> None:
    """Every override / keep pattern must match a module of the model (a typo must not pass silently)."""
    from slimdet.compress.quant.config import matches

    names = [n for n, _ in model.named_modules() if n]
    for pattern in [*cfg.overrides, *cfg.keep_float]:
        if pattern in ("input",) or any(matches(pattern, n) for n in names):
            continue
        raise ConfigError(f"QuantConfig: pattern {pattern!r} matches no layer of "
                          f"{model.model_config.get('name', type(model).__name__)!r}")  # fmt: skip


def cost_summary(model: Detector, points: list[Point]) -> dict[str, Any]:
    """Weight bytes and bit-operations of the quantized model at batch 1."""
    from slimdet.profiling.macs import layer_table

    qs = quantizers(model)
    with eval_mode(model):
        table = {r.name: r for r in layer_table(model, model.example_inputs(1))}
    weight_bits, act_bits = {}, {}
    wbytes = wbytes8 = wbytes32 = bitops = bitops8 = 0.0
    for p in points:
        q = qs[p.key]
        bits = 32 if q.mode == Mode.OFF else (16 if q.fp16 else q.bits)
        if p.kind == "act":
            act_bits[p.label] = bits
        if p.kind != "weight":
            continue
        layer = model.get_submodule(p.layer)
        n = layer.weight.numel()
        weight_bits[p.layer] = bits
        wbytes += n * bits / 8
        wbytes8 += n
        wbytes32 += 4 * n
        iq = getattr(layer, "input_quant", None)
        in_bits = 32 if iq is None or iq.mode == Mode.OFF else (16 if iq.fp16 else iq.bits)
        macs = table[p.layer].macs if p.layer in table else 0
        bitops += macs * bits * in_bits
        bitops8 += macs * 64
    return {"weight_bits": weight_bits, "act_bits": act_bits, "weight_bytes": wbytes, "weight_bytes_int8": wbytes8,
            "weight_bytes_fp32": wbytes32, "bitops": bitops, "bitops_w8a8": bitops8}  # fmt: skip


def set_quant_mode(model: Detector, mode: Mode | str) -> None:
    """Switch every quantizer (e.g. ``"off"`` to run the folded float model)."""
    set_mode(model, Mode(mode))
