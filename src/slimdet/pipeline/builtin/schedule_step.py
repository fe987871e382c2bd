"""The ``schedule`` step: partition the current model across devices and chart the plans."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from slimdet.models.base import Detector
from slimdet.pipeline.steps import RunContext, StepOptions, StepOutput, register_step


class ScheduleOptions(StepOptions):
    #: devices: npu, cpu, gpu, a hardware preset, a spec file, or name=preset
    devices: list[str] = Field(default_factory=lambda: ["npu", "cpu"], min_length=1)
    #: price GEMMs and tensors at these bits (a float model as deployed); default: the model's own
    bits: int | None = Field(None, ge=1, le=32)
    method: Literal["auto", "dp", "milp", "heft", "brute"] = "auto"
    #: coarser nodes: one per call of a module this many levels deep
    depth: int | None = Field(None, ge=1)
    link_gb_per_s: float | None = Field(None, gt=0)
    link_latency_us: float | None = Field(None, ge=0)
    #: frames drawn for the pipelined plans in the Gantt chart
    frames: int = Field(3, ge=1, le=20)


@register_step("schedule", options=ScheduleOptions, changes_model=False)
def schedule_step(ctx: RunContext, model: Detector, opts: ScheduleOptions) -> StepOutput:
    """Latency and pipelined-throughput plans of the current model across devices, with a Gantt chart."""
    from slimdet.schedule.command import float_on_integer_note, schedule_model
    from slimdet.schedule.gantt import plot_gantt

    result = schedule_model(
        model, list(opts.devices), bits=opts.bits, method=opts.method, depth=opts.depth,
        link_bytes_per_s=None if opts.link_gb_per_s is None else opts.link_gb_per_s * 1e9,
        link_latency_s=None if opts.link_latency_us is None else opts.link_latency_us * 1e-6,
    )  # fmt: skip
    path = plot_gantt(result.plans, ctx.step_dir / "gantt.png", frames=opts.frames,
                      title=f"stage {ctx.stage}: {', '.join(result.graph.device_names)}")  # fmt: skip
    record = {**result.to_dict(), "gantt_plot": str(path.relative_to(ctx.run_dir))}
    note = float_on_integer_note(result.graph)
    if note:
        record["note"] = note
    summary = {k: {"latency_ms": p.latency_s * 1e3, "throughput_fps": p.throughput_fps, "stages": len(p.stages)}
               for k, p in result.plans.items()}  # fmt: skip
    return StepOutput(model, record=record, metrics={"plans": summary, "best_throughput": record["best_throughput"]})
