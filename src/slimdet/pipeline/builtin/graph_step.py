"""Recipe step ``graph``: graph passes (BatchNorm folding, fusion, dead code, ...) on the current model.

Its options are slimdet.compress.graph's GraphConfig fields, plus the images the outputs are
checked on. The model after it runs the optimized graph; the run's checkpoint after it rebuilds
that graph through the recorded transform. It is an inference step: put it after fine-tuning and
before ``quantize`` / ``export``.
"""

from __future__ import annotations

from pydantic import ConfigDict, Field

from slimdet.compress.graph import GraphConfig, optimize_graph
from slimdet.models.base import Detector
from slimdet.pipeline.steps import RunContext, StepOutput, register_step


class GraphOptions(GraphConfig):
    """GraphConfig plus the real images the outputs are checked on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: the outputs are compared on this many evenly spaced images of ``check_split``
    check_images: int = Field(4, ge=1)
    check_split: str = "val"


@register_step("graph", options=GraphOptions, changes_model=True)
def graph_step(ctx: RunContext, model: Detector, opts: GraphOptions) -> StepOutput:
    """Fold BatchNorm, fuse conv + activation, drop dead and no-op nodes; outputs checked equal on real images."""
    from slimdet.data.dataset import collate

    dataset = ctx.dataset(opts.check_split)
    if opts.check_images < len(dataset):
        dataset = dataset.subset(opts.check_images)
    images, _ = collate([dataset[i] for i in range(len(dataset))])
    param = next(model.parameters(), None)
    cfg = GraphConfig(**{k: getattr(opts, k) for k in GraphConfig.model_fields})
    result = optimize_graph(model, cfg, example=images.to(param.device) if param is not None else images)
    metrics = {
        "nodes_before": result.nodes_before,
        "nodes_after": result.nodes_after,
        "params_before": result.params_before,
        "params_after": result.params_after,
        "max_rel_error": result.max_rel_error,
        "scopes": list(result.scopes),
        "changes": {p.name: len(p.changes) for p in result.passes},
    }
    (ctx.step_dir / "graph.txt").write_text(result.to_text() + "\n")
    return StepOutput(model, record=result.to_dict(), metrics=metrics)
