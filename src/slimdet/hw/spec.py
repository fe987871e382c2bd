"""Hardware as data: frozen specs of systolic-array accelerators and roofline devices, from YAML presets.

A spec is a frozen pydantic model: unknown keys are rejected (with a close-match suggestion), values
are checked at the boundary, and ``spec.model_copy(update=...)`` / :func:`replace` gives a variant for a
design-space search. Presets live in ``slimdet/hw/presets/*.yaml``; every value there carries its
source in a comment. Units are in the field names (``_bytes``, ``_hz``, ``_pj``, ``_per_s``).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slimdet.errors import ConfigError
from slimdet.registry import unknown_name_message

PRESET_DIR = Path(__file__).parent / "presets"


class Dataflow(StrEnum):
    """What stays in the processing elements while the other operands stream through
    (Chen et al., ISCA 2016 taxonomy; SCALE-Sim's ``ws``/``os``/``is``)."""

    WS = "ws"  # weight stationary: a K x N weight tile is loaded, input rows stream
    OS = "os"  # output stationary: each PE accumulates one output, inputs and weights stream
    IS = "is"  # input stationary: a K x M input tile is loaded, weight columns stream


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)


class EnergyTable(_Frozen):
    """Energy per operation and per access, in picojoules.

    Defaults are from Horowitz, "Computing's energy problem", ISSCC 2014 (45 nm, 0.9 V): 8-bit int
    multiply 0.2 pJ + 32-bit accumulate add 0.1 pJ; 32-bit int multiply 3.1 pJ; an 8 KB SRAM read of
    64 bits 10 pJ (1.25 pJ/byte; 32 KB: 20 pJ, 1 MB: 100 pJ per 64 bits); DRAM 1.3-2.6 nJ per 64 bits
    (low end: 162.5 pJ/byte). 4- and 16-bit MACs scale the 8-bit multiply by bits^2 (array multipliers).
    """

    #: one multiply-accumulate at this many operand bits -> pJ (multiply + accumulator add)
    mac_pj: dict[int, float] = Field(default_factory=lambda: {4: 0.15, 8: 0.3, 16: 0.9, 32: 3.2})
    sram_read_pj_per_byte: float = Field(1.25, ge=0)
    sram_write_pj_per_byte: float = Field(1.25, ge=0)
    dram_pj_per_byte: float = Field(162.5, ge=0)

    @field_validator("mac_pj")
    @classmethod
    def _mac_bits(cls, value: dict[int, float]) -> dict[int, float]:
        if not value:
            raise ValueError("needs at least one entry {bits: pJ}")
        bad = [b for b, e in value.items() if not 1 <= b <= 32 or e < 0]
        if bad:
            raise ValueError(f"bits must be 1..32 and energies >= 0; bad entries for bits {bad}")
        return dict(sorted(value.items()))

    def mac_energy_pj(self, bits: int) -> float:
        """MAC energy at ``bits`` operand bits: the table entry, else the next wider entry, else scaled
        quadratically (a multiplier's area and energy grow ~ bits^2) from the widest one."""
        for b, e in self.mac_pj.items():
            if b >= bits:
                return e
        widest = max(self.mac_pj)
        return self.mac_pj[widest] * (bits / widest) ** 2


class SystolicSpec(_Frozen):
    """A 2-D systolic array of ``rows x cols`` processing elements with on-chip buffers and a DRAM link.

    Operands are 8-bit lanes: a multi-precision PE packs ``8 // bits`` operands of ``bits`` < 8 per lane
    (so 4-bit weights double the array's effective columns), wider operands take ``bits / 8`` passes.
    """

    kind: Literal["systolic"] = "systolic"
    name: str
    description: str = ""
    rows: int = Field(ge=1)
    cols: int = Field(ge=1)
    dataflow: Dataflow = Dataflow.WS
    ifmap_sram_bytes: int = Field(ge=1)
    filter_sram_bytes: int = Field(ge=1)
    ofmap_sram_bytes: int = Field(ge=1)
    #: DRAM <-> SRAM bytes per clock cycle
    dram_bytes_per_cycle: float = Field(gt=0)
    clock_hz: float = Field(gt=0)
    #: operand bit-widths the PEs support natively; others run at the next supported width up
    bits: tuple[int, ...] = (8,)
    #: the array skips multiplications by zero weights (compute cycles scale with weight density)
    zero_skip: bool = False
    #: bytes per SRAM/DRAM word of an 8-bit operand (SCALE-Sim's word is one byte)
    word_bytes: int = Field(1, ge=1)
    energy: EnergyTable = Field(default_factory=EnergyTable)
    #: idle/leakage power of the whole accelerator, watts (energy = dynamic + static x latency)
    static_power_w: float = Field(0.0, ge=0)

    @field_validator("bits")
    @classmethod
    def _bits(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(b not in (1, 2, 4, 8, 16, 32) for b in value):
            raise ValueError(f"supported bits must be a non-empty subset of 1, 2, 4, 8, 16, 32; got {list(value)}")
        return tuple(sorted(set(value)))

    @property
    def pes(self) -> int:
        return self.rows * self.cols

    @property
    def sram_bytes(self) -> int:
        return self.ifmap_sram_bytes + self.filter_sram_bytes + self.ofmap_sram_bytes

    def run_bits(self, bits: int) -> int:
        """The bit-width an operand of ``bits`` bits is computed at on this array."""
        wider = [b for b in self.bits if b >= bits]
        return min(wider) if wider else max(self.bits)

    def area_proxy(self) -> float:
        """PEs x widest supported bits + SRAM bytes: a unitless area proxy for design-space search
        (a MAC's area grows with its width; an SRAM byte is counted as one unit)."""
        return float(self.pes * max(self.bits) + self.sram_bytes)


class RooflineSpec(_Frozen):
    """A device modelled by a roofline (Williams et al., CACM 2009): a layer takes
    max(MACs / peak, bytes / bandwidth) plus a fixed per-op overhead."""

    kind: Literal["cpu", "gpu"]
    name: str
    description: str = ""
    #: peak multiply-accumulates per second by operand type ("fp32", "fp16", "int8", ...)
    peak_macs_per_s: dict[str, float]
    #: sustained memory bandwidth, bytes per second
    mem_bytes_per_s: float = Field(gt=0)
    #: fixed cost of launching one op (kernel launch, dispatch), seconds
    op_overhead_s: float = Field(0.0, ge=0)
    #: fraction of peak compute reached in practice (set by calibration against measurements)
    compute_efficiency: float = Field(1.0, gt=0, le=1)
    #: fraction of peak bandwidth reached in practice (set by calibration)
    memory_efficiency: float = Field(1.0, gt=0, le=1)
    #: SIMD / tensor-core width in output channels: channels are processed in multiples of this
    channel_multiple: int = Field(1, ge=1)
    #: power at full load, watts (energy = power x latency)
    power_w: float = Field(0.0, ge=0)

    @field_validator("peak_macs_per_s")
    @classmethod
    def _peaks(cls, value: dict[str, float]) -> dict[str, float]:
        if not value or any(v <= 0 for v in value.values()):
            raise ValueError("needs at least one entry {dtype: MACs per second > 0}")
        return value

    @model_validator(mode="after")
    def _has_fp32(self) -> RooflineSpec:
        if "fp32" not in self.peak_macs_per_s:
            raise ValueError("peak_macs_per_s needs an 'fp32' entry (the fallback for other types)")
        return self

    def peak(self, dtype: str) -> float:
        """Peak MACs/s for ``dtype``, falling back to fp32 when the device has no faster path for it."""
        return self.peak_macs_per_s.get(dtype, self.peak_macs_per_s["fp32"])


HardwareSpec = SystolicSpec | RooflineSpec


def list_presets() -> list[str]:
    """Names of the built-in hardware presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_spec(name_or_path: str | Path) -> HardwareSpec:
    """A preset by name (see :func:`list_presets`) or a spec YAML file.

    Raises:
        ConfigError: unknown preset, missing file, invalid YAML, unknown keys or invalid values; the
            message names the file and the field.
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        if str(name_or_path) not in list_presets():
            raise ConfigError(unknown_name_message("hardware preset", str(name_or_path), list_presets())
                              + " (or give the path of a spec YAML file)")  # fmt: skip
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: hardware spec file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return spec_from_dict(raw, source=str(path))


def spec_from_dict(raw: Any, *, source: str = "<spec>") -> HardwareSpec:
    """Validate a spec mapping (``kind: systolic | cpu | gpu`` picks the type)."""
    from slimdet.pipeline.validation import error_messages

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of spec keys, got {type(raw).__name__}")
    kind = raw.get("kind", "systolic")
    if kind not in ("systolic", "cpu", "gpu"):
        raise ConfigError(f"{source}: kind: expected one of 'systolic', 'cpu', 'gpu', got {kind!r}")
    cls: type[BaseModel] = SystolicSpec if kind == "systolic" else RooflineSpec
    try:
        return cls.model_validate(raw)  # type: ignore[return-value]
    except ValidationError as exc:
        lines = error_messages(exc, cls)
        head = lines[0] if len(lines) == 1 else f"{len(lines)} problems:\n" + "\n".join(f"  {ln}" for ln in lines)
        raise ConfigError(f"{source}: {head}") from None


def replace(spec: HardwareSpec, **changes: Any) -> HardwareSpec:
    """A validated copy of ``spec`` with ``changes`` applied (``model_copy`` does not re-validate)."""
    return spec_from_dict({**spec.model_dump(), **changes}, source=f"{spec.name} + {sorted(changes)}")
