"""Clean an exported ONNX graph with onnxslim and count what it removed.

``slim_onnx(src, dst)`` runs onnxslim (constant folding, dead-node removal, common-subexpression
elimination, pattern fusions, shape inference) on ``src``, checks that ONNX Runtime gives the same
outputs for both files on one random input, and writes ``dst`` atomically. The result has the op
counts (op type -> number of nodes) before and after.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from slimdet.errors import ConfigError, ExportError
from slimdet.io import atomic_write

__all__ = ["SlimResult", "op_counts", "slim_onnx"]

# ONNX tensor element types of the inputs the check can make up
_NP_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
             onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.INT64: np.int64,
             onnx.TensorProto.INT32: np.int32}  # fmt: skip


@dataclass(frozen=True)
class SlimResult:
    """What onnxslim changed: op counts, node counts and file sizes before and after."""

    src: str
    dst: str
    op_counts_before: dict[str, int]
    op_counts_after: dict[str, int]
    size_bytes_before: int
    size_bytes_after: int
    #: largest absolute difference between the two files' outputs in ONNX Runtime (None: not checked)
    max_abs_diff: float | None
    time_s: float

    @property
    def nodes_before(self) -> int:
        return sum(self.op_counts_before.values())

    @property
    def nodes_after(self) -> int:
        return sum(self.op_counts_after.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "nodes_before": self.nodes_before, "nodes_after": self.nodes_after}


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Op type -> number of nodes in the top-level graph, most frequent first."""
    return dict(Counter(node.op_type for node in model.graph.node).most_common())


def slim_onnx(src: str | Path, dst: str | Path, *, check: bool = True, atol: float = 1e-4) -> SlimResult:
    """Run onnxslim on ``src`` and write the result to ``dst`` (may be the same file).

    Args:
        src: an ONNX file.
        dst: where the cleaned graph goes; written atomically, only after the check passed.
        check: compare both files in ONNX Runtime on one random input per graph input.
        atol: largest absolute output difference the check allows.

    Raises:
        ConfigError: ``src`` does not exist.
        ExportError: ``src`` is not a loadable ONNX file, onnxslim fails, or the check fails.
    """
    import onnxslim

    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ConfigError(f"slim_onnx: ONNX file {src} does not exist")
    try:
        before = onnx.load(str(src))
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError, OSError, ...
        raise ExportError(f"{src}: not a loadable ONNX file: {_first_line(exc)}") from None
    counts_before = op_counts(before)
    try:
        after = onnxslim.slim(before)
    except Exception as exc:  # noqa: BLE001 - onnxslim raises whatever its passes raise
        raise ExportError(f"{src}: onnxslim failed: {type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(after, onnx.ModelProto):
        raise ExportError(f"{src}: onnxslim returned {type(after).__name__}, not an ONNX model")
    data = after.SerializeToString()
    diff = _max_abs_diff(src, data) if check else None
    if diff is not None and not diff <= atol:
        raise ExportError(f"{src}: the onnxslim graph's outputs differ from the original's by {diff:.3g} "
                          f"(max abs), more than atol={atol:g}; {dst} was not written")  # fmt: skip
    atomic_write(dst, lambda f: f.write(data))
    return SlimResult(src=str(src), dst=str(dst), op_counts_before=counts_before, op_counts_after=op_counts(after),
                      size_bytes_before=src.stat().st_size, size_bytes_after=dst.stat().st_size,
                      max_abs_diff=diff, time_s=time.perf_counter() - start)  # fmt: skip


def _max_abs_diff(src: Path, slimmed: bytes) -> float:
    from slimdet.export.onnx import onnx_session

    a, b = onnx_session(src, threads=1), onnx_session(slimmed, threads=1)
    rng = np.random.default_rng(0)
    feeds = {}
    for inp in onnx.load(str(src), load_external_data=False).graph.input:
        t = inp.type.tensor_type
        if t.elem_type not in _NP_TYPES:
            raise ExportError(f"{src}: cannot make up a check input of ONNX element type {t.elem_type} "
                              f"for {inp.name!r}; use check=False")  # fmt: skip
        shape = [d.dim_value if d.HasField("dim_value") else 2 for d in t.shape.dim]
        feeds[inp.name] = rng.random(shape).astype(_NP_TYPES[t.elem_type])
    outs_a, outs_b = a.run(None, feeds), b.run(None, feeds)
    if len(outs_a) != len(outs_b):
        raise ExportError(f"{src}: onnxslim changed the number of outputs ({len(outs_a)} -> {len(outs_b)})")
    diff = 0.0
    for x, y in zip(outs_a, outs_b, strict=True):
        if x.shape != y.shape:
            raise ExportError(f"{src}: onnxslim changed an output's shape {x.shape} -> {y.shape}")
        if x.size:
            diff = max(diff, float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))))
    return diff


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
