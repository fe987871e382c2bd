"""The run report: per-stage tables (terminal text and self-contained HTML) from a run directory.

``write_report(run_dir)`` reads ``recipe.yaml``, ``state.json``, ``metrics.json`` and the step
records and writes ``report.html``; ``summary_table(metrics)`` is the same table as plain text.
Measurements are recognised by content: an evaluate-like result has ``map50``, a profile-like one
has ``latency`` or ``params``, whichever step produced them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slimdet.errors import ConfigError
from slimdet.io import atomic_write_text

RUNTIME_LABELS = {"torch-eager": "PyTorch", "onnxruntime-cpu": "ORT"}


@dataclass
class StageSummary:
    """One model stage's numbers (None where not measured); latencies are seconds."""

    stage: int
    name: str
    params: int | None = None
    macs: int | None = None
    size_bytes: int | None = None
    onnx_size_bytes: int | None = None
    map: float | None = None
    map50: float | None = None
    eval_split: str | None = None
    per_class_ap: dict[str, float] = field(default_factory=dict)
    #: (runtime, batch size) -> (median_s, p90_s)
    latency: dict[tuple[str, int], tuple[float, float]] = field(default_factory=dict)
    threads: int | None = None
    #: hardware model (``simulate`` step): device -> (modelled latency ms, modelled energy µJ)
    modelled: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass
class ReportData:
    """Everything the HTML report shows, read from a run directory."""

    run_dir: Path
    recipe_text: str
    recipe: dict[str, Any]
    state: dict[str, Any]
    metrics: dict[str, Any]
    stages: list[StageSummary]
    steps: list[dict[str, Any]]
    #: per-layer rows of the latest profile, for the MACs chart
    layers: list[dict[str, Any]]


def stage_summaries(metrics: dict[str, Any]) -> list[StageSummary]:
    """Summaries of each stage in ``metrics.json`` (the latest measurement of each kind wins)."""
    out = []
    for stage in metrics.get("stages", []):
        s = StageSummary(stage=stage["stage"], name=stage["name"])
        for result in stage.get("metrics", {}).values():
            if not isinstance(result, dict):
                continue
            if "map50" in result:
                s.map, s.map50 = result.get("map"), result.get("map50")
                s.eval_split = result.get("split")
                s.per_class_ap = dict(result.get("per_class_ap") or {})
            if "latency" in result or "params" in result:
                s.params = result.get("params", s.params)
                s.macs = result.get("macs", s.macs)
                s.size_bytes = result.get("state_dict_size_bytes", s.size_bytes)
                s.onnx_size_bytes = result.get("onnx_size_bytes", s.onnx_size_bytes)
                s.threads = result.get("threads", s.threads)
                for lat in result.get("latency") or []:
                    s.latency[(lat["runtime"], int(lat["batch_size"]))] = (lat["median_s"], lat["p90_s"])
            if isinstance(result.get("modelled"), dict):
                for device, m in result["modelled"].items():
                    s.modelled[device] = (float(m["latency_ms"]), float(m["energy_uj"]))
        out.append(s)
    return out


def latency_columns(stages: list[StageSummary]) -> list[tuple[str, int]]:
    """The (runtime, batch) pairs measured in any stage: PyTorch first, then by batch size."""
    order = list(RUNTIME_LABELS)
    keys = {k for s in stages for k in s.latency}
    return sorted(keys, key=lambda k: (order.index(k[0]) if k[0] in order else len(order), k[0], k[1]))


def latency_label(key: tuple[str, int], *, short: bool = False) -> str:
    runtime = RUNTIME_LABELS.get(key[0], key[0])
    return f"{'PT' if short and runtime == 'PyTorch' else runtime} b{key[1]}"


def table_rows(stages: list[StageSummary], *, short: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the per-stage table (shared by the text and HTML reports).

    Latency cells are ``median/p90`` in milliseconds.
    """
    lat = latency_columns(stages)
    header = ["stage", "params", "MACs", "size", "ONNX", "mAP@[.5:.95]" if not short else "mAP", "mAP@.5"]
    devices = list(dict.fromkeys(d for s in stages for d in s.modelled))
    header += [f"{latency_label(k, short=short)} ms" for k in lat] + ["threads"]
    header += [h for d in devices for h in (f"{d} ms (model)", f"{d} µJ (model)")]
    rows = []
    for s in stages:
        row = [s.name, _count(s.params), _count(s.macs), _bytes(s.size_bytes), _bytes(s.onnx_size_bytes),
               _num(s.map), _num(s.map50)]  # fmt: skip
        for k in lat:
            v = s.latency.get(k)
            row.append(f"{v[0] * 1e3:.2f}/{v[1] * 1e3:.2f}" if v else "-")
        row.append(str(s.threads) if s.threads is not None else "-")
        for d in devices:
            v = s.modelled.get(d)
            row += [f"{v[0]:.3f}", f"{v[1]:,.0f}"] if v else ["-", "-"]
        rows.append(row)
    return header, rows


def summary_table(metrics: dict[str, Any]) -> str:
    """The per-stage table as aligned plain text, for the terminal."""
    header, rows = table_rows(stage_summaries(metrics), short=True)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in [header, *rows]]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("mAP: @[.5:.95]; size: state dict bytes; ONNX: exported file (int8 QDQ when quantized); "
                 "MACs at batch 1; latency ms: median/p90 of model.forward; (model): slimdet.hw cost models, batch 1")
    return "\n".join(lines)


def load_report_data(run_dir: str | Path) -> ReportData:
    """Read a run directory's recipe, state, metrics and step records."""
    run_dir = Path(run_dir)
    recipe_text = _read(run_dir / "recipe.yaml")
    state = json.loads(_read(run_dir / "state.json"))
    metrics = json.loads(_read(run_dir / "metrics.json"))
    steps = [json.loads(_read(run_dir / e["dir"] / "record.json")) for e in state.get("finished", [])]
    layers: list[dict[str, Any]] = []
    for rec in steps:
        if rec.get("name") == "profile" and isinstance(rec.get("record"), dict) and rec["record"].get("layers"):
            layers = rec["record"]["layers"]
    return ReportData(
        run_dir=run_dir,
        recipe_text=recipe_text,
        recipe=yaml.safe_load(recipe_text) or {},
        state=state,
        metrics=metrics,
        stages=stage_summaries(metrics),
        steps=steps,
        layers=layers,
    )


def write_report(run_dir: str | Path, *, out: str | Path | None = None) -> Path:
    """Write ``report.html`` (self-contained: inline CSS, PNG plots) for a run directory."""
    from slimdet.report.html import render_html

    data = load_report_data(run_dir)
    path = Path(out) if out is not None else data.run_dir / "report.html"
    return atomic_write_text(path, render_html(data))


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read run file ({exc.strerror}); is this a slimdet run directory?") from None


def _count(n: int | None) -> str:
    if n is None:
        return "-"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _num(x: float | None) -> str:
    return f"{x:.4f}" if x is not None else "-"


__all__ = [
    "ReportData",
    "StageSummary",
    "latency_columns",
    "load_report_data",
    "stage_summaries",
    "summary_table",
    "table_rows",
    "write_report",
]
