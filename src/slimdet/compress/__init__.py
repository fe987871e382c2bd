"""Model compression: each transform is one config plus one verb, and records how to replay it.

Importing this package registers the replayers that ``slimdet.models.load_model`` uses to rebuild
compressed architectures from their records.
"""

from slimdet.compress.importance import IMPORTANCE, make_importance
from slimdet.compress.prune import Allocation, PruneConfig, PruneResult, Scope, protected_layers, prune

__all__ = [
    "IMPORTANCE",
    "Allocation",
    "PruneConfig",
    "PruneResult",
    "Scope",
    "make_importance",
    "protected_layers",
    "prune",
]
