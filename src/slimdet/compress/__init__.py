"""Model compression: each transform is one config plus one verb, and records how to replay it.

Importing this package registers the replayers that ``slimdet.models.load_model`` uses to rebuild
compressed architectures from their records.
"""

from slimdet.compress.importance import IMPORTANCE, make_importance
from slimdet.compress.prune import Allocation, PruneConfig, PruneResult, Scope, protected_layers, prune
from slimdet.compress.quant import LayerQuant, QuantConfig, QuantResult, quantize
from slimdet.compress.sparsity import SparsityConfig, SparsityResult, make_permanent, sparse_storage_bytes, sparsify

__all__ = [
    "IMPORTANCE",
    "Allocation",
    "LayerQuant",
    "PruneConfig",
    "PruneResult",
    "QuantConfig",
    "QuantResult",
    "Scope",
    "SparsityConfig",
    "SparsityResult",
    "make_importance",
    "make_permanent",
    "protected_layers",
    "prune",
    "quantize",
    "sparse_storage_bytes",
    "sparsify",
]
