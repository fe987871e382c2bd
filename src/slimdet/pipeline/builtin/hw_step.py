"""The ``simulate`` step: modelled latency and energy of the current model on hardware specs."""

from __future__ import annotations

from pydantic import Field, field_validator

from slimdet.models.base import Detector
from slimdet.pipeline.steps import RunContext, StepOptions, StepOutput, register_step


class SimulateOptions(StepOptions):
    #: hardware presets or spec files; empty: the recipe's target when it names hardware, else edge-npu
    devices: list[str] = Field(default_factory=list)
    #: per-layer rows kept in the record (the slowest first are plotted either way)
    layer_rows: int = Field(200, ge=0)

    @field_validator("devices")
    @classmethod
    def _known_presets(cls, value: list[str]) -> list[str]:
        """Preset names are checked when the recipe loads (not steps later, when the step runs); spec
        files are read when the step runs, so a stored recipe still loads where they are absent."""
        from slimdet.hw.spec import list_presets
        from slimdet.registry import unknown_name_message

        presets = list_presets()
        for device in value:
            if not device.endswith((".yaml", ".yml")) and device not in presets:
                raise ValueError(unknown_name_message("hardware preset", device, presets)
                                 + " (or give the path of a spec YAML file)")  # fmt: skip
        return value


@register_step("simulate", options=SimulateOptions, changes_model=False)
def simulate_step(ctx: RunContext, model: Detector, opts: SimulateOptions) -> StepOutput:
    """Modelled batch-1 latency and energy (slimdet.hw cost models) of the current model on each device,
    with a per-layer breakdown plot; the report puts them next to the measured numbers."""
    from slimdet.hw import layer_table, load_spec
    from slimdet.hw.cost import model_cost
    from slimdet.hw.plots import breakdown_png
    from slimdet.hw.spec import SystolicSpec
    from slimdet.io import atomic_write

    devices = opts.devices or [default_device(ctx.recipe.target)]
    table = layer_table(model, model.example_inputs(1), postprocess=False)
    modelled, record = {}, {"layers": table.rows()[: opts.layer_rows]}
    for device in devices:
        spec = load_spec(device)
        latency_s, energy_pj = model_cost(table, spec)
        entry = {"latency_ms": latency_s * 1e3, "energy_uj": energy_pj / 1e6, "kind": spec.kind}
        if isinstance(spec, SystolicSpec):
            from slimdet.hw.systolic import simulate

            sim = simulate(table, spec)
            entry.update(utilization=sim.total_utilization, dram_mb=sim.dram_bytes / 1e6,
                         stall_share=sim.stall_cycles_total / max(sim.cycles, 1))  # fmt: skip
        modelled[spec.name] = entry
        png = breakdown_png(table, spec)
        path = atomic_write(ctx.step_dir / f"{spec.name}.png", lambda f, png=png: f.write(png))
        record[f"{spec.name}_plot"] = str(path.relative_to(ctx.run_dir))
    record["modelled"] = modelled
    return StepOutput(model, record=record, metrics={"modelled": modelled})


def default_device(target: str) -> str:
    """The recipe's ``target`` when it names a hardware preset or spec file (resolved by the recipe
    loader), else the edge-NPU preset."""
    from slimdet.hw.spec import list_presets

    return target if target in list_presets() or target.endswith((".yaml", ".yml")) else "edge-npu"
