"""The recipe: which model, which dataset, which target, and the ordered steps to apply.

Example (see ``recipes/default.yaml``)::

    checkpoint: ../src/slimdet/assets/yolo-s_digits-det.pt   # or: model: yolo-s
                                 #   (with model: also init: <a 'slimdet metainit' checkpoint>)
    dataset: digits-det          # a built-in name or the path of a dataset YAML
    target: cpu
    steps:
      - evaluate                 # a step name ...
      - profile: {batch_sizes: [1, 8], runs: 10}   # ... or {name: {options}}

Loading validates everything and fills in every default; ``Recipe.to_dict()`` is the resolved
recipe that a run directory stores, and loading it again gives an equal ``Recipe``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slimdet.errors import ConfigError
from slimdet.pipeline.steps import get_step, list_steps
from slimdet.pipeline.validation import error_messages, join_path
from slimdet.registry import unknown_name_message


class _TopLevel(BaseModel):
    """The recipe's top-level keys; ``steps`` are validated one by one against their own options."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = None
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    init: str | None = None
    checkpoint: str | None = None
    dataset: str
    target: str = "cpu"
    input_size: int = Field(160, ge=8)
    seed: int = 0
    steps: list[Any] = Field(min_length=1)


@dataclass(frozen=True)
class StepSpec:
    """One step of a recipe: a registered step name and its validated options."""

    name: str
    options: BaseModel

    def to_dict(self) -> dict[str, Any]:
        return {self.name: self.options.model_dump(mode="json")}


@dataclass(frozen=True)
class Recipe:
    """A validated recipe with every default filled in and paths made absolute."""

    dataset: str
    steps: tuple[StepSpec, ...]
    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    #: a metainit checkpoint the registry ``model`` starts from (``slimdet.compress.metainit.init_from``)
    init: str | None = None
    checkpoint: str | None = None
    target: str = "cpu"
    input_size: int = 160
    seed: int = 0
    #: the file it was read from (for messages); not part of the recipe itself
    source: str = field(default="<recipe>", compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_kwargs": dict(self.model_kwargs),
            "init": self.init,
            "checkpoint": self.checkpoint,
            "dataset": self.dataset,
            "target": self.target,
            "input_size": self.input_size,
            "seed": self.seed,
            "steps": [s.to_dict() for s in self.steps],
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


def load_recipe(
    recipe: str | Path | dict[str, Any],
    *,
    base_dir: str | Path | None = None,
    source: str | None = None,
    check_files: bool = True,
) -> Recipe:
    """Read and validate a recipe from a YAML file or a dict; raises ConfigError naming the field.

    Relative ``checkpoint``, ``init`` and dataset paths resolve against the recipe file's folder (or
    ``base_dir`` for a dict), then the current directory. ``source`` names a dict recipe in
    messages; ``check_files=False`` accepts missing files (for a stored recipe on resume).
    """
    if isinstance(recipe, dict):
        source, raw = source or "<recipe>", recipe
        folder = Path(base_dir) if base_dir is not None else Path.cwd()
    else:
        path = Path(recipe)
        source, raw, folder = str(path), _read_yaml(path), path.parent
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of recipe keys, got {type(raw).__name__}")
    try:
        top = _TopLevel.model_validate(raw)
    except ValidationError as exc:
        raise _config_error(source, error_messages(exc, _TopLevel)) from None

    if (top.model is None) == (top.checkpoint is None):
        raise ConfigError(
            f"{source}: give exactly one of 'model' (a registry name) or 'checkpoint' (a checkpoint file path)"
        )
    if top.init is not None and top.model is None:
        raise ConfigError(
            f"{source}: init: only used with 'model' (a metainit checkpoint initialises a registry model built "
            "for the dataset's classes); a 'checkpoint' already holds trained weights, so drop one of the two"
        )
    if top.checkpoint is not None and top.model_kwargs:
        raise ConfigError(f"{source}: model_kwargs: only used with 'model'; a checkpoint stores its own config")
    if "input_size" in top.model_kwargs:
        raise ConfigError(f"{source}: model_kwargs.input_size: set the top-level 'input_size' instead")
    if top.model is not None:
        _check_model_name(source, top.model)
    checkpoint = (
        _resolve_path(source, "checkpoint", top.checkpoint, folder, check_files) if top.checkpoint is not None else None
    )
    init = _resolve_path(source, "init", top.init, folder, check_files) if top.init is not None else None
    steps = tuple(_parse_step(source, i, item) for i, item in enumerate(top.steps))
    return Recipe(
        model=top.model,
        model_kwargs=top.model_kwargs,
        init=init,
        checkpoint=checkpoint,
        dataset=_resolve_dataset(source, top.dataset, folder, check_files),
        target=_resolve_path(source, "target", top.target, folder, check_files)
        if top.target.endswith((".yaml", ".yml"))
        else _check_target(source, top.target),
        input_size=top.input_size,
        seed=top.seed,
        steps=steps,
        source=source,
    )


#: generic target labels a recipe may name instead of a hardware preset or spec file
TARGET_LABELS = ("cpu", "gpu")


def _check_target(source: str, target: str) -> str:
    """A label (cpu, gpu) or a hardware preset; anything else is a typo that would otherwise silently fall back
    to the default device of the hardware steps."""
    from slimdet.hw.spec import list_presets
    from slimdet.registry import unknown_name_message

    options = [*TARGET_LABELS, *list_presets()]
    if target not in options:
        raise ConfigError(f"{source}: target: {unknown_name_message('target', target, options)}, or a hardware "
                          "spec file (.yaml)")  # fmt: skip
    return target


def recipe_differences(a: Recipe, b: Recipe) -> list[str]:
    """Field paths where two recipes differ (``steps[1].profile.runs``), for resume messages."""
    out: list[str] = []
    _diff(a.to_dict(), b.to_dict(), [], out)
    return out


def _diff(a: Any, b: Any, path: list[str | int], out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            _diff(a.get(key, "<absent>"), b.get(key, "<absent>"), [*path, key], out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(x, y, [*path, i], out)
    elif a != b:
        out.append(f"{join_path(path) or '(top level)'}: {a!r} -> {b!r}")


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None


def _parse_step(source: str, index: int, item: Any) -> StepSpec:
    where = f"steps[{index}]"
    if isinstance(item, str):
        name, options = item, {}
    elif isinstance(item, dict) and len(item) == 1:
        name, options = next(iter(item.items()))
        options = {} if options is None else options
    else:
        raise ConfigError(
            f"{source}: {where}: expected a step name or a one-key mapping {{name: {{options}}}}, got {item!r}"
        )
    if not isinstance(name, str) or name not in list_steps():
        raise ConfigError(f"{source}: {where}: {unknown_name_message('step', str(name), list_steps())}")
    if not isinstance(options, dict):
        raise ConfigError(f"{source}: {where}.{name}: expected a mapping of options, got {options!r}")
    options_cls = get_step(name).options
    try:
        return StepSpec(name=name, options=options_cls.model_validate(options))
    except ValidationError as exc:
        raise _config_error(source, error_messages(exc, options_cls, prefix=("steps", index, name))) from None


def _check_model_name(source: str, name: str) -> None:
    from slimdet.models import list_models

    known = list_models()
    if name not in known:
        raise ConfigError(f"{source}: model: {unknown_name_message('model', name, known)}")


def _resolve_dataset(source: str, value: str, folder: Path, check_files: bool) -> str:
    looks_like_path = value.endswith((".yaml", ".yml")) or "/" in value or "\\" in value
    if looks_like_path:
        return _resolve_path(source, "dataset", value, folder, check_files)
    import slimdet.data.builtin  # noqa: F401  (registers the built-in datasets)
    from slimdet.data import BUILTIN_DATASETS

    if value not in BUILTIN_DATASETS:
        raise ConfigError(
            f"{source}: dataset: {unknown_name_message('built-in dataset', value, BUILTIN_DATASETS.names())}"
            " (or give the path of a dataset YAML file)"
        )
    return value


def _resolve_path(source: str, key: str, value: str, folder: Path, check_files: bool) -> str:
    path = Path(value).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [folder / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate.resolve())
    if not check_files:
        return str(candidates[0].absolute())
    tried = " or ".join(str(c) for c in dict.fromkeys(candidates))
    raise ConfigError(f"{source}: {key}: file not found: {value!r} (looked for {tried})")


def _config_error(source: str, lines: list[str]) -> ConfigError:
    if len(lines) == 1:
        return ConfigError(f"{source}: {lines[0]}")
    return ConfigError(f"{source}: {len(lines)} problems:\n" + "\n".join(f"  {ln}" for ln in lines))
