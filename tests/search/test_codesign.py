"""Joint model x accelerator search: points, Pareto front, the chosen recipe, resume, the CLI."""

from __future__ import annotations

import json

import pytest
import yaml

from slimdet.hw.spec import load_spec
from slimdet.pipeline.recipe import load_recipe
from slimdet.search.codesign import CodesignConfig, HardwareSpace, choose, codesign
from slimdet.search.pareto import pareto_mask

TINY = {
    "hardware": {"arrays": [[8, 8], [16, 16]], "sram_kib": [16, 64], "dram_bytes_per_cycle": [8],
                 "dataflows": ["ws", "os"]},
    "compression": {"macs_ratios": [1.0, 0.6], "weight_bits": [8, 4], "finetune_epochs": 1,
                    "finetune_steps_per_epoch": 1, "calib_images": 8, "adaround_iters": 2},
    "eval_images": 6,
    "threads": 1,
}  # fmt: skip


def test_hardware_space_makes_validated_variants_of_the_base():
    space = HardwareSpace(arrays=[(8, 8), (32, 16)], sram_kib=[16], dram_bytes_per_cycle=[4, 16], dataflows=["os"])
    specs = space.specs()
    assert len(specs) == 4 and {(s.rows, s.cols) for s in specs} == {(8, 8), (32, 16)}
    assert all(s.ofmap_sram_bytes == 8 * 1024 and s.dataflow == "os" for s in specs)
    base = load_spec("edge-npu")
    assert all(s.clock_hz == base.clock_hz and s.bits == base.bits for s in specs)
    with pytest.raises(ValueError, match="roofline device"):
        HardwareSpace(base="cpu-zen5-2c")


def test_choose_prefers_the_cheapest_point_near_the_best_map():
    points = [{"map50": 0.90, "latency_ms": 1.0, "energy_uj": 1.0, "area": 1.0},
              {"map50": 0.95, "latency_ms": 3.0, "energy_uj": 2.0, "area": 2.0},
              {"map50": 0.945, "latency_ms": 2.0, "energy_uj": 2.0, "area": 1.0}]  # fmt: skip
    assert choose(points, [0, 1, 2], max_drop_points=1.0) == 2  # 0.90 is 5 points down
    assert choose(points, [0, 1, 2], max_drop_points=0.0) == 1
    assert choose(points, [0, 1, 2], max_drop_points=10.0) == 0


def test_codesign_end_to_end_and_resume(fitted_tiny, tiny_digits, tmp_path, monkeypatch):
    from slimdet.io import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "model.pt", model_config=fitted_tiny.model_config,
                           state_dict=fitted_tiny.state_dict())  # fmt: skip
    cfg = CodesignConfig.model_validate(TINY)
    out = tmp_path / "cd"
    result = codesign(fitted_tiny, str(tiny_digits), cfg, out_dir=out, checkpoint=ckpt, progress=False)
    assert len(result.points) == 4 * 8  # 2 ratios x 2 bits x (2 arrays x 2 SRAM x 1 bandwidth x 2 dataflows)
    keys = ["map50", "latency_ms", "energy_uj", "area"]
    values = [[p[k] for k in keys] for p in result.points]
    mask = pareto_mask(values, ["max", "min", "min", "min"])
    assert sorted(result.pareto) == [i for i, m in enumerate(mask) if m] and result.chosen in result.pareto
    # the policies differ: pruning cuts MACs, 4-bit weights cut modelled energy on the same array
    by = {(p["macs_ratio"], p["weight_bits"], p["hardware"]): p for p in result.points}
    hw = result.points[0]["hardware"]
    assert by[(0.6, 8, hw)]["macs"] < by[(1.0, 8, hw)]["macs"]
    assert by[(1.0, 4, hw)]["energy_uj"] < by[(1.0, 8, hw)]["energy_uj"]
    for name in ("points.json", "pareto.csv", "pareto.md", "report.html", "pareto_latency_map.png"):
        assert (out / name).stat().st_size > 100, name
    assert "chosen" in (out / "pareto.md").read_text()

    recipe = load_recipe(result.recipe_path)
    assert recipe.target.endswith("hardware.yaml") and load_spec(recipe.target).name == result.chosen_point["hardware"]
    names = [s.name for s in recipe.steps]
    assert names[-4:] == ["quantize", "evaluate", "simulate", "export"]
    assert (result.chosen_point["macs_ratio"] < 1) == ("prune" in names)

    # a second run reuses the finished policies: nothing is quantized again
    import slimdet.search.codesign as cd

    monkeypatch.setattr(cd, "_quantized", lambda *a, **k: pytest.fail("policy recomputed"))
    again = codesign(fitted_tiny, str(tiny_digits), cfg, out_dir=out, checkpoint=ckpt, progress=False)
    assert [p["map50"] for p in again.points] == [p["map50"] for p in result.points]


def test_cli_codesign_with_a_config(fitted_tiny, tiny_digits, tmp_path, capsys):
    from slimdet.cli import main
    from slimdet.io import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "m.pt", model_config=fitted_tiny.model_config,
                           state_dict=fitted_tiny.state_dict())  # fmt: skip
    small = {**TINY, "compression": {**TINY["compression"], "macs_ratios": [1.0], "weight_bits": [8]}}
    (tmp_path / "cd.yaml").write_text(yaml.safe_dump(small))
    rc = main(["codesign", "--checkpoint", str(ckpt), "--data", str(tiny_digits), "--out", str(tmp_path / "o"),
               "--config", str(tmp_path / "cd.yaml"), "--quiet"])  # fmt: skip
    assert rc == 0 and "Pareto front" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "points.json").read_text())["chosen"] >= 0
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"hardware": {"arrayz": [[4, 4]]}}))
    rc = main(["codesign", "--checkpoint", str(ckpt), "--data", str(tiny_digits), "--out", str(tmp_path / "o2"),
               "--config", str(tmp_path / "bad.yaml")])  # fmt: skip
    assert rc == 2 and "arrayz: unknown key; did you mean 'arrays'" in capsys.readouterr().err
