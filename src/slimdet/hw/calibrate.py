"""Calibration of a roofline device against measured latencies (``slimdet.hw.measure`` times them).

Efficiencies, per-op overhead and optional per-dtype peak factors are fitted by SciPy's bounded least
squares on log(predicted / measured) over whole-model samples, from several starting points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from slimdet.errors import ConfigError
from slimdet.hw.layers import LayerTable
from slimdet.hw.roofline import roofline_terms
from slimdet.hw.spec import RooflineSpec, replace


@dataclass(frozen=True)
class Sample:
    """One measured latency of the ops in ``layers`` (a whole model, or one node's layer)."""

    layers: LayerTable
    latency_s: float
    name: str = ""
    dtype: str | None = None  # passed to roofline.estimate: None = each layer's own bits


FIT_FIELDS = ("compute_efficiency", "memory_efficiency", "op_overhead_s")
#: a fitted field "peak_macs_per_s.<dtype>" scales that type's datasheet peak by a factor in (0, 1]
PEAK_PREFIX = "peak_macs_per_s."
_BOUNDS = {"compute_efficiency": (1e-4, 1.0), "memory_efficiency": (1e-4, 1.0), "op_overhead_s": (0.0, 1e-3),
           PEAK_PREFIX: (1e-2, 1.0)}  # fmt: skip
_STARTS = {"compute_efficiency": (0.05, 0.3, 0.9), "memory_efficiency": (0.05, 0.3, 0.9),
           "op_overhead_s": (0.5e-6, 5e-6, 50e-6), PEAK_PREFIX: (0.25, 1.0)}  # fmt: skip


@dataclass(frozen=True)
class CalibrationFit:
    """The calibrated spec, the fitted values, and the fit's predictions of its own samples."""

    spec: RooflineSpec
    values: dict[str, float]  # fitted field -> value (a peak field: the factor applied to the datasheet peak)
    names: tuple[str, ...]
    measured_s: np.ndarray
    predicted_s: np.ndarray

    @property
    def errors(self) -> np.ndarray:
        """Relative prediction errors (predicted / measured - 1) on the calibration samples."""
        return self.predicted_s / self.measured_s - 1.0


def calibrate(spec: RooflineSpec, samples: Sequence[Sample], **kw: Any) -> RooflineSpec:
    """A copy of ``spec`` whose efficiencies and per-op overhead best predict ``samples``; see :func:`fit_roofline`."""
    return fit_roofline(spec, samples, **kw).spec


def fit_roofline(
    spec: RooflineSpec,
    samples: Sequence[Sample],
    *,
    fit: Sequence[str] = FIT_FIELDS,
    postprocess: bool = False,
    include_norm: bool = False,
    fuse_activations: bool = True,
) -> CalibrationFit:
    """Bounded least squares (scipy, trust-region reflective, several starts) on ``log(predicted / measured)``.

    The model is :func:`slimdet.hw.roofline.estimate`'s: per row ``max(compute_s / compute_efficiency,
    memory_s / memory_efficiency) + calls x op_overhead_s``, summed per sample.

    Args:
        spec: the device; fields not in ``fit`` are kept.
        samples: measured latencies; at least as many as fitted fields.
        fit: fields to fit among ``compute_efficiency``, ``memory_efficiency``, ``op_overhead_s`` and
            ``peak_macs_per_s.<dtype>`` (a factor in (0, 1] on a non-fp32 type's datasheet peak, for a runtime
            whose kernels of that type reach a smaller fraction of it than its fp32 kernels do; needs
            samples of both types).
        postprocess: whether the measurements include decode/NMS (a :func:`measure` timing does not).
        include_norm: whether the runtime ran batch norms unfolded.
        fuse_activations: whether the runtime fused ReLU-family activations into the convs.

    Raises:
        ConfigError: unknown field in ``fit``, too few samples, or a non-positive measured latency.
    """
    from scipy.optimize import least_squares

    peaks = [f.removeprefix(PEAK_PREFIX) for f in fit if f.startswith(PEAK_PREFIX)]
    unknown = [f for f in fit if f not in FIT_FIELDS and not f.startswith(PEAK_PREFIX)]
    unknown += [PEAK_PREFIX + d for d in peaks if d == "fp32" or d not in spec.peak_macs_per_s]
    if unknown or not fit or len(set(fit)) != len(fit):
        raise ConfigError(f"calibrate: fit must name distinct fields among {list(FIT_FIELDS)} and "
                          f"'{PEAK_PREFIX}<dtype>' for the spec's non-fp32 types {sorted(spec.peak_macs_per_s)}; "
                          f"got {list(fit)}")  # fmt: skip
    if len(samples) < len(fit):
        raise ConfigError(f"calibrate: {len(fit)} fitted fields need at least as many samples, got {len(samples)}")
    measured = np.asarray([s.latency_s for s in samples], dtype=np.float64)
    if not np.all(measured > 0):
        raise ConfigError("calibrate: every sample needs latency_s > 0")
    terms = [roofline_terms(s.layers, spec, dtype=s.dtype, include_norm=include_norm,
                            fuse_activations=fuse_activations, postprocess=postprocess) for s in samples]  # fmt: skip
    # one flat array of rows with the sample each belongs to: the prediction is a segmented sum
    owner = np.concatenate([np.full(len(t), i) for i, t in enumerate(terms)])
    compute = np.concatenate([t.ideal_compute_s for t in terms])
    memory = np.concatenate([t.ideal_memory_s for t in terms])
    calls = np.concatenate([t.calls for t in terms])
    dtypes = np.concatenate([np.asarray(t.dtypes, dtype=object) for t in terms])
    of_dtype = {d: dtypes == d for d in peaks}
    kind = [PEAK_PREFIX if f.startswith(PEAK_PREFIX) else f for f in fit]
    unit = np.asarray([1e-6 if k == "op_overhead_s" else 1.0 for k in kind])  # the solver sees microseconds
    base = {f: float(getattr(spec, f)) for f in FIT_FIELDS}

    def params(x: np.ndarray) -> dict[str, float]:
        return {**base, **{PEAK_PREFIX + d: 1.0 for d in peaks}, **dict(zip(fit, (x * unit).tolist(), strict=True))}

    def predict(p: dict[str, float]) -> np.ndarray:
        comp = compute / p["compute_efficiency"]
        for d, rows in of_dtype.items():
            comp = np.where(rows, comp / p[PEAK_PREFIX + d], comp)
        per_row = np.maximum(comp, memory / p["memory_efficiency"]) + calls * p["op_overhead_s"]
        return np.bincount(owner, weights=per_row, minlength=len(samples))

    def residuals(x: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(predict(params(x)), 1e-15)) - np.log(measured)

    lower = np.asarray([_BOUNDS[k][0] for k in kind]) / unit
    upper = np.asarray([_BOUNDS[k][1] for k in kind]) / unit
    best = None
    for start in np.array(np.meshgrid(*[_STARTS[k] for k in kind])).reshape(len(fit), -1).T:
        sol = least_squares(residuals, np.clip(start / unit, lower, upper), bounds=(lower, upper), method="trf")
        if best is None or sol.cost < best.cost:
            best = sol
    fitted = params(best.x)
    changes: dict[str, Any] = {f: fitted[f] for f in fit if f in FIT_FIELDS}
    if peaks:
        changes["peak_macs_per_s"] = {d: v * fitted.get(PEAK_PREFIX + d, 1.0) for d, v in spec.peak_macs_per_s.items()}
    new_spec = replace(spec, **changes)
    return CalibrationFit(spec=new_spec, values={f: fitted[f] for f in fit},  # type: ignore[arg-type]
                          names=tuple(s.name for s in samples),
                          measured_s=measured, predicted_s=predict(fitted))  # fmt: skip
