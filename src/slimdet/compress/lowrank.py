"""Low-rank decomposition: Conv2d and Linear layers replaced by chains of smaller layers.

``decompose(model, LowRankConfig(macs_reduction=0.3))`` factorises layers in place with ranks chosen
per layer by the kept energy (fraction of squared singular values) or by a global MACs budget. The
methods (truncated SVD, Tucker-2, depthwise-separable) are in :mod:`slimdet.compress.lowrank_factors`,
the rank selection in :mod:`slimdet.compress.lowrank_plan`. Each replaced layer becomes a
:class:`LowRank` chain of plain layers at the same place, so a ``finetune`` step recovers accuracy with
any optimizer and later transforms see ordinary layers. The transform is recorded in
``model.model_config`` and replayed by ``load_model``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from slimdet.compress.lowrank_factors import FACTORIZERS, Factorizer, Geometry, LowRank, kernel_size
from slimdet.compress.lowrank_plan import choose_ranks
from slimdet.compress.patterns import LayerPatterns, check_pattern, matches, output_layers
from slimdet.errors import CheckpointError, ConfigError
from slimdet.models.base import Detector
from slimdet.models.registry import record_transform, refuse_after_final, register_replay
from slimdet.profiling.macs import LayerProfile, layer_table
from slimdet.registry import closest

__all__ = ["LayerLowRank", "LayerOverride", "LowRank", "LowRankConfig", "LowRankMethod", "LowRankResult",
           "decompose", "factorize"]  # fmt: skip

RANKS_PER_METHOD = {"svd": 1, "tucker2": 2, "dw_separable": 1}
Target = tuple[nn.Module, str, "LayerOverride | None"]


class LowRankMethod(StrEnum):
    AUTO = "auto"  # svd for 1x1 convs and Linear layers, tucker2 for kxk convs
    SVD = "svd"  # any Conv2d (its kernel on the first layer) or Linear -> two layers
    TUCKER2 = "tucker2"  # kxk conv -> 1x1, kxk core, 1x1
    DW_SEPARABLE = "dw_separable"  # kxk conv -> depthwise kxk (depth multiplier m) + pointwise 1x1


class LayerOverride(BaseModel):
    """Per-layer setting: a method, and either a kept energy or explicit ranks (applied as given, even
    where they do not lower the MACs). A layer given energy or ranks here is left out of the MACs-budget
    search; its saving counts toward the budget."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: LowRankMethod | None = None
    energy: float | None = Field(None, gt=0.0, le=1.0)
    #: svd: (r,), tucker2: (R1, R2) (input side first), dw_separable: (depth multiplier,)
    ranks: tuple[int, ...] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> LayerOverride:
        if self.energy is not None and self.ranks is not None:
            raise ValueError("set energy or ranks, not both")
        if self.ranks is not None and (not self.ranks or min(self.ranks) < 1):
            raise ValueError(f"ranks must be positive integers, got {list(self.ranks)}")
        return self


class LowRankConfig(LayerPatterns):
    """What to factorise and how far; set exactly one of ``energy`` and ``macs_reduction``. Patterns in
    ``ignore`` and ``overrides`` are module names (a name also covers its children) or regular
    expressions matched against the whole name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: LowRankMethod = LowRankMethod.AUTO
    #: kept fraction of the squared singular values, per layer (per mode for tucker2)
    energy: float | None = Field(None, gt=0.0, le=1.0)
    #: fraction of the whole model's MACs (slimdet.profiling, batch 1) to remove
    macs_reduction: float | None = Field(None, gt=0.0, lt=1.0)
    #: HOOI iterations after the HOSVD initialisation of tucker2
    hooi_iters: int = Field(2, ge=0, le=100)
    #: svd and tucker2 ranks are multiples of this (or the full rank)
    round_to: int = Field(1, ge=1)
    #: per-layer settings, first matching pattern wins
    overrides: dict[str, LayerOverride] = Field(default_factory=dict)

    @field_validator("overrides")
    @classmethod
    def _valid_overrides(cls, value: dict[str, LayerOverride]) -> dict[str, LayerOverride]:
        for pattern in value:
            check_pattern(pattern)
        return value

    @model_validator(mode="after")
    def _one_target(self) -> LowRankConfig:
        if (self.energy is None) == (self.macs_reduction is None):
            got = "both" if self.energy is not None else "neither"
            raise ValueError("set exactly one of energy (kept fraction per layer) or macs_reduction "
                             f"(fraction of the model's MACs to remove), got {got}")  # fmt: skip
        return self


@dataclass(frozen=True)
class LayerLowRank:
    """One factorised layer. MACs are measured with slimdet.profiling (batch 1, all calls of the layer)."""

    name: str
    method: str
    ranks: tuple[int, ...]
    weight_shape: tuple[int, ...]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    #: ||W - W_hat||_F / ||W||_F
    weight_error: float
    #: ||y_hat - y|| / ||y|| of the layer's output on the calibration images (its inputs from the original model)
    output_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "ranks": list(self.ranks),
                "weight_shape": list(self.weight_shape), "macs_before": self.macs_before,
                "macs_after": self.macs_after, "params_before": self.params_before, "params_after": self.params_after,
                "weight_error": self.weight_error, "output_error": self.output_error}  # fmt: skip


@dataclass(frozen=True)
class LowRankResult:
    """What ``decompose`` did; totals measured with slimdet.profiling before and after."""

    method: str
    energy: float | None
    macs_reduction_target: float | None
    layers: tuple[LayerLowRank, ...]
    skipped: dict[str, str]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    #: ||y_hat - y|| / ||y|| of the model's raw outputs on the calibration images
    output_error: float | None = None

    @property
    def macs_reduction(self) -> float:
        return 1.0 - self.macs_after / self.macs_before

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "energy": self.energy, "macs_reduction_target": self.macs_reduction_target,
                "macs_before": self.macs_before, "macs_after": self.macs_after, "macs_reduction": self.macs_reduction,
                "params_before": self.params_before, "params_after": self.params_after,
                "output_error": self.output_error, "layers": [la.to_dict() for la in self.layers],
                "skipped": dict(self.skipped)}  # fmt: skip

    def table(self) -> str:
        """Per-layer ranks, MACs and errors as a Markdown table."""
        lines = ["| layer | method | weight | ranks | MACs before | MACs after | weight error | output error |",
                 "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for la in self.layers:
            out = f"{la.output_error:.4f}" if la.output_error is not None else "–"
            shape, ranks = "x".join(map(str, la.weight_shape)), ", ".join(map(str, la.ranks))
            lines.append(f"| {la.name} | {la.method} | {shape} | {ranks} | {la.macs_before:,} | {la.macs_after:,} "
                         f"| {la.weight_error:.4f} | {out} |")  # fmt: skip
        return "\n".join(lines)


def factorize(layer: nn.Module, method: str, ranks: tuple[int, ...], *, hooi_iters: int = 0) -> LowRank:
    """One Conv2d or Linear layer as a LowRank chain with the given ranks, initialised from its weights."""
    fac_cls = FACTORIZERS.get(str(method))
    reason = _unsupported(layer) or fac_cls.unsupported(layer)
    if reason:
        raise ConfigError(f"factorize: {reason}")
    fac = fac_cls(layer)
    return fac.build(_checked_ranks(fac, tuple(ranks), f"factorize({str(method)!r})"), hooi_iters=hooi_iters)


def decompose(model: Detector, cfg: LowRankConfig, *, calib: Any = None) -> LowRankResult:
    """Factorise the model's Conv2d and Linear layers in place.

    Args:
        model: the detector; changed in place, and its ``model_config`` records the transform.
        cfg: method, rank selection and which layers.
        calib: optional batches (image tensors, or ``(images, targets)`` pairs) on which the output
            error of every factorised layer and of the whole model is measured.

    Raises:
        ConfigError: a pattern matches no layer, an override's ranks do not fit, the MACs budget
            cannot be met, or no layer is left to factorise.
    """
    refuse_after_final(model, "lowrank")
    targets, skipped = _select(model, cfg)
    geo, rows_before = _measure(model, list(targets))
    for name in [n for n in targets if n not in geo]:
        skipped[name] = "not called by forward on the example input"
        del targets[name]
    facs = {name: FACTORIZERS.get(method)(module) for name, (module, method, _) in targets.items()}
    total_before = sum(r.macs for r in rows_before)
    overrides = {n: t[2] for n, t in targets.items()}
    chosen = choose_ranks(facs, overrides, geo, cfg, total_macs=total_before, skipped=skipped,
                          check=lambda f, r, n: _checked_ranks(f, r, f"lowrank: override for layer {n!r}"))  # fmt: skip
    if not chosen:
        reasons = sorted(set(skipped.values()))
        raise ConfigError(f"lowrank: no layer left to factorise ({len(skipped)} skipped: {reasons})")
    built = {name: facs[name].build(ranks, hooi_iters=cfg.hooi_iters) for name, ranks in chosen.items()}
    originals = {name: targets[name][0] for name in built}
    batches = _calib_images(calib)
    layer_errors = _layer_output_errors(model, originals, built, batches) if batches else {}
    reference = _outputs(model, batches) if batches else None
    params_before = sum(p.numel() for p in model.parameters())
    for name, chain in built.items():
        model.set_submodule(name, chain)
    layers_record = {n: {"method": c.method, "ranks": list(c.ranks)} for n, c in built.items()}
    record_transform(model, {"kind": "lowrank", "layers": layers_record, "config": cfg.model_dump(mode="json")})
    rows_after = layer_table(model, model.example_inputs(1))
    layers = tuple(
        LayerLowRank(name=name, method=chain.method, ranks=chain.ranks,
                     weight_shape=tuple(originals[name].weight.shape),
                     macs_before=_macs_of(rows_before, name), macs_after=_macs_of(rows_after, name, chain=True),
                     params_before=sum(p.numel() for p in originals[name].parameters()),
                     params_after=sum(p.numel() for p in chain.parameters()),
                     weight_error=_weight_error(originals[name], chain), output_error=layer_errors.get(name))
        for name, chain in built.items()
    )  # fmt: skip
    return LowRankResult(
        method=cfg.method.value, energy=cfg.energy, macs_reduction_target=cfg.macs_reduction, layers=layers,
        skipped=skipped, macs_before=total_before, macs_after=sum(r.macs for r in rows_after),
        params_before=params_before, params_after=sum(p.numel() for p in model.parameters()),
        output_error=None if reference is None else _relative_error(_outputs(model, batches), reference),
    )  # fmt: skip


@register_replay("lowrank")
def _replay(model: Detector, entry: dict[str, Any]) -> Detector:
    """Rebuild the recorded chains (weights unset); load_state_dict then fills them."""
    modules = dict(model.named_modules())
    for name, spec in entry["layers"].items():
        layer, method = modules.get(name), spec.get("method")
        if _unsupported(layer) or method not in FACTORIZERS:
            raise CheckpointError(
                f"model config: transform 'lowrank' names layer {name!r} with method {method!r}, but the model "
                f"{model.model_config.get('name')!r} has no plain Conv2d or Linear layer there or the method is "
                f"unknown (known: {FACTORIZERS.names()})"
            )
        model.set_submodule(name, FACTORIZERS.get(method).skeleton(layer, tuple(spec["ranks"])))
    return model


def _select(model: Detector, cfg: LowRankConfig) -> tuple[dict[str, Target], dict[str, str]]:
    """The layers to factorise with their method and override, and the skipped ones with the reason."""
    candidates = {name: mod for name, mod in model.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))}
    for kind, patterns in (("ignore", cfg.ignore), ("overrides", tuple(cfg.overrides))):
        for pattern in patterns:
            if not any(matches(name, pattern) for name in candidates):
                hint = closest(pattern, list(candidates))
                raise ConfigError(f"lowrank: {kind} pattern {pattern!r} matches no Conv2d or Linear layer"
                                  + (f" (did you mean {hint!r}?)" if hint else ""))  # fmt: skip
    outputs = [] if cfg.include_output_layers else output_layers(model)
    chains = [name for name, mod in model.named_modules() if isinstance(mod, LowRank)]
    targets: dict[str, Target] = {}
    skipped: dict[str, str] = {}
    for name, module in candidates.items():
        override = next((o for p, o in cfg.overrides.items() if matches(name, p)), None)
        method = str(override.method if override is not None and override.method is not None else cfg.method)
        if method == LowRankMethod.AUTO:
            method = "svd" if kernel_size(module) == (1, 1) else "tucker2"
        if any(name.startswith(c + ".") for c in chains):
            reason = "part of a factorised chain"
        elif any(matches(name, p) for p in cfg.ignore):
            reason = "ignored"
        elif any(matches(name, p) for p in outputs):
            reason = "output layer (include_output_layers is false)"
        else:
            reason = _unsupported(module) or FACTORIZERS.get(method).unsupported(module)
        if reason:
            skipped[name] = reason
        else:
            targets[name] = (module, method, override)
    return targets, skipped


def _measure(model: Detector, names: list[str]) -> tuple[dict[str, Geometry], list[LayerProfile]]:
    """Input and output pixels of the named layers, and the model's layer table, from one batch-1 forward."""
    modules = dict(model.named_modules())
    pixels: dict[str, list[int]] = {}

    def hook(name: str):  # noqa: ANN202
        def record(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
            acc = pixels.setdefault(name, [0, 0])
            acc[0] += inputs[0].numel() // module.weight.shape[1]  # groups = 1: weight dim 1 is C_in
            acc[1] += output.numel() // module.weight.shape[0]

        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        rows = layer_table(model, model.example_inputs(1))
    finally:
        for h in handles:
            h.remove()
    return {n: Geometry(*p) for n, p in pixels.items()}, rows


def _macs_of(rows: list[LayerProfile], name: str, *, chain: bool = False) -> int:
    """MACs of a layer's calls in a layer table (``chain``: of the layers of the chain at ``name``)."""
    if chain:
        return sum(r.macs for r in rows if r.name.startswith(name + "."))
    return sum(r.macs for r in rows if r.name == name or r.name.startswith(name + "#"))


def _weight_error(layer: nn.Module, chain: LowRank) -> float:
    w = layer.weight.detach().double()
    return float((chain.dense_weight().double().reshape(w.shape) - w).norm() / w.norm().clamp_min(1e-300))


def _calib_images(calib: Any) -> list[Tensor]:
    if calib is None:
        return []
    return [b[0] if isinstance(b, (tuple, list)) else b for b in calib]


@torch.no_grad()
def _layer_output_errors(model: Detector, originals: dict[str, nn.Module], chains: dict[str, LowRank],
                         batches: list[Tensor]) -> dict[str, float]:  # fmt: skip
    """Each chain's relative output error on the inputs its layer sees in the original model."""
    sums = {name: [0.0, 0.0] for name in originals}

    def hook(name: str):  # noqa: ANN202
        def record(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
            sums[name][0] += float((chains[name](inputs[0]) - output).double().pow(2).sum())
            sums[name][1] += float(output.double().pow(2).sum())

        return record

    handles = [layer.register_forward_hook(hook(n)) for n, layer in originals.items()]
    try:
        _outputs(model, batches)
    finally:
        for h in handles:
            h.remove()
    return {name: (d / max(r, 1e-300)) ** 0.5 for name, (d, r) in sums.items()}


@torch.no_grad()
def _outputs(model: Detector, batches: list[Tensor]) -> list[Tensor]:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        outs = []
        for images in batches:
            raw = model(images.to(device))
            outs.extend(t.flatten() for t in (raw if isinstance(raw, (tuple, list)) else (raw,)))
        return outs
    finally:
        model.train(was_training)


def _relative_error(got: list[Tensor], want: list[Tensor]) -> float:
    diff = sum(float((g.double() - w.double()).pow(2).sum()) for g, w in zip(got, want, strict=True))
    ref = sum(float(w.double().pow(2).sum()) for w in want)
    return (diff / max(ref, 1e-300)) ** 0.5


def _is_fused(layer: nn.Module | None) -> bool:
    from slimdet.compress.graph_fuse import ConvAct2d

    return isinstance(layer, ConvAct2d)


def _unsupported(layer: nn.Module | None) -> str | None:
    if type(layer) not in (nn.Conv2d, nn.Linear):
        hint = " (fused by the graph step's fuse_conv_act: run lowrank before it)" if _is_fused(layer) else ""
        return f"{type(layer).__name__}: only plain Conv2d and Linear layers are factorised{hint}"
    if "weight_orig" in layer._parameters:
        return "sparsity mask (call slimdet.compress.make_permanent first)"
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        return f"grouped conv (groups={layer.groups})"
    return None


def _checked_ranks(fac: Factorizer, ranks: tuple[int, ...], where: str) -> tuple[int, ...]:
    limits, count = fac.max_ranks, RANKS_PER_METHOD[fac.name]
    if len(ranks) != count or any(not 1 <= r <= m for r, m in zip(ranks, limits, strict=False)):
        shape = "x".join(map(str, fac.layer.weight.shape))
        raise ConfigError(f"{where}: method {fac.name} of a {shape} weight takes {count} rank(s), each from 1 "
                          f"up to {list(limits)}, got {list(ranks)}")  # fmt: skip
    return tuple(int(r) for r in ranks)





