"""What ``slimdet codesign`` writes: every point (JSON), the Pareto front (CSV and Markdown), plots, report.html."""

from __future__ import annotations

import csv
import io
from html import escape
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from slimdet.io import atomic_write, atomic_write_json, atomic_write_text
from slimdet.report.plots import _png, png_base64

if TYPE_CHECKING:
    from slimdet.search.codesign import CodesignConfig, CodesignResult

COLUMNS = ["macs_ratio", "weight_bits", "hardware", "map50", "latency_ms", "energy_uj", "area", "utilization"]


def pareto_table(points: list[dict[str, Any]], front: list[int], chosen: int) -> str:
    """The Pareto points as a Markdown table, fastest first; the chosen one marked."""
    lines = ["| | MACs kept | weight bits | accelerator | mAP@.5 | latency (ms) | energy (µJ) | area | utilization |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for i in sorted(front, key=lambda i: (points[i]["latency_ms"], -points[i]["map50"])):
        p = points[i]
        lines.append(f"| {'**chosen**' if i == chosen else ''} | {p['macs_ratio']:g} | {p['weight_bits']} | "
                     f"{p['hardware']} | {p['map50']:.4f} | {p['latency_ms']:.3f} | {p['energy_uj']:,.0f} | "
                     f"{p['area']:,.0f} | {p['utilization']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_outputs(result: CodesignResult, cfg: CodesignConfig) -> None:
    out, points, front, chosen = result.out_dir, result.points, result.pareto, result.chosen
    summary = {"points": points, "pareto": front, "chosen": chosen, "time_s": result.time_s,
               "config": cfg.model_dump(mode="json")}  # fmt: skip
    atomic_write_json(out / "points.json", summary)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(points[i] for i in front)
    atomic_write_text(out / "pareto.csv", buf.getvalue())
    table = pareto_table(points, front, chosen)
    atomic_write_text(out / "pareto.md", table)
    figures = {
        "pareto_latency_map.png": _scatter(points, front, chosen, "latency_ms", "map50", "area",
                                           "modelled latency (ms)", "mAP@.5", "area proxy"),
        "pareto_latency_energy.png": _scatter(points, front, chosen, "latency_ms", "energy_uj", "map50",
                                              "modelled latency (ms)", "modelled energy (µJ)", "mAP@.5"),
        "pareto_area_latency.png": _scatter(points, front, chosen, "area", "latency_ms", "energy_uj",
                                            "area proxy (PEs x bits + SRAM bytes)", "modelled latency (ms)",
                                            "energy (µJ)"),
    }  # fmt: skip
    for name, png in figures.items():
        atomic_write(out / name, lambda f, png=png: f.write(png))
    c = points[chosen]
    html = [
        "<!doctype html><meta charset='utf-8'><title>slimdet codesign</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%}</style>",
        "<h1>Model x accelerator co-design</h1>",
        f"<p>{len(points)} points: {len({(p['macs_ratio'], p['weight_bits']) for p in points})} compression policies x "
        f"{len({p['hardware'] for p in points})} accelerator configurations (base {escape(cfg.hardware.base)}); "
        f"{len(front)} on the Pareto front of mAP@.5 (max), modelled latency, energy and area (min). "
        f"Search time {result.time_s:.0f} s.</p>",
        f"<p><b>Chosen</b> (within {cfg.max_map_drop_points:g} mAP@.5 points of the best on the front, the least "
        f"latency x energy x area): {c['macs_ratio']:g} of the MACs, {c['weight_bits']}-bit weights on "
        f"{escape(c['hardware'])}: mAP@.5 {c['map50']:.4f}, {c['latency_ms']:.3f} ms, {c['energy_uj']:,.0f} µJ, "
        f"area {c['area']:,.0f}. Re-run it: <code>slimdet compress {escape(str(result.recipe_path))} "
        "--out runs/codesign-chosen</code>.</p>",
        _html_table(points, front, chosen),
        *(f"<figure><img alt='{escape(n)}' src='data:image/png;base64,{png_base64(p)}'></figure>"
          for n, p in figures.items()),  # fmt: skip
    ]
    atomic_write_text(out / "report.html", "\n".join(html))


def _html_table(points: list[dict[str, Any]], front: list[int], chosen: int) -> str:
    head = "".join(f"<th>{h}</th>" for h in ["", "MACs kept", "weight bits", "accelerator", "mAP@.5", "latency (ms)",
                                              "energy (µJ)", "area", "utilization"])  # fmt: skip
    rows = []
    for i in sorted(front, key=lambda i: (points[i]["latency_ms"], -points[i]["map50"])):
        p = points[i]
        cells = ["chosen" if i == chosen else "", f"{p['macs_ratio']:g}", str(p["weight_bits"]), p["hardware"],
                 f"{p['map50']:.4f}", f"{p['latency_ms']:.3f}", f"{p['energy_uj']:,.0f}", f"{p['area']:,.0f}",
                 f"{p['utilization']:.2f}"]  # fmt: skip
        rows.append("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _scatter(points: list[dict[str, Any]], front: list[int], chosen: int, x: str, y: str, color: str,
             xlabel: str, ylabel: str, clabel: str) -> bytes:  # fmt: skip
    fig = Figure(figsize=(6.4, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = np.array([p[x] for p in points], float)
    ys = np.array([p[y] for p in points], float)
    ax.scatter(xs, ys, s=8, color="#cbd5e0", label="all points")
    f = np.array(front, int)
    sc = ax.scatter(xs[f], ys[f], s=28, c=[points[i][color] for i in front], cmap="viridis", label="Pareto front")
    fig.colorbar(sc, ax=ax, label=clabel)
    ax.scatter([xs[chosen]], [ys[chosen]], s=160, marker="*", color="#e53e3e", label="chosen", zorder=5)
    if x in ("latency_ms", "area", "energy_uj"):
        ax.set_xscale("log")
    if y in ("latency_ms", "energy_uj"):
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)
