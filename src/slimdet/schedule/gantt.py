"""Gantt charts of plans: what each device does when, for one frame or a stream of frames."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from slimdet.schedule.graph import Plan


@dataclass(frozen=True)
class Bar:
    """One busy interval of a device."""

    lane: str  # device name
    start_s: float
    end_s: float
    stage: int
    frame: int
    kind: str  # "compute" | "send"


def gantt_bars(plan: Plan, *, frames: int = 3) -> list[Bar]:
    """The busy intervals of ``plan``.

    A plan with stage start times (a one-frame DAG schedule) is drawn as scheduled, one frame. A
    chain of stages is run on ``frames`` frames that are all ready at time 0: each device takes its
    stage of frame ``f`` after its stage of frame ``f - 1``, and is busy for the stage's compute and
    then its send to the next stage (the throughput model of :mod:`slimdet.schedule.pipeline`).
    """
    if plan.stage_start_s:
        return [Bar(s.device, t, t + s.time_s, k, 0, "compute")
                for k, (s, t) in enumerate(zip(plan.stages, plan.stage_start_s, strict=True))]  # fmt: skip
    bars: list[Bar] = []
    free: dict[str, float] = {}
    for f in range(frames):
        ready = 0.0
        for k, stage in enumerate(plan.stages):
            start = max(ready, free.get(stage.device, 0.0))
            end = start + stage.time_s
            bars.append(Bar(stage.device, start, end, k, f, "compute"))
            send = plan.transfers[k][2] if k < len(plan.transfers) else 0.0
            if send > 0:
                bars.append(Bar(stage.device, end, end + send, k, f, "send"))
            free[stage.device] = ready = end + send
    return bars


def plot_gantt(plans: Mapping[str, Plan], path: str | Path, *, frames: int = 3, title: str = "") -> Path:
    """One Gantt panel per plan (devices as rows, milliseconds across); writes a PNG or SVG.

    Stages are coloured by index; sends are hatched; pipelined plans label each bar with its frame.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no display (Agg canvas)

    path = Path(path)
    names = list(plans)
    fig = Figure(figsize=(9.0, 1.0 + 1.25 * len(names)), layout="constrained")
    axes = fig.subplots(len(names), 1, squeeze=False)[:, 0]
    colors = [f"C{i}" for i in range(10)]
    for ax, name in zip(axes, names, strict=True):
        plan = plans[name]
        lanes = list(plan.devices)
        for bar in gantt_bars(plan, frames=frames):
            y = lanes.index(bar.lane)
            width_ms = (bar.end_s - bar.start_s) * 1e3
            ax.barh(y, width_ms, left=bar.start_s * 1e3, height=0.6, color=colors[bar.stage % 10],
                    alpha=0.45 if bar.kind == "send" else 0.9, hatch="//" if bar.kind == "send" else None,
                    edgecolor="black", linewidth=0.4)  # fmt: skip
            if bar.kind == "compute" and not plan.stage_start_s:
                ax.text((bar.start_s + bar.end_s) / 2 * 1e3, y, f"f{bar.frame}", ha="center", va="center",
                        fontsize=7)  # fmt: skip
        ax.set_yticks(range(len(lanes)), lanes)
        ax.invert_yaxis()
        ax.set_title(f"{name}: {plan.latency_s * 1e3:.3f} ms/frame, {plan.throughput_fps:.1f} frames/s "
                     f"({len(plan.stages)} stages)", fontsize=9, loc="left")  # fmt: skip
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("time (ms)")
    if title:
        fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plan_table(plans: Mapping[str, Plan]) -> str:
    """The plans as aligned text: latency, throughput, and each stage's device, size and time."""
    lines = [f"{'plan':<14} {'latency ms':>11} {'frames/s':>10}  stages (device: nodes, ms)"]
    for name, plan in plans.items():
        stages = " | ".join(f"{s.device}: {len(s.nodes)}, {s.time_s * 1e3:.3f}" for s in plan.stages[:8])
        more = f" | ... {len(plan.stages) - 8} more" if len(plan.stages) > 8 else ""
        lines.append(f"{name:<14} {plan.latency_s * 1e3:>11.3f} {plan.throughput_fps:>10.1f}  {stages}{more}")
    return "\n".join(lines)
