"""Recipe steps: a registry of ``fn(ctx, model, opts) -> StepOutput`` filled by ``@register_step``.

A step receives the current model and its validated options, and returns the (possibly new)
model, a record of what it did and the metrics it measured. Steps that change the model (train,
prune, quantize, ...) start a new model *stage*: the runner saves a checkpoint after them and
attaches later measurements to that stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from slimdet.models.base import Detector
from slimdet.registry import Registry

if TYPE_CHECKING:
    from slimdet.pipeline.recipe import Recipe


class StepOptions(BaseModel):
    """Base for step options: unknown keys are rejected and options are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoOptions(StepOptions):
    """For steps that take no options."""


@dataclass
class StepOutput:
    """What a step returns: the model to hand on, a JSON-able record and JSON-able metrics."""

    model: Detector
    record: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunContext:
    """What a running step may use besides the model: the recipe, its folder, datasets, history."""

    recipe: Recipe
    run_dir: Path
    step_dir: Path
    step_index: int
    step_name: str
    stage: int
    #: True when an earlier attempt of this very step left files in ``step_dir`` (resume mid-step)
    resume: bool = False
    progress: bool = True
    #: finished steps of this run, oldest first: dicts with index, name, stage, metrics
    history: list[dict[str, Any]] = field(default_factory=list)
    #: loaded dataset splits, shared by the steps of one run
    datasets: dict[tuple[str, bool, bool], Any] = field(default_factory=dict, repr=False)

    def dataset(self, split: str, *, augment: bool = False, cache_images: bool = False) -> Any:
        """The recipe's dataset split (a DetectionDataset), loaded once per run."""
        key = (split, augment, cache_images)
        if key not in self.datasets:
            from slimdet.data import load_dataset

            self.datasets[key] = load_dataset(
                self.recipe.dataset,
                split,
                input_size=self.recipe.input_size,
                augment=augment,
                cache_images=cache_images,
            )
        return self.datasets[key]

    def where(self, option: str | None = None) -> str:
        """``recipe.yaml: steps[2].evaluate.split`` for error messages about this step."""
        path = f"steps[{self.step_index}].{self.step_name}" + (f".{option}" if option else "")
        return f"{self.recipe.source}: {path}"


StepFn = Callable[[RunContext, Detector, Any], StepOutput]


@dataclass(frozen=True)
class StepDef:
    """A registered step."""

    name: str
    fn: StepFn
    options: type[BaseModel]
    changes_model: bool
    doc: str = ""


class StepRegistry(Registry[StepDef]):
    def unregister(self, name: str) -> None:
        """Remove a step (for tests that register temporary steps)."""
        self._items.pop(name, None)


STEPS = StepRegistry("step")


def register_step(
    name: str, *, options: type[BaseModel] = NoOptions, changes_model: bool = True
) -> Callable[[StepFn], StepFn]:
    """Register ``fn(ctx, model, opts) -> StepOutput`` as recipe step ``name``.

    Args:
        name: the name recipes use.
        options: pydantic model of the step's options; must forbid extra keys.
        changes_model: whether the step may change the model. Such steps get a checkpoint saved
            after them and start a new stage; measuring steps (evaluate, profile, export) do not.
    """
    if options.model_config.get("extra") != "forbid":
        raise ValueError(f"step {name!r}: options model {options.__name__} must set extra='forbid'")

    def deco(fn: StepFn) -> StepFn:
        doc = (fn.__doc__ or "").strip().splitlines()
        STEPS.register(name)(StepDef(name, fn, options, changes_model, doc[0] if doc else ""))
        return fn

    return deco


def get_step(name: str) -> StepDef:
    _import_builtin_steps()
    return STEPS.get(name)


def list_steps() -> list[str]:
    _import_builtin_steps()
    return STEPS.names()


def _import_builtin_steps() -> None:
    # Importing the modules runs their @register_step decorators.
    from slimdet.pipeline.builtin import compress as _compress  # noqa: F401
    from slimdet.pipeline.builtin import graph_step as _graph  # noqa: F401
    from slimdet.pipeline.builtin import hw_step as _hw  # noqa: F401
    from slimdet.pipeline.builtin import lowrank_step as _lowrank  # noqa: F401
    from slimdet.pipeline.builtin import measure as _measure  # noqa: F401
    from slimdet.pipeline.builtin import quant_step as _quant  # noqa: F401
    from slimdet.pipeline.builtin import schedule_step as _schedule  # noqa: F401
    from slimdet.pipeline.builtin import share_step as _share  # noqa: F401
    from slimdet.pipeline.builtin import sparsity_step as _sparsity  # noqa: F401
    from slimdet.pipeline.builtin import train as _train  # noqa: F401
