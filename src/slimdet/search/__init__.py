"""Searches that decide compression configs: sensitivity scans and allocations, run here or on Ray."""

from slimdet.search.parallel import Backend, TrialRunner
from slimdet.search.sensitivity import SensitivityResult, allocate, sensitivity_scan, sensitivity_weights

__all__ = ["Backend", "SensitivityResult", "TrialRunner", "allocate", "sensitivity_scan", "sensitivity_weights"]
