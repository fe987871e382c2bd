"""Render a run's report as one self-contained HTML page; every user string goes through ``escape``."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from slimdet.report import ReportData, StageSummary, latency_columns, plots, table_rows

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1200px;color:#1a202c;
  padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #e2e8f0}
table{border-collapse:collapse;margin:.6em 0}td,th{padding:.3em .7em;border:1px solid #e2e8f0;text-align:right}
th{background:#f7fafc}td:first-child,th:first-child{text-align:left}
table.kv td{text-align:left}table.kv td:first-child{color:#4a5568;white-space:nowrap}
tr.change td{background:#f0fff4;font-style:italic}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}figcaption{color:#4a5568;font-size:.9em}
pre{background:#f7fafc;padding:.6em;overflow:auto;max-height:28em;font-size:12px}
details{margin:.3em 0}summary{cursor:pointer}.muted{color:#718096}
"""
_RECORD_CHARS = 20_000  # longer step records are cut in the page (the full one is in record.json)


def render_html(data: ReportData) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>slimdet report: {escape(str(data.run_dir.name))}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>slimdet run report</h1>",
        f'<p class="muted">{escape(str(data.run_dir))}</p>',
        "<h2>Run</h2>",
        _kv_table(_run_summary(data)),
        "<h2>Model stages</h2>",
        _stage_table(data.stages),
        "<h2>Plots</h2>",
        _plots(data),
        "<h2>Steps</h2>",
        *(_step(rec, data.run_dir) for rec in data.steps),
        "" if data.steps else '<p class="muted">no finished steps</p>',
        "<h2>Resolved recipe</h2>",
        f"<pre>{escape(data.recipe_text)}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _run_summary(data: ReportData) -> list[tuple[str, str]]:
    recipe, state = data.recipe, data.state
    env = state.get("environment", {})
    source = state.get("input", {})
    steps = [next(iter(s)) if isinstance(s, dict) else str(s) for s in recipe.get("steps", [])]
    return [
        ("input model", f"{source.get('kind', '?')}: {source.get('value', '?')}"),
        ("dataset", str(recipe.get("dataset"))),
        ("target", str(recipe.get("target"))),
        ("input size", str(recipe.get("input_size"))),
        ("seed", str(recipe.get("seed"))),
        ("steps", " → ".join(steps)),
        ("started", str(state.get("started"))),
        ("completed", str(state.get("completed") or "not yet")),
        ("git commit", str(env.get("git_commit") or "unknown")),
        ("versions", f"slimdet {env.get('slimdet')}, torch {env.get('torch')}, python {env.get('python')}"),
        *(
            [("measured on", ", ".join(f"{k} {v}" for k, v in _measured_on(data).items()))]
            if _measured_on(data)
            else []
        ),
    ]


def _measured_on(data: ReportData) -> dict[str, Any]:
    """The environment of the latest profile (CPU model, runtime versions), if any."""
    found: dict[str, Any] = {}
    for rec in data.steps:
        env = (rec.get("metrics") or {}).get("environment")
        if isinstance(env, dict):
            found = env
    return found


def _kv_table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _stage_table(stages: list[StageSummary]) -> str:
    header, rows = table_rows(stages)
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    if len(stages) > 1:
        body += '<tr class="change">' + "".join(f"<td>{escape(c)}</td>" for c in _change_row(stages)) + "</tr>"
    note = (
        '<p class="muted">size: state dict bytes on disk; ONNX: the exported file (int8 QDQ for a quantized '
        "stage); MACs at batch 1; latency cells: median/p90 ms of "
        "model.forward (no NMS) over the profile's runs; (model): modelled by slimdet.hw (simulate step) at batch 1; "
        "last row: last stage vs first (ratio or difference).</p>"
    )
    return f'<table class="stages"><tr>{head}</tr>{body}</table>{note}'


def _change_row(stages: list[StageSummary]) -> list[str]:
    first, last = stages[0], stages[-1]
    cells = [f"{last.name} vs {first.name}"]
    for attr in ("params", "macs", "size_bytes", "onnx_size_bytes"):
        cells.append(_ratio(getattr(first, attr), getattr(last, attr)))
    for attr in ("map", "map50"):
        a, b = getattr(first, attr), getattr(last, attr)
        cells.append(f"{b - a:+.4f}" if a is not None and b is not None else "")
    for key in latency_columns(stages):
        a, b = first.latency.get(key), last.latency.get(key)
        cells.append(_ratio(a[0] if a else None, b[0] if b else None))
    cells.append("")  # threads
    for device in dict.fromkeys(d for s in stages for d in s.modelled):
        a, b = first.modelled.get(device), last.modelled.get(device)
        cells += [_ratio(a[i] if a else None, b[i] if b else None) for i in (0, 1)]
    return cells


def _ratio(a: float | None, b: float | None) -> str:
    return f"×{b / a:.2f}" if a and b is not None else ""


def _plots(data: ReportData) -> str:
    figures = [
        (plots.map_vs_latency(data.stages), "mAP@.5 vs latency (batch 1) per model stage"),
        (plots.per_class_ap(data.stages), "per-class AP@[.5:.95]"),
        (plots.layer_macs(data.layers), "layers with the most MACs (latest profile)"),
    ]
    out = [_figure(png, caption) for png, caption in figures if png is not None]
    return "".join(out) or '<p class="muted">no plots: the run has no evaluate and profile results yet</p>'


def _step(rec: dict[str, Any], run_dir: Path) -> str:
    label = rec.get("dir", "").rsplit("/", 1)[-1] or str(rec.get("name"))
    changed = " · new model stage" if rec.get("changes_model") else ""
    summary = f"{label} — {rec.get('time_s', 0):.1f} s — stage {rec.get('stage')}{changed}"
    record = dict(rec.get("record") or {})
    layers = record.pop("layers", None)
    figures = _step_figures(record, run_dir)
    blocks = [("options", rec.get("options")), ("metrics", rec.get("metrics")), ("record", record)]
    body = "".join(
        f"<p>{name}</p><pre>{escape(_json(value))}</pre>" for name, value in blocks if value not in (None, {}, [])
    )
    if layers:
        body += f"<p>layers ({len(layers)})</p>" + _layers_table(layers)
    return f"<details{' open' if figures else ''}><summary>{escape(summary)}</summary>{figures}{body}</details>"


def _step_figures(record: dict[str, Any], run_dir: Path) -> str:
    """The PNG plots a step wrote (record keys ending in ``_plot``: paths relative to the run folder)."""
    out = []
    for key, rel in record.items():
        path = run_dir / str(rel) if key.endswith("_plot") and isinstance(rel, str) else None
        if path is not None and path.suffix == ".png" and path.is_file():
            out.append(_figure(path.read_bytes(), key[: -len("_plot")].replace("_", " ")))
    return "".join(out)


def _figure(png: bytes, caption: str) -> str:
    return (
        f'<figure><img alt="{escape(caption)}" src="data:image/png;base64,{plots.png_base64(png)}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def _layers_table(layers: list[dict[str, Any]], limit: int = 1000) -> str:
    keys = list(layers[0])
    head = "".join(f"<th>{escape(k)}</th>" for k in keys)
    rows = "".join(
        "<tr>" + "".join(f"<td>{escape(_cell(row.get(k)))}</td>" for k in keys) + "</tr>" for row in layers[:limit]
    )
    more = f'<p class="muted">... {len(layers) - limit} more rows in record.json</p>' if len(layers) > limit else ""
    return f"<table>{head and f'<tr>{head}</tr>'}{rows}</table>{more}"


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return "x".join(map(str, value))
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _json(value: Any) -> str:
    text = json.dumps(value, indent=1, default=str)
    if len(text) > _RECORD_CHARS:
        text = text[:_RECORD_CHARS] + f"\n... ({len(text) - _RECORD_CHARS} more characters in record.json)"
    return text
