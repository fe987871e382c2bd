"""Hardware specs: presets load, values are checked, unknown keys are refused with a suggestion."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slimdet.errors import ConfigError
from slimdet.hw.spec import (
    PRESET_DIR,
    Dataflow,
    RooflineSpec,
    SystolicSpec,
    list_presets,
    load_spec,
    replace,
    spec_from_dict,
)

REQUIRED = {"edge-npu", "tpu-v1", "eyeriss", "fpga-zcu102", "cpu-zen5-2c", "gpu-h100-sxm", "gpu-jetson-orin-nano"}


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_preset_loads_and_cites_its_values(name):
    spec = load_spec(name)
    assert spec.name == name
    lines = (PRESET_DIR / f"{name}.yaml").read_text().splitlines()
    for line in lines:  # every value carries its source in a comment
        body = line.split("#", 1)[0].strip()
        if not body or body.endswith(":") or body.split(":", 1)[0] in ("kind", "name", "description"):
            continue
        assert "#" in line, f"{name}.yaml: {body!r} has no source comment"


def test_preset_facts():
    tpu = load_spec("tpu-v1")
    assert isinstance(tpu, SystolicSpec) and (tpu.rows, tpu.cols) == (256, 256) and tpu.dataflow is Dataflow.WS
    assert tpu.clock_hz == 700e6 and tpu.ifmap_sram_bytes == 24 * 2**20
    npu = load_spec("edge-npu")
    assert (npu.rows, npu.cols) == (16, 16) and npu.bits == (4, 8)
    assert npu.run_bits(2) == 4 and npu.run_bits(8) == 8 and npu.run_bits(32) == 8  # widest supported
    eyeriss = load_spec("eyeriss")
    assert eyeriss.pes == 168 and eyeriss.run_bits(8) == 16
    fpga = load_spec("fpga-zcu102")
    assert fpga.pes / 2 <= 2520  # two int8 MACs per DSP48E2 slice, within the device's budget
    cpu = load_spec("cpu-zen5-2c")
    assert isinstance(cpu, RooflineSpec) and cpu.peak("int8") > cpu.peak("fp32")
    assert cpu.peak("fp16") == cpu.peak("fp32")  # no faster fp16 path: falls back
    assert set(list_presets()) >= REQUIRED


def test_unknown_key_is_refused_with_a_suggestion(tmp_path: Path):
    raw = yaml.safe_load((PRESET_DIR / "edge-npu.yaml").read_text())
    raw["clock_mhz"] = 500
    path = tmp_path / "npu.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"npu\.yaml: clock_mhz: unknown key; did you mean 'clock_hz'"):
        load_spec(path)
    raw.pop("clock_mhz")
    raw["energy"]["dram_pj"] = 1.0
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"energy\.dram_pj: unknown key"):
        load_spec(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rows": 0}, r"rows: .*>= 1"),
        ({"dataflow": "rs"}, r"dataflow: expected one of"),
        ({"bits": [3]}, r"bits: .*subset of 1, 2, 4, 8, 16, 32"),
        ({"kind": "tpu"}, r"kind: expected one of 'systolic', 'cpu', 'gpu'"),
    ],
)
def test_bad_values_name_the_field(change, message):
    raw = {**load_spec("edge-npu").model_dump(mode="json"), **change}
    with pytest.raises(ConfigError, match=message):
        spec_from_dict(raw, source="npu.yaml")


def test_unknown_preset_and_missing_file():
    with pytest.raises(ConfigError, match=r"unknown hardware preset 'edge-npv'.*did you mean 'edge-npu'"):
        load_spec("edge-npv")
    with pytest.raises(ConfigError, match=r"hardware spec file not found"):
        load_spec("nowhere/spec.yaml")


def test_specs_are_frozen_and_replace_validates():
    npu = load_spec("edge-npu")
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        npu.rows = 32  # type: ignore[misc]
    bigger = replace(npu, rows=32, cols=32)
    assert (bigger.rows, bigger.cols, npu.rows) == (32, 32, 16)
    assert bigger.area_proxy() > npu.area_proxy()
    with pytest.raises(ConfigError, match="rows"):
        replace(npu, rows=-1)


def test_energy_table_falls_back_to_wider_entries():
    energy = load_spec("edge-npu").energy
    assert energy.mac_energy_pj(4) == 0.15 and energy.mac_energy_pj(2) == 0.15  # next wider entry
    assert energy.mac_energy_pj(32) == pytest.approx(0.9 * 4)  # beyond the table: bits^2 from the widest
