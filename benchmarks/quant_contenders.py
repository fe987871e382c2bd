"""The quantization benchmark's contenders and its interleaved ONNX Runtime timing (issue 4).

Both contenders take the FP32 file written by ``slimdet.export.onnx.export_onnx`` and the same
calibration images, and run with their library's defaults, as a user following the README would:

* ``ort_quantize_static``: ``onnxruntime.quantization.quantize_static``. Defaults of onnxruntime 1.31:
  QDQ format, per-tensor (``per_channel=False``) int8 weights, int8 activations
  (``activation_type=QInt8``), MinMax calibration, no ``reduce_range``, no pre-processing
  (``quant_pre_process``) step.
* ``nncf_quantize``: ``nncf.quantize`` on the ``onnx.ModelProto`` (NNCF's ONNX backend), defaults:
  preset "performance" (symmetric int8), ``subset_size=300`` (so every image of a smaller
  calibration set is used), fast bias correction.

NNCF is not a dependency of slimdet: it lives in ``benchmarks/.venv-bench`` (``make bench-env``),
and is imported only when ``nncf_quantize`` is called, so this module also loads in the project's
``.venv`` for everything else. NNCF's usage telemetry (on unless opted out) is switched off for
that import.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from slimdet.errors import ConfigError
from slimdet.export.onnx import INPUT_NAME, onnx_session
from slimdet.profiling.latency import LatencyStat, summarize, time_interleaved


def ort_quantize_static(fp32_onnx: str | Path, out_onnx: str | Path, calib_images: np.ndarray) -> Path:
    """Quantize ``fp32_onnx`` with ONNX Runtime's ``quantize_static`` at its default settings.

    Args:
        fp32_onnx: an FP32 slimdet export (input ``images``).
        out_onnx: the quantized file to write.
        calib_images: N x 3 x S x S float images in [0, 1], fed in batches of the file's batch size.
    """
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    feeds = _calibration_feeds(fp32_onnx, calib_images)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    out = Path(out_onnx)
    out.parent.mkdir(parents=True, exist_ok=True)
    quantize_static(str(fp32_onnx), str(out), _Reader())
    return out


def nncf_quantize(fp32_onnx: str | Path, out_onnx: str | Path, calib_images: np.ndarray) -> Path:
    """Quantize ``fp32_onnx`` with ``nncf.quantize`` (ONNX backend) at its default settings.

    Args:
        fp32_onnx: an FP32 slimdet export (input ``images``).
        out_onnx: the quantized file to write.
        calib_images: N x 3 x S x S float images in [0, 1], fed in batches of the file's batch size.

    Raises:
        ConfigError: NNCF is not installed in this interpreter's environment.
    """
    nncf = _import_nncf()
    feeds = _calibration_feeds(fp32_onnx, calib_images)
    quantized = nncf.quantize(onnx.load(str(fp32_onnx)), nncf.Dataset(feeds))
    out = Path(out_onnx)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(quantized, str(out))
    return out


@dataclass(frozen=True)
class InterleavedLatency:
    """Latency of several ONNX files timed in turn in one process, and their speed-ups over ``baseline``."""

    baseline: str
    threads: int
    batch_size: int
    stats: dict[str, LatencyStat]  # name -> median / p90 / min seconds over ``runs``
    speedup: dict[str, float]  # name -> baseline median / this median (> 1: faster than the baseline)

    @property
    def median_s(self) -> dict[str, float]:
        return {name: s.median_s for name, s in self.stats.items()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_onnx_interleaved(
    onnx_files: Mapping[str, str | Path],
    *,
    baseline: str,
    threads: int = 1,
    warmup: int = 20,
    runs: int = 200,
    seed: int = 0,
) -> InterleavedLatency:
    """Time ONNX Runtime CPU sessions of ``onnx_files`` interleaved (``time_interleaved``) at batch 1.

    Every session gets the same random batch-1 input; files must share the input shape.

    Args:
        onnx_files: contender name -> ONNX file (a slimdet export, input ``images``, batch 1 or dynamic).
        baseline: the name the speed-ups are relative to.
        threads: ONNX Runtime intra-op threads of every session.
        warmup: untimed calls per session before timing.
        runs: timed calls per session.
        seed: seed of the input image.

    Raises:
        ConfigError: ``baseline`` is not a contender, or the files' input shapes differ.
    """
    if baseline not in onnx_files:
        raise ConfigError(f"time_onnx_interleaved: baseline {baseline!r} is not one of {list(onnx_files)}")
    sessions = {name: onnx_session(path, threads) for name, path in onnx_files.items()}
    shapes = {name: tuple(_batch1(s.get_inputs()[0].shape)) for name, s in sessions.items()}
    if len(set(shapes.values())) != 1:
        raise ConfigError(f"time_onnx_interleaved: the files' input shapes differ: {shapes}")
    x = np.random.default_rng(seed).random(next(iter(shapes.values())), dtype=np.float32)
    fns = {name: (lambda s=s: s.run(None, {INPUT_NAME: x})) for name, s in sessions.items()}
    times = time_interleaved(fns, warmup=warmup, runs=runs)
    stats = {name: summarize("onnxruntime-cpu", 1, t) for name, t in times.items()}
    base = stats[baseline].median_s
    return InterleavedLatency(
        baseline=baseline,
        threads=threads,
        batch_size=1,
        stats=stats,
        speedup={name: base / s.median_s for name, s in stats.items()},
    )


def _import_nncf() -> Any:
    # NNCF sends usage telemetry unless told otherwise (opt-out); NNCF_CI, read once when nncf is first
    # imported (nncf/telemetry/wrapper.py) and used for nothing else, swaps in its no-op telemetry stub.
    # Set only around the import, so the process environment is left as it was.
    before = os.environ.get("NNCF_CI")
    os.environ["NNCF_CI"] = "1"
    try:
        import nncf
    except ImportError:
        raise ConfigError(
            "nncf_quantize needs NNCF, which is not a slimdet dependency: run `make bench-env` and use "
            "benchmarks/.venv-bench/bin/python"
        ) from None
    finally:
        if before is None:
            os.environ.pop("NNCF_CI", None)
        else:
            os.environ["NNCF_CI"] = before
    return nncf


def _calibration_feeds(fp32_onnx: str | Path, calib_images: np.ndarray) -> list[dict[str, np.ndarray]]:
    """``{"images": batch}`` feeds in the file's batch size (1 for a dynamic batch dimension)."""
    proto = onnx.load(str(fp32_onnx), load_external_data=False)
    inputs = [i for i in proto.graph.input if i.name == INPUT_NAME]
    if not inputs:
        raise ConfigError(f"{fp32_onnx}: no graph input named {INPUT_NAME!r} (not a slimdet export)")
    dims = inputs[0].type.tensor_type.shape.dim
    batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else 1
    images = np.asarray(calib_images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0 or len(images) % batch:
        raise ConfigError(
            f"calibration images must be a non-empty N x 3 x S x S array with N a multiple of the batch size "
            f"{batch} of {fp32_onnx}, got shape {images.shape}"
        )
    want = [d.dim_value for d in dims[1:]]
    if list(images.shape[1:]) != want:
        raise ConfigError(f"calibration images are {list(images.shape[1:])} per image, {fp32_onnx} takes {want}")
    return [{INPUT_NAME: np.ascontiguousarray(images[i : i + batch])} for i in range(0, len(images), batch)]


def _batch1(shape: list[Any]) -> Iterator[int]:
    if isinstance(shape[0], int) and shape[0] != 1:
        raise ConfigError(f"time_onnx_interleaved: times batch 1, but a file has a fixed batch size of {shape[0]}")
    yield 1  # batch 1, whether the file's batch dimension is 1 or symbolic
    for d in shape[1:]:
        if not isinstance(d, int):
            raise ConfigError(f"time_onnx_interleaved: only the batch dimension may be symbolic, got {shape}")
        yield d
