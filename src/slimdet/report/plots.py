"""Report plots as PNG bytes, drawn with matplotlib's Agg canvas (no pyplot, no global backend)."""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING, Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from slimdet.report import StageSummary

_DPI = 100


def png_base64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def map_vs_latency(stages: list[StageSummary], *, batch_size: int = 1) -> bytes | None:
    """mAP@.5 against median latency per stage (ONNX Runtime, else PyTorch); None without data."""
    runtime = "onnxruntime-cpu"
    if not any((runtime, batch_size) in s.latency for s in stages):
        runtime = "torch-eager"
    points = [
        (s.latency[(runtime, batch_size)][0] * 1e3, s.map50, s.name)
        for s in stages
        if s.map50 is not None and (runtime, batch_size) in s.latency
    ]
    if not points:
        return None
    fig, ax = _figure(5.5, 3.8)
    xs, ys, names = zip(*points, strict=True)
    ax.plot(xs, ys, "-o", color="#2b6cb0")
    for x, y, name in points:
        ax.annotate(_text(name), (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    label = "ONNX Runtime" if runtime == "onnxruntime-cpu" else "PyTorch"
    ax.set_xlabel(f"{label} latency, batch {batch_size}, median (ms)")
    ax.set_ylabel("mAP@.5")
    ax.set_title("accuracy vs latency per model stage")
    ax.grid(True, alpha=0.3)
    ax.set_xlim(left=0, right=max(xs) * 1.25)
    return _png(fig)


def per_class_ap(stages: list[StageSummary]) -> bytes | None:
    """AP@[.5:.95] per class, one bar group per class and one bar per stage that was evaluated."""
    measured = [s for s in stages if s.per_class_ap]
    if not measured:
        return None
    classes = list(dict.fromkeys(c for s in measured for c in s.per_class_ap))
    width = 0.8 / len(measured)
    fig, ax = _figure(max(5.5, 0.45 * len(classes) * max(1, len(measured) / 2)), 3.6)
    for k, s in enumerate(measured):
        xs = [i + (k - (len(measured) - 1) / 2) * width for i in range(len(classes))]
        ax.bar(xs, [s.per_class_ap.get(c, 0.0) for c in classes], width=width, label=_text(s.name))
    ax.set_xticks(range(len(classes)), [_text(str(c)[:16]) for c in classes], rotation=45 if len(classes) > 12 else 0)
    ax.set_ylabel("AP@[.5:.95]")
    ax.set_title("per-class AP")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _png(fig)


def layer_macs(layers: list[dict[str, Any]], *, top: int = 20) -> bytes | None:
    """The ``top`` layers by MACs (batch 1), largest first; None without a layer table."""
    rows = sorted((r for r in layers if r.get("macs")), key=lambda r: r["macs"], reverse=True)[:top]
    if not rows:
        return None
    fig, ax = _figure(6.5, 0.25 * len(rows) + 1.2)
    names = [_short(str(r["name"])) for r in rows][::-1]
    ax.barh(names, [r["macs"] / 1e6 for r in rows][::-1], color="#dd6b20")
    ax.set_xlabel("MMACs (batch 1)")
    ax.set_title(f"top {len(rows)} layers by MACs")
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(True, axis="x", alpha=0.3)
    return _png(fig)


def loss_terms(curve: list[dict[str, float]]) -> bytes | None:
    """Every logged loss term against the training step (log scale); None without points."""
    if not curve:
        return None
    terms = [k for k in dict.fromkeys(k for point in curve for k in point) if k != "step"]
    fig, ax = _figure(6.0, 3.8)
    steps = [p["step"] for p in curve]
    for term in terms:
        values = [p.get(term) for p in curve]
        pairs = [(x, v) for x, v in zip(steps, values, strict=True) if v is not None and v > 0]
        if pairs:
            xs, ys = zip(*pairs, strict=True)
            ax.plot(xs, ys, lw=2.2 if term == "loss" else 1.2, label=_text(term))
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (window mean)")
    ax.set_title("loss terms")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    return _png(fig)


def _figure(width: float, height: float) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _short(name: str, limit: int = 36) -> str:
    return _text(name if len(name) <= limit else "..." + name[-(limit - 3) :])


def _text(s: str) -> str:
    """Plain text for matplotlib: a '$' would otherwise start mathtext (and can fail to parse)."""
    return s.replace("$", r"\$")
