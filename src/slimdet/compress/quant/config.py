"""What to quantize and how: :class:`QuantConfig`, with per-layer overrides by name or regex."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from slimdet.compress.quant.quantizers import ScaleType

_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16)


class Granularity(StrEnum):
    CHANNEL = "per_channel"  # one weight step size per output channel
    TENSOR = "per_tensor"


class LayerQuant(BaseModel):
    """Settings of the layers (and tensors) an override pattern matches; None keeps the default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight_bits: int | None = None
    act_bits: int | None = None
    granularity: Granularity | None = None
    scale_type: ScaleType | None = None
    #: keep the matched layers (weights and outputs) in float
    float: bool = False

    @field_validator("weight_bits", "act_bits")
    @classmethod
    def _bits(cls, value: int | None) -> int | None:
        if value is not None and value not in _BITS:
            raise ValueError(f"bits must be one of {list(_BITS)} (16 = fp16 pass-through), got {value}")
        return value


class QuantConfig(BaseModel):
    """Simulated quantization of a detector's convs, linears and activations.

    Defaults give W8A8: int8 symmetric per-channel weights, uint8 asymmetric activations, the
    percentile calibrator, bias correction, and the detector's fragile tail layers found and kept in
    float automatically.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    #: default bit-widths: 2..8, 1 (binary weights), 16 (fp16 pass-through)
    weight_bits: int = 8
    act_bits: int = 8
    granularity: Granularity = Granularity.CHANNEL
    weight_symmetric: bool = True
    act_symmetric: bool = False
    #: grid of the weights: uniform, pow2 (shift-only hardware), levels (k-means), binary
    scale_type: ScaleType = ScaleType.UNIFORM
    #: activation range calibrator: minmax, percentile, mse, entropy
    calibrator: str = "percentile"
    calibrator_options: dict[str, float] = Field(default_factory=dict)
    #: weight range: mse below 8 bits and minmax at 8 ("auto"), or one of them everywhere
    weight_method: Literal["auto", "minmax", "mse"] = "auto"
    #: layer name or regex (also matched against activation labels such as "heads.0/cat") -> settings
    overrides: dict[str, LayerQuant] = Field(default_factory=dict)
    #: layer names / labels or regexes kept in float, on top of what auto_keep finds
    keep_float: list[str] = Field(default_factory=list)
    #: keep the detector's raw predictions (graph outputs and the head maps concatenated into them) in
    #: float: the prediction convs return their dequantized accumulator, as the float decoder reads it.
    #: On an 8-bit grid the class scores collapse to a few dozen values and tie across images (yolo-s,
    #: 500 val images: 36 distinct scores above 0.5 vs 2,072 in float), which blurs the ranking mAP is
    #: computed from (yolo-s test mAP@[.5:.95] 0.8026 vs 0.8006 with integer outputs). ONNX Runtime runs
    #: those small convs in float, which costs about 2% of yolo-s's int8 latency at 1 thread (two files of
    #: this structure 1.98x and 2.02x over FP32 vs 2.04x on an AMD Zen 5, one run interleaved in random
    #: order). False: every tensor integer (golden model, hw package)
    float_outputs: bool = True
    #: one grid for each concatenation and its inputs (the union of their calibrated ranges, unless that
    #: widens an input's more than 2x), so that the runtime concatenates by copying instead of requantizing
    #: every input (yolo-s in ONNX Runtime, 1 thread, AMD Zen 5: 2.09x over FP32 vs 2.02x; output distortion on val
    #: slightly lower, as the inputs are rounded once). QAT learns the step sizes apart again
    share_concat_grids: bool = True
    #: raise the low end of each SiLU input's grid to where SiLU's output is within a quarter step of 0:
    #: the positive values get a finer step (yolo-s: 23-29 of 57 inputs clipped, output distortion vs FP32
    #: on val 4-10% lower on each of 3 calibration sets; val mAP@.5 the same within 0.05 points)
    clip_silu_inputs: bool = True
    #: measure which tail layers break detection at low precision and keep them in float
    auto_keep: bool = True
    #: keep a tensor float only if that removes at least this fraction of the quantization loss increase
    auto_keep_min_gain: float = Field(0.05, ge=0, le=1)
    auto_keep_max: int = Field(6, ge=0)
    #: relative detection-loss increase from quantization ((quantized - float) / float, on calibration
    #: images) that needs no float tail: below it auto_keep keeps nothing, since float islands cost run time
    auto_keep_tolerance: float = Field(0.02, ge=0)
    #: time every conv alone in ONNX Runtime on this CPU, int8 vs float, and keep in float those where
    #: int8 is slower (typically the first conv on the RGB image)
    runtime_aware: bool = True
    #: correct the expected output shift that weight rounding causes (Nagel et al., ICCV 2019)
    bias_correction: bool = True
    #: learned rounding (AdaRound, Nagel et al., ICML 2020) of every weight grid; None: only where some
    #: weights are below 8 bits, and then only those
    adaround: bool | None = None
    adaround_iters: int = Field(300, ge=1)
    #: learnable step sizes for quantization-aware training (LSQ); train afterwards
    qat: bool = False
    calib_batches: int = Field(8, ge=1)
    #: mixed precision: weight bytes at most this fraction of uniform int8 (None: no search)
    weight_bytes_ratio: float | None = Field(None, gt=0, le=4)
    #: mixed precision: bit-operations at most this fraction of uniform W8A8
    bitops_ratio: float | None = Field(None, gt=0, le=4)
    #: mixed precision on a device (a hardware preset or spec YAML): the modelled latency / energy of the
    #: weight bits chosen is at most this fraction of uniform W8A8's on that device (slimdet.hw cost models)
    device: str | None = None
    latency_ratio: float | None = Field(None, gt=0, le=4)
    energy_ratio: float | None = Field(None, gt=0, le=4)
    candidate_bits: tuple[int, ...] = (2, 4, 8)
    #: per-layer sensitivity for mixed precision: Hessian trace (Hutchinson) or measured distortion
    sensitivity: Literal["hessian", "distortion"] = "hessian"

    @field_validator("weight_bits", "act_bits")
    @classmethod
    def _bits(cls, value: int) -> int:
        if value not in _BITS:
            raise ValueError(f"bits must be one of {list(_BITS)} (16 = fp16 pass-through), got {value}")
        return value

    @field_validator("candidate_bits")
    @classmethod
    def _candidates(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        bad = [b for b in value if b not in range(2, 9)]
        if bad or not value:
            raise ValueError(f"candidate_bits must be integer bit-widths in 2..8, got {list(value)}")
        return tuple(sorted(set(value)))

    @field_validator("calibrator")
    @classmethod
    def _known_calibrator(cls, value: str) -> str:
        from slimdet.compress.quant.calibrate import CALIBRATORS
        from slimdet.errors import ConfigError

        try:
            CALIBRATORS.get(value)
        except ConfigError as exc:  # pydantic reports ValueErrors with the field's location
            raise ValueError(str(exc)) from None
        return value

    @field_validator("overrides", mode="before")
    @classmethod
    def _override_patterns(cls, value: Any) -> Any:
        for pattern in value or {}:
            _compile(pattern)
        return value

    @field_validator("keep_float")
    @classmethod
    def _keep_patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            _compile(pattern)
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str | None) -> str | None:
        if value is not None:
            from slimdet.errors import ConfigError
            from slimdet.hw.spec import load_spec

            try:
                load_spec(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> QuantConfig:
        if (self.latency_ratio is not None or self.energy_ratio is not None) and self.device is None:
            raise ValueError("latency_ratio / energy_ratio need device: a hardware preset or spec file")
        if (self.weight_bits == 1) != (self.scale_type == ScaleType.BINARY):
            raise ValueError("binary weights: use weight_bits=1 together with scale_type='binary'")
        if self.act_bits == 1:
            raise ValueError("act_bits=1 is not supported (binary weights only)")
        return self

    @property
    def mixed_precision(self) -> bool:
        budgets = (self.weight_bytes_ratio, self.bitops_ratio, self.latency_ratio, self.energy_ratio)
        return any(b is not None for b in budgets)

    def layer(self, name: str) -> LayerQuant:
        """The override settings that apply to ``name`` (later patterns win, exact names last)."""
        merged: dict[str, Any] = {}
        for pattern, settings in self.overrides.items():
            if matches(pattern, name):
                merged.update(settings.model_dump(exclude_defaults=True))
        return LayerQuant(**merged)

    def kept_float(self, name: str) -> bool:
        return any(matches(p, name) for p in self.keep_float) or self.layer(name).float


def matches(pattern: str, name: str) -> bool:
    """A pattern matches a layer name or activation label exactly, as a regex, or as the label's layer
    part (``heads.0/cat`` and ``backbone.stem.2:sigmoid`` belong to ``heads.0`` and ``backbone.stem.2``)."""
    base = re.split(r"[/:]", name, maxsplit=1)[0]
    return pattern in (name, base) or bool(_compile(pattern).fullmatch(name) or _compile(pattern).fullmatch(base))


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid layer pattern {pattern!r}: {exc}") from None
