"""Model compression: each transform is one config plus one verb, and records how to replay it.

Importing this package registers the replayers that ``slimdet.models.load_model`` uses to rebuild
compressed architectures from their records.
"""

from slimdet.compress.distill import DistillConfig, Distiller
from slimdet.compress.graph import GraphConfig, GraphResult, optimize_graph
from slimdet.compress.importance import IMPORTANCE, make_importance
from slimdet.compress.lowrank import LowRank, LowRankConfig, LowRankResult, decompose, factorize
from slimdet.compress.metainit import MetaInitConfig, TaskFamily, init_from, pretrain_union, run_metainit
from slimdet.compress.prune import Allocation, PruneConfig, PruneResult, Scope, protected_layers, prune
from slimdet.compress.quant import LayerQuant, QuantConfig, QuantResult, quantize
from slimdet.compress.share import ShareConfig, ShareResult, share_weights
from slimdet.compress.sparsity import SparsityConfig, SparsityResult, make_permanent, sparse_storage_bytes, sparsify

__all__ = [
    "IMPORTANCE",
    "Allocation",
    "DistillConfig",
    "Distiller",
    "GraphConfig",
    "GraphResult",
    "LayerQuant",
    "LowRank",
    "LowRankConfig",
    "LowRankResult",
    "MetaInitConfig",
    "PruneConfig",
    "PruneResult",
    "QuantConfig",
    "QuantResult",
    "Scope",
    "ShareConfig",
    "ShareResult",
    "SparsityConfig",
    "SparsityResult",
    "TaskFamily",
    "decompose",
    "factorize",
    "init_from",
    "make_importance",
    "make_permanent",
    "optimize_graph",
    "pretrain_union",
    "protected_layers",
    "prune",
    "quantize",
    "run_metainit",
    "share_weights",
    "sparse_storage_bytes",
    "sparsify",
]
