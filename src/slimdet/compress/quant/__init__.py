"""Quantization: simulated (fake-quant) PTQ and QAT, mixed precision, detector-aware float tail.

``quantize(model, QuantConfig(...), calib=batches) -> QuantResult``; export the result with
:func:`slimdet.export.qdq.export_qdq` to run it on ONNX Runtime's int8 kernels.
"""

from slimdet.compress.quant.calibrate import CALIBRATORS, RangeObserver, calibrate
from slimdet.compress.quant.config import Granularity, LayerQuant, QuantConfig
from slimdet.compress.quant.quantize import QuantResult, quantize, replay_quantize, set_quant_mode
from slimdet.compress.quant.quantizers import Mode, Quantizer, ScaleType

__all__ = [
    "CALIBRATORS",
    "Granularity",
    "LayerQuant",
    "Mode",
    "QuantConfig",
    "QuantResult",
    "Quantizer",
    "RangeObserver",
    "ScaleType",
    "calibrate",
    "quantize",
    "replay_quantize",
    "set_quant_mode",
]
