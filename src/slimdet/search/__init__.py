"""Searches that decide compression configs: sensitivity scans and allocations."""

from slimdet.search.sensitivity import SensitivityResult, allocate, sensitivity_scan, sensitivity_weights

__all__ = ["SensitivityResult", "allocate", "sensitivity_scan", "sensitivity_weights"]
