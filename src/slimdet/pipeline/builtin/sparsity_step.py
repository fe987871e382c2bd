"""Recipe step ``sparsify``: magnitude sparsity (unstructured or n:m) on the current model.

Its options are exactly slimdet.compress.sparsity's SparsityConfig fields. The masks stay in the
model (``weight_orig * weight_mask``), so a ``finetune`` step after it keeps the zeros, and the
run's checkpoint after it rebuilds the masked model through the recorded transform.
"""

from __future__ import annotations

from slimdet.compress.sparsity import SparsityConfig, sparsify
from slimdet.models.base import Detector
from slimdet.pipeline.steps import RunContext, StepOutput, register_step


@register_step("sparsify", options=SparsityConfig, changes_model=True)
def sparsify_step(ctx: RunContext, model: Detector, opts: SparsityConfig) -> StepOutput:
    """Zero the smallest weights (unstructured or n:m); counts storage, no dense-runtime speed-up."""
    result = sparsify(model, opts)
    metrics = {
        "sparsity": result.sparsity,
        "target_sparsity": result.target_sparsity,
        "layers": len(result.layers),
        "dense_bytes": result.dense_bytes,
        "sparse_bytes": result.sparse_bytes,
        "model_dense_bytes": result.model_dense_bytes,
        "model_sparse_bytes": result.model_sparse_bytes,
        "note": result.note,
    }
    return StepOutput(model, record=result.to_dict(), metrics=metrics)
