"""Exporters: ONNX FP32 (more formats join here as they are written)."""

from slimdet.export.onnx import Exporter, ExportError, ExportResult, export_onnx, onnx_session

__all__ = ["ExportError", "ExportResult", "Exporter", "export_onnx", "onnx_session"]
