"""``slimdet schedule MODEL --devices npu,cpu`` and the recipe step share this: model -> graph -> plans."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from slimdet.errors import ConfigError
from slimdet.schedule.graph import Link, OpGraph, Plan
from slimdet.schedule.partition import Method
from slimdet.schedule.pipeline import best_throughput, schedule_plans
from slimdet.schedule.trace import model_graph, resolve_devices


@dataclass(frozen=True)
class ScheduleResult:
    """The graph that was planned and its plans by name."""

    graph: OpGraph
    plans: dict[str, Plan]
    bits: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"graph": self.graph.summary(), "bits": self.bits, "best_throughput": best_throughput(self.plans),
                "plans": {k: p.to_dict() for k, p in self.plans.items()}}  # fmt: skip


def schedule_model(
    model: nn.Module,
    devices: str | list[str],
    *,
    bits: int | None = None,
    method: Method | str = Method.AUTO,
    depth: int | None = None,
    link_bytes_per_s: float | None = None,
    link_latency_s: float | None = None,
) -> ScheduleResult:
    """Build the model's operator graph on ``devices`` and its plans (see :func:`schedule_plans`).

    A link option given alone keeps the other from :func:`~slimdet.schedule.trace.default_link`.
    """
    targets = resolve_devices(devices)
    link = None
    if link_bytes_per_s is not None or link_latency_s is not None:
        from slimdet.schedule.trace import default_link

        base = default_link(targets[0].spec, targets[-1].spec)
        link = Link(link_bytes_per_s if link_bytes_per_s is not None else base.bytes_per_s,
                    link_latency_s if link_latency_s is not None else base.latency_s)  # fmt: skip
    graph = model_graph(model, targets, bits=bits, link=link, depth=depth)
    from slimdet.schedule.split import executor_cuts

    cuts = executor_cuts([node.name for node in graph.nodes])  # "runnable-k": plans the executor can run
    return ScheduleResult(graph, schedule_plans(graph, method=method, cut_after=cuts or None), bits)


def float_on_integer_note(graph: OpGraph) -> str:
    """A hint when an integer accelerator can run nothing but the input (a float model)."""
    idle = [d.name for k, d in enumerate(graph.devices) if d.kind == "systolic" and graph.supported[:, k].sum() <= 1]
    if not idle:
        return ""
    return (f"note: {', '.join(idle)} runs no op of this float model (integer accelerator); pass --bits 8 to price "
            "it as deployed in int8, or give a quantized checkpoint")  # fmt: skip


def run_schedule(args: Any) -> int:
    """The CLI command (arguments from ``slimdet.cli``)."""
    from slimdet.io import atomic_write_text
    from slimdet.models import create_model, load_model
    from slimdet.schedule.gantt import plan_table, plot_gantt

    source = str(args.model)
    if Path(source).is_file():
        model, _ = load_model(source)
    elif source.endswith((".pt", ".pth")) or "/" in source:
        raise ConfigError(f"{source}: checkpoint file not found")
    else:
        model = create_model(source, num_classes=args.num_classes, input_size=args.input_size)
    if args.link_gb_per_s is not None and args.link_gb_per_s <= 0:
        raise ConfigError(f"--link-gb-per-s: expected > 0, got {args.link_gb_per_s}")
    result = schedule_model(
        model, args.devices, bits=args.bits, method=args.method, depth=args.depth,
        link_bytes_per_s=None if args.link_gb_per_s is None else args.link_gb_per_s * 1e9,
        link_latency_s=None if args.link_latency_us is None else args.link_latency_us * 1e-6,
    )  # fmt: skip
    g = result.graph
    print(f"{source}: {len(g)} nodes, {len(g.edges)} edges on {', '.join(f'{d.name} ({d.kind})' for d in g.devices)}"
          + (f", priced at {args.bits} bits" if args.bits else ""))  # fmt: skip
    note = float_on_integer_note(g)
    if note:
        print(note)
    print(plan_table(result.plans))
    best = best_throughput(result.plans)
    plan = result.plans[best]
    print(f"\nhighest throughput: {best}")
    for k, stage in enumerate(plan.stages):
        send = f", then {plan.transfers[k][2] * 1e3:.3f} ms to {plan.transfers[k][1]}" if k < len(plan.transfers) \
            and not plan.stage_start_s else ""  # fmt: skip
        print(f"  stage {k} on {stage.device}: {stage.time_s * 1e3:.3f} ms, {len(stage.nodes)} nodes "
              f"({stage.nodes[0]} .. {stage.nodes[-1]}){send}")  # fmt: skip
    if args.out is not None:
        atomic_write_text(args.out / "schedule.json", json.dumps(result.to_dict(), indent=2) + "\n")
        path = plot_gantt(result.plans, args.out / "gantt.png", title=source)
        print(f"\nplans: {args.out / 'schedule.json'}\ngantt: {path}")
    return 0
