"""Exporters: ONNX FP32, QDQ ONNX for integer runtimes, the integer-only reference's hardware package."""

from slimdet.export.onnx import Exporter, ExportError, ExportResult, export_onnx, onnx_session
from slimdet.export.qdq import QdqExportResult, export_qdq

__all__ = ["ExportError", "ExportResult", "Exporter", "QdqExportResult", "export_onnx", "export_qdq", "onnx_session"]
