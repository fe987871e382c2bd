"""Does the deployed integer model detect what the simulation promised?

Users of quantization toolkits keep finding, after deployment, that the runtime's int8 model scores
lower than the simulated one (different rounding, fused ops, a grid the kernel does not support).
:func:`check_consistency` measures both on the same images and fails loudly on a gap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from slimdet.errors import SlimdetError
from slimdet.models.base import Detector


class QuantConsistencyError(SlimdetError):
    """The runtime's integer model and the simulated quantized model disagree in accuracy."""


@dataclass(frozen=True)
class ConsistencyResult:
    onnx_path: str
    num_images: int
    map50_simulated: float
    map50_runtime: float
    map_simulated: float
    map_runtime: float
    tolerance_points: float

    @property
    def gap_points(self) -> float:
        """|simulated - runtime| mAP@.5 in points (percent)."""
        return 100 * abs(self.map50_simulated - self.map50_runtime)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gap_points": self.gap_points}


def check_consistency(
    model: Detector,
    onnx_path: str | Path,
    dataset: Any,
    *,
    tolerance_points: float = 0.5,
    threads: int = 1,
    raise_on_gap: bool = True,
    progress: bool = True,
) -> ConsistencyResult:
    """mAP of the simulated model and of ONNX Runtime running ``onnx_path`` on ``dataset``.

    Raises:
        QuantConsistencyError: the mAP@.5 values differ by more than ``tolerance_points`` points.
    """
    from slimdet.evaluate import evaluate
    from slimdet.models.onnx import OrtDetector

    sim = evaluate(model, dataset, progress=progress)
    runtime = evaluate(OrtDetector(onnx_path, like=model, threads=threads), dataset, progress=progress)
    result = ConsistencyResult(
        onnx_path=str(onnx_path),
        num_images=sim.num_images,
        map50_simulated=sim.map50,
        map50_runtime=runtime.map50,
        map_simulated=sim.map,
        map_runtime=runtime.map,
        tolerance_points=tolerance_points,
    )
    if raise_on_gap and result.gap_points > tolerance_points:
        raise QuantConsistencyError(
            f"{onnx_path}: ONNX Runtime's integer model scores mAP@.5 {100 * runtime.map50:.2f} but the simulated "
            f"quantized model {100 * sim.map50:.2f} on {sim.num_images} images: a gap of {result.gap_points:.2f} "
            f"points, more than the {tolerance_points} allowed; the deployed model is not the one that was validated"
        )
    return result
