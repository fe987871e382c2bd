"""Run a recipe into a run directory, one step at a time, resumably.

Run directory layout::

    recipe.yaml            the resolved recipe (every default filled in)
    input_model.pt         the model the recipe starts from (stage 0)
    steps/NN_name/         one folder per step: record.json, and model.pt for steps that change the model
    metrics.json           every finished step's metrics, grouped by model stage
    state.json             the finished steps (written last after each step: the commit point)
    report.html            written when the run finishes
    run.lock               held (flock) while a run writes here

A step counts as finished only once its checkpoint, record and the state are on disk, so an
interrupted run resumes from the last finished step and repeats none of them.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

import slimdet
from slimdet.errors import ConfigError, SlimdetError
from slimdet.io import atomic_write_json, atomic_write_text, ensure_dir, save_checkpoint
from slimdet.models.base import Detector
from slimdet.pipeline.lock import RUN_LOCK, run_lock
from slimdet.pipeline.recipe import Recipe, load_recipe, recipe_differences
from slimdet.pipeline.steps import RunContext, StepOutput, get_step

STATE_VERSION = 1
INPUT_CHECKPOINT = "input_model.pt"


@dataclass
class RunResult:
    """A finished run: its folder, final model and checkpoint, metrics and report."""

    run_dir: Path
    recipe: Recipe
    model: Detector
    checkpoint: Path
    metrics: dict[str, Any]
    report_path: Path
    #: step folders run by this call, and those found finished from an earlier call
    ran: list[str]
    skipped: list[str]


def run_recipe(
    recipe: str | Path | Recipe | dict[str, Any],
    *,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
) -> RunResult:
    """Apply a recipe's steps in order and write the run directory ``out_dir``.

    Args:
        recipe: a recipe file, a loaded Recipe, or a dict (paths relative to the current folder).
        out_dir: the run directory; must be empty or absent unless ``resume``.
        resume: continue the run stored in ``out_dir`` (same recipe), repeating no finished step.
        progress: print a line per step (and let steps show progress bars).

    Raises:
        ConfigError: invalid recipe, a non-empty ``out_dir`` without ``resume``, a different
            recipe on resume, or another run holding the directory's lock.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    run_dir = Path(out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: the run directory path is a file; choose another --out")
    ensure_dir(run_dir, what="run directory")
    with run_lock(run_dir):
        state = _start_or_resume(run_dir, recipe, resume=resume, progress=progress)
        return _run_steps(run_dir, recipe, state, progress=progress)


def _run_steps(run_dir: Path, recipe: Recipe, state: dict[str, Any], *, progress: bool) -> RunResult:
    from slimdet.models import load_model

    records = {e["index"]: _read_json(run_dir / e["dir"] / "record.json") for e in state["finished"]}
    checkpoint = current_checkpoint(state)
    model, _ = load_model(run_dir / checkpoint)
    stage = max((e["stage"] for e in state["finished"]), default=0)
    total = len(recipe.steps)
    ran, skipped = [], []
    datasets: dict[Any, Any] = {}
    for index, spec in enumerate(recipe.steps):
        label = step_label(index, spec.name)
        if index in records:
            skipped.append(label)
            _log(progress, f"[{index + 1}/{total}] {spec.name}: finished earlier, skipped")
            continue
        step = get_step(spec.name)
        step_dir = run_dir / "steps" / label
        leftovers = step_dir.is_dir() and any(step_dir.iterdir())
        step_dir.mkdir(parents=True, exist_ok=True)
        ctx = RunContext(
            recipe=recipe,
            run_dir=run_dir,
            step_dir=step_dir,
            step_index=index,
            step_name=spec.name,
            stage=stage,
            resume=leftovers,
            progress=progress,
            history=[records[i] for i in sorted(records)],
            datasets=datasets,
        )
        _log(progress, f"[{index + 1}/{total}] {spec.name} ...")
        start = time.perf_counter()
        try:
            with seeded(recipe.seed + index):
                out = step.fn(ctx, model, spec.options)
        except BaseException as exc:
            _log(progress, f"[{index + 1}/{total}] {spec.name}: failed after {time.perf_counter() - start:.1f} s")
            if isinstance(exc, SlimdetError):
                _name_the_step(exc, recipe.source, f"steps[{index}].{spec.name}")
            raise
        if not isinstance(out, StepOutput):
            raise TypeError(f"step {spec.name!r} returned {type(out).__name__}, expected a StepOutput")
        elapsed_s = time.perf_counter() - start
        if step.changes_model:
            stage += 1
            checkpoint = f"steps/{label}/model.pt"
            save_checkpoint(
                run_dir / checkpoint,
                model_config=out.model.model_config,
                state_dict=out.model.state_dict(),
                slimdet_run={"stage": stage, "step": label},
            )
        entry = {
            "index": index,
            "name": spec.name,
            "dir": f"steps/{label}",
            "stage": stage,
            "changes_model": step.changes_model,
            "checkpoint": checkpoint,
            "time_s": round(elapsed_s, 3),
        }
        records[index] = {
            **entry,
            "options": spec.options.model_dump(mode="json"),
            "finished": _now(),
            "record": out.record,
            "metrics": out.metrics,
        }
        atomic_write_json(step_dir / "record.json", records[index])
        records[index] = _read_json(step_dir / "record.json")  # as a resumed run will see it (lists, not tuples)
        state["finished"].append(entry)
        atomic_write_json(run_dir / "metrics.json", build_metrics(state, records))
        atomic_write_json(run_dir / "state.json", state)
        model = out.model
        ran.append(label)
        _log(progress, f"[{index + 1}/{total}] {spec.name}: done in {elapsed_s:.1f} s")

    if not state.get("completed"):
        state["completed"] = _now()
        atomic_write_json(run_dir / "state.json", state)
    metrics = build_metrics(state, records)
    atomic_write_json(run_dir / "metrics.json", metrics)
    from slimdet.report import write_report

    report_path = write_report(run_dir)
    return RunResult(run_dir, recipe, model, run_dir / checkpoint, metrics, report_path, ran, skipped)


def _name_the_step(exc: SlimdetError, source: str, where: str) -> None:
    """Prefix a step's user error with the recipe file and the step (``recipe.yaml: steps[2].prune: ...``),
    unless it names them already, so that the message says which step of which recipe failed."""
    text = str(exc)
    if not text.startswith(f"{source}: {where}"):
        exc.args = (f"{source}: {where}: {text}",)


def build_metrics(state: dict[str, Any], records: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Finished steps' metrics, by step and by model stage (stage 0 is the input model).

    Within a stage, ``metrics[step_name]`` holds the latest measurement of that step.
    """
    stages = [{"stage": 0, "name": "baseline", "checkpoint": INPUT_CHECKPOINT, "metrics": {}}]
    steps = []
    for entry in state["finished"]:
        rec = records[entry["index"]]
        label = Path(entry["dir"]).name
        if entry["changes_model"]:
            stages.append({"stage": entry["stage"], "name": label, "checkpoint": entry["checkpoint"], "metrics": {}})
        stages[entry["stage"]]["metrics"][entry["name"]] = rec["metrics"]
        steps.append(
            {"index": entry["index"], "name": entry["name"], "stage": entry["stage"], "metrics": rec["metrics"]}
        )
    return {"stages": stages, "steps": steps}


def current_checkpoint(state: dict[str, Any]) -> str:
    """The checkpoint (relative to the run dir) of the model after the last finished step."""
    changed = [e for e in state["finished"] if e["changes_model"]]
    return changed[-1]["checkpoint"] if changed else INPUT_CHECKPOINT


def step_label(index: int, name: str) -> str:
    return f"{index:02d}_{name}"


def _start_or_resume(run_dir: Path, recipe: Recipe, *, resume: bool, progress: bool) -> dict[str, Any]:
    others = sorted(p.name for p in run_dir.iterdir() if p.name != RUN_LOCK)
    if not resume:
        if others:
            raise ConfigError(
                f"{run_dir}: run directory is not empty ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}); "
                "pass --resume to continue the run stored there, or choose another --out"
            )
        return _start(run_dir, recipe, progress=progress)
    stored_path = run_dir / "recipe.yaml"
    if not stored_path.is_file():
        if others:
            raise ConfigError(
                f"{run_dir}: cannot resume: no recipe.yaml here, so this is not a slimdet run directory "
                f"(found {', '.join(others[:5])}); choose another --out"
            )
        return _start(run_dir, recipe, progress=progress)
    stored = load_recipe(stored_path, check_files=False)
    diffs = recipe_differences(stored, recipe)
    if diffs:
        shown = "\n  ".join(diffs[:10]) + ("\n  ..." if len(diffs) > 10 else "")
        raise ConfigError(
            f"{run_dir}: cannot resume: the recipe differs from the one this run started with "
            f"({stored_path}):\n  {shown}\nuse another --out for a run with the new recipe"
        )
    state_path = run_dir / "state.json"
    if not state_path.is_file():  # interrupted while setting up
        return _start(run_dir, recipe, progress=progress)
    state = _read_json(state_path)
    if state.get("version") != STATE_VERSION:
        raise ConfigError(
            f"{state_path}: unsupported state version {state.get('version')!r} (expected {STATE_VERSION})"
        )
    done = [e["name"] for e in state["finished"]]
    _log(progress, f"resuming {run_dir}: {len(done)} of {len(recipe.steps)} steps finished earlier")
    return state


def _start(run_dir: Path, recipe: Recipe, *, progress: bool) -> dict[str, Any]:
    header = f"# resolved recipe, written by slimdet {slimdet.__version__} from {recipe.source}\n"
    atomic_write_text(run_dir / "recipe.yaml", header + recipe.to_yaml())
    model, source = _input_model(recipe)
    save_checkpoint(
        run_dir / INPUT_CHECKPOINT,
        model_config=model.model_config,
        state_dict=model.state_dict(),
        slimdet_run={"stage": 0, "source": source},
    )
    state = {
        "version": STATE_VERSION,
        "started": _now(),
        "completed": None,
        "input": source,
        "environment": {
            "slimdet": slimdet.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "git_commit": git_commit(),
        },
        "finished": [],
    }
    atomic_write_json(run_dir / "metrics.json", build_metrics(state, {}))
    atomic_write_json(run_dir / "state.json", state)
    _log(progress, f"run {run_dir}: {len(recipe.steps)} steps, input {source['kind']} {source['value']}")
    return state


def _input_model(recipe: Recipe) -> tuple[Detector, dict[str, Any]]:
    from slimdet.models import create_model, load_model

    if recipe.checkpoint is not None:
        model, _ = load_model(recipe.checkpoint)
        if model.input_size != recipe.input_size:
            raise ConfigError(
                f"{recipe.source}: input_size: the model in {recipe.checkpoint} takes {model.input_size} px "
                f"inputs but the recipe says {recipe.input_size}"
            )
        return model, {"kind": "checkpoint", "value": recipe.checkpoint}
    num_classes = dataset_num_classes(recipe.dataset)
    with seeded(recipe.seed):
        model = create_model(recipe.model, num_classes=num_classes, input_size=recipe.input_size, **recipe.model_kwargs)
    if recipe.init is None:
        return model, {"kind": "model", "value": recipe.model}
    from slimdet.compress.metainit import init_from

    init_from(model, recipe.init)
    return model, {"kind": "model", "value": f"{recipe.model} from {recipe.init}", "init": recipe.init}


def dataset_num_classes(source: str) -> int:
    """Number of classes of a dataset, read from its YAML (or its first split when not listed)."""
    from slimdet.data import load_dataset, load_spec, resolve_source

    spec = load_spec(resolve_source(source))
    if spec.names:
        return len(spec.names)
    return load_dataset(source, next(iter(spec.splits))).num_classes


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed Python, NumPy and torch (CPU) for the body and restore their previous states after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def git_commit() -> str | None:
    """The commit of the slimdet source tree, when it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(slimdet.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read run file: {exc}") from None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _log(progress: bool, line: str) -> None:
    if progress:
        print(line, file=sys.stderr, flush=True)
