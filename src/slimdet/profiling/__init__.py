"""Building blocks of ``slimdet.profile``: MAC counting and latency / memory measurement."""

from slimdet.profiling.latency import (
    LatencyStat,
    peak_forward_alloc_bytes,
    percentile,
    time_interleaved,
    torch_threads,
)
from slimdet.profiling.macs import LayerProfile, conv_macs, conv_transpose_macs, layer_macs, layer_table, linear_macs

__all__ = [
    "LatencyStat",
    "LayerProfile",
    "conv_macs",
    "conv_transpose_macs",
    "layer_macs",
    "layer_table",
    "linear_macs",
    "peak_forward_alloc_bytes",
    "percentile",
    "time_interleaved",
    "torch_threads",
]
