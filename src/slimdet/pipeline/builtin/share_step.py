"""Recipe step ``share``: per-layer k-means weight sharing (deep compression's second stage).

Its options are exactly slimdet.compress.share's ShareConfig fields. Typical recipe: ``sparsify``,
``finetune``, ``share``, ``finetune`` (which trains the centroids by gradient aggregation),
``evaluate``, then ``export`` with ``format: archive`` to write the Huffman-coded file.
"""

from __future__ import annotations

from slimdet.compress.share import ShareConfig, share_weights
from slimdet.models.base import Detector
from slimdet.pipeline.steps import RunContext, StepOutput, register_step


@register_step("share", options=ShareConfig, changes_model=True)
def share_step(ctx: RunContext, model: Detector, opts: ShareConfig) -> StepOutput:
    """Snap each layer's nonzero weights to 2^bits k-means centroids; bytes per compression stage."""
    result = share_weights(model, opts)
    metrics = {
        "layers": len(result.layers),
        "bits": opts.bits,
        "rel_error": result.rel_error,
        **{k: v for k, v in result.stages.to_dict().items() if k != "ratios"},
        **{f"ratio_{k}": v for k, v in result.stages.ratios().items()},
    }
    return StepOutput(model, record=result.to_dict(), metrics=metrics)
