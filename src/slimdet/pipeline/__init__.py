"""Recipes (YAML) -> steps -> a run directory with checkpoints, metrics.json and report.html.

Typical use::

    from slimdet.pipeline import run_recipe
    result = run_recipe("recipes/default.yaml", out_dir="runs/demo", resume=True)
    print(result.report_path)
"""

from slimdet.pipeline.recipe import Recipe, StepSpec, load_recipe, recipe_differences
from slimdet.pipeline.run import RunResult, build_metrics, run_recipe
from slimdet.pipeline.steps import (
    STEPS,
    NoOptions,
    RunContext,
    StepDef,
    StepOptions,
    StepOutput,
    get_step,
    list_steps,
    register_step,
)

__all__ = [
    "STEPS",
    "NoOptions",
    "Recipe",
    "RunContext",
    "RunResult",
    "StepDef",
    "StepOptions",
    "StepOutput",
    "StepSpec",
    "build_metrics",
    "get_step",
    "list_steps",
    "load_recipe",
    "recipe_differences",
    "register_step",
    "run_recipe",
]
