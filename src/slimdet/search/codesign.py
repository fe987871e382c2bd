"""Joint model x accelerator design-space exploration: ``codesign(model, dataset, CodesignConfig(), out_dir=...)``.

Compression policies (fraction of MACs kept by pruning, weight bits) are applied to the model and
their mAP measured once each; every policy's layer table is then run through the systolic-array
model (:mod:`slimdet.hw.systolic`) on every accelerator configuration of the grid (array size, SRAM
sizes, DRAM bandwidth, dataflow), which costs milliseconds per pair. Each (policy, accelerator)
point has mAP@.5, modelled latency and energy, and an area proxy (PEs x bits + SRAM bytes,
:meth:`~slimdet.hw.spec.SystolicSpec.area_proxy`); the Pareto front over the four is written as a
table, plots and an HTML page, and the chosen point as a recipe (plus its hardware spec) that
``slimdet compress`` re-runs. Finished policies are cached in the output folder: an interrupted run
resumes where it stopped.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from slimdet.errors import ConfigError
from slimdet.hw.layers import GemmLayer, LayerTable
from slimdet.hw.spec import Dataflow, SystolicSpec, load_spec, replace
from slimdet.io import atomic_write_json, atomic_write_text, save_checkpoint
from slimdet.search.parallel import Backend, TrialRunner
from slimdet.search.pareto import pareto_front

CALIB_BATCHES = 4  # calibration images are cut into this many batches, in the search and in the chosen recipe
OBJECTIVES = {"map50": "max", "latency_ms": "min", "energy_uj": "min", "area": "min"}


class HardwareSpace(BaseModel):
    """The accelerator configurations searched: every combination of the lists, on top of ``base``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: systolic preset (or spec file) whose other values (clock, bits, energy table) every point keeps
    base: str = "edge-npu"
    arrays: list[tuple[int, int]] = Field(default_factory=lambda: [(8, 8), (16, 16), (32, 32), (64, 64)], min_length=1)
    #: input and weight buffers each get this many KiB; the output buffer half of it
    sram_kib: list[int] = Field(default_factory=lambda: [32, 128, 512], min_length=1)
    dram_bytes_per_cycle: list[float] = Field(default_factory=lambda: [4.0, 8.0, 16.0, 32.0], min_length=1)
    dataflows: list[Dataflow] = Field(default_factory=lambda: [Dataflow.WS, Dataflow.OS], min_length=1)

    @field_validator("base")
    @classmethod
    def _systolic(cls, value: str) -> str:
        try:
            spec = load_spec(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if not isinstance(spec, SystolicSpec):
            raise ValueError(f"{value!r} is a {spec.kind} roofline device; the search needs a systolic accelerator")
        return value

    def specs(self) -> list[SystolicSpec]:
        base = load_spec(self.base)
        out = []
        for (rows, cols), kib, bw, df in itertools.product(self.arrays, self.sram_kib, self.dram_bytes_per_cycle,
                                                           self.dataflows):  # fmt: skip
            name = f"{base.name}-{rows}x{cols}-{kib}k-{bw:g}Bpc-{Dataflow(df).value}"
            out.append(replace(base, name=name, rows=rows, cols=cols, ifmap_sram_bytes=kib * 1024,
                               filter_sram_bytes=kib * 1024, ofmap_sram_bytes=kib * 512,
                               dram_bytes_per_cycle=bw, dataflow=df))  # fmt: skip
        return out  # type: ignore[return-value]


class CompressionSpace(BaseModel):
    """The compression policies searched: every (MACs kept, weight bits) pair."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: fraction of the model's MACs kept by structured pruning; 1.0 is the unpruned model
    macs_ratios: list[float] = Field(default_factory=lambda: [1.0, 0.6], min_length=1)
    weight_bits: list[int] = Field(default_factory=lambda: [8, 4], min_length=1)
    act_bits: int = 8
    importance: str = "l2"
    #: fine-tuning after pruning: epochs, and at most this many steps per epoch (None: the full epoch)
    finetune_epochs: int = Field(1, ge=0)
    finetune_steps_per_epoch: int | None = Field(40, ge=1)
    calib_images: int = Field(64, ge=8)
    adaround_iters: int = Field(50, ge=1)

    @field_validator("macs_ratios")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if any(not 0 < r <= 1 for r in value):
            raise ValueError(f"MACs ratios must be in (0, 1], got {value}")
        return sorted(set(value), reverse=True)

    @field_validator("weight_bits")
    @classmethod
    def _bits(cls, value: list[int]) -> list[int]:
        if any(b not in range(2, 9) for b in value):
            raise ValueError(f"weight bits must be in 2..8, got {value}")
        return sorted(set(value), reverse=True)


class CodesignConfig(BaseModel):
    """What ``slimdet codesign`` searches and how it picks the point it writes as a recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hardware: HardwareSpace = Field(default_factory=HardwareSpace)
    compression: CompressionSpace = Field(default_factory=CompressionSpace)
    #: mAP of each policy on this many evenly spaced images of the split (None: all)
    eval_split: str = "test"
    eval_images: int | None = Field(300, ge=1)
    #: the chosen point: on the Pareto front, within this many mAP@.5 points of the best, the smallest
    #: product of latency, energy and area
    max_map_drop_points: float = Field(1.0, ge=0)
    threads: int | None = Field(None, ge=1)
    seed: int = 0


@dataclass(frozen=True)
class CodesignResult:
    points: list[dict[str, Any]]  # every (policy, accelerator) pair
    pareto: list[int]  # indices into points
    chosen: int
    out_dir: Path
    recipe_path: Path
    time_s: float

    @property
    def chosen_point(self) -> dict[str, Any]:
        return self.points[self.chosen]


def codesign(
    model: Any,
    dataset: str,
    cfg: CodesignConfig,
    *,
    out_dir: str | Path,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    runner: TrialRunner | None = None,
) -> CodesignResult:
    """Search compression policies x accelerator configurations for ``model`` on ``dataset``.

    Args:
        model: a trained detector (not changed).
        dataset: built-in dataset name or dataset YAML.
        cfg: the search spaces and the selection rule.
        out_dir: results, plots, report.html, and ``chosen/recipe.yaml`` + ``chosen/hardware.yaml``.
        checkpoint: the file ``model`` came from, written into the chosen recipe (else the model is saved
            to ``out_dir/model.pt``).
        runner: where the policies are pruned, fine-tuned, quantized and evaluated, e.g. ``TrialRunner("ray")``;
            None runs them here with ``cfg.threads``. Runners with the same thread count give the same points.
    """
    from slimdet.data import calibration_batches, load_dataset
    from slimdet.hw.systolic import simulate

    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "codesign.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    specs = cfg.hardware.specs()
    size = model.input_size
    data = {"eval": load_dataset(dataset, cfg.eval_split, input_size=size),
            # the same images and batches as the chosen recipe's quantize step (calib_images, CALIB_BATCHES)
            "calib": calibration_batches(load_dataset(dataset, "train", input_size=size),
                                         images=cfg.compression.calib_images, batches=CALIB_BATCHES)}  # fmt: skip
    if cfg.eval_images is not None and cfg.eval_images < len(data["eval"]):
        data["eval"] = data["eval"].subset(cfg.eval_images)
    policies = [(r, b) for r in cfg.compression.macs_ratios for b in cfg.compression.weight_bits]
    results = {p: json.loads(_policy_path(out, *p).read_text()) for p in policies if _policy_path(out, *p).is_file()}
    todo = [p for p in policies if p not in results]
    runner = runner if runner is not None else TrialRunner(threads=cfg.threads)
    if todo:
        with runner.session():
            _run_policies(todo, model, cfg, dataset, data, out, runner, progress, results)
    points = []
    for ratio, bits in policies:
        res = results[(ratio, bits)]
        table = _table_from_json(res["table"])
        for spec in specs:
            sim = simulate(table, spec)
            points.append({"macs_ratio": ratio, "weight_bits": bits, "act_bits": cfg.compression.act_bits,
                           "hardware": spec.name, "map50": res["map50"], "latency_ms": sim.latency_s * 1e3,
                           "energy_uj": sim.energy_pj / 1e6, "area": spec.area_proxy(), "macs": res["macs"],
                           "utilization": sim.total_utilization, "rows": spec.rows, "cols": spec.cols,
                           "sram_kib": spec.ifmap_sram_bytes // 1024, "dram_bytes_per_cycle": spec.dram_bytes_per_cycle,
                           "dataflow": spec.dataflow.value})  # fmt: skip
    front = pareto_front(points, OBJECTIVES)
    chosen = choose(points, front, cfg.max_map_drop_points)
    spec_by_name = {s.name: s for s in specs}
    if checkpoint is None:
        checkpoint = save_checkpoint(out / "model.pt", model_config=model.model_config, state_dict=model.state_dict())
    recipe_path = _write_choice(out, points[chosen], spec_by_name[points[chosen]["hardware"]], cfg, dataset,
                                Path(checkpoint), size)  # fmt: skip
    result = CodesignResult(points=points, pareto=front, chosen=chosen, out_dir=out, recipe_path=recipe_path,
                            time_s=time.perf_counter() - start)  # fmt: skip
    from slimdet.search.codesign_report import write_outputs

    write_outputs(result, cfg)
    return result


def choose(points: list[dict[str, Any]], front: list[int], max_drop_points: float) -> int:
    """On the front, within ``max_drop_points`` mAP@.5 points of the best, the least latency x energy x area."""
    best = max(points[i]["map50"] for i in front)
    near = [i for i in front if points[i]["map50"] >= best - max_drop_points / 100 - 1e-12]
    return min(near, key=lambda i: (points[i]["latency_ms"] * points[i]["energy_uj"] * points[i]["area"],
                                    -points[i]["map50"]))  # fmt: skip


@dataclass(frozen=True)
class _Inputs:
    """What every policy trial reads (with Ray, stored once in the object store)."""

    model: Any  # the unpruned model
    pruned: dict[float, Any]  # MACs ratio -> pruned and fine-tuned model (those done)
    cfg: CodesignConfig
    dataset: str
    data: dict[str, Any]  # evaluation dataset, calibration batches
    out: Path  # absolute: a Ray worker may run in another folder
    progress: bool


def _run_policies(todo: list[tuple[float, int]], model: Any, cfg: CodesignConfig, dataset: str, data: dict[str, Any],
                  out: Path, runner: TrialRunner, progress: bool, results: dict) -> None:  # fmt: skip
    """Prune + fine-tune each MACs ratio of ``todo`` (or load its cached checkpoint), then quantize + evaluate
    each policy; every finished trial is saved at once, so an interrupted search loses only those running.

    Two waves of independent trials: the pruned models, with the policies that need none of them (the
    unpruned model's, and those whose pruned checkpoint is cached); then the other policies."""
    from slimdet.models import load_model

    pruned = {r: load_model(_pruned_path(out, r))[0] for r in {r for r, _ in todo} if _pruned_path(out, r).is_file()}
    to_prune = list(dict.fromkeys(r for r, _ in todo if r < 1.0 and r not in pruned))
    ready = [p for p in todo if p[0] not in to_prune]

    def save(task: tuple[float, int | None], result: Any) -> None:
        ratio, bits = task
        if bits is None:
            save_checkpoint(_pruned_path(out, ratio), model_config=result.model_config, state_dict=result.state_dict())
            pruned[ratio] = result
        else:
            results[(ratio, bits)] = result
            atomic_write_json(_policy_path(out, ratio, bits), result)

    for tasks in ([(r, None) for r in to_prune] + ready, [p for p in todo if p not in ready]):
        inputs = _Inputs(model, dict(pruned), cfg, dataset, data, out.resolve(),
                         progress and runner.backend == Backend.LOCAL)  # fmt: skip
        runner.run(_policy_trial, tasks, shared=inputs, seed=cfg.seed, on_result=save, progress=progress,
                   desc="codesign policies")  # fmt: skip


def _policy_trial(inputs: _Inputs, task: tuple[float, int | None]) -> Any:
    """``(ratio, None)``: the model pruned to ``ratio`` of its MACs and fine-tuned; ``(ratio, bits)``: that
    model's (or the unpruned model's, at 1.0) quantized mAP and layer table."""
    ratio, bits = task
    if bits is None:
        return _pruned(inputs.model, ratio, inputs.cfg, inputs.dataset, inputs.out, inputs.progress)
    model = inputs.model if ratio >= 1.0 else inputs.pruned[ratio]
    return _quantized(model, ratio, bits, inputs.cfg, inputs.data)


def _policy_path(out: Path, ratio: float, bits: int) -> Path:
    return out / "policies" / f"macs{ratio:g}_w{bits}.json"


def _pruned_path(out: Path, ratio: float) -> Path:
    return out / "policies" / f"macs{ratio:g}" / "model.pt"


def _pruned(model: Any, ratio: float, cfg: CodesignConfig, dataset: str, out: Path, progress: bool) -> Any:
    """A copy of ``model`` pruned to ``ratio`` of its MACs and fine-tuned (its training state in the
    ratio's folder, so that an interrupted fine-tune resumes)."""
    from slimdet.compress import PruneConfig, prune
    from slimdet.data import load_dataset
    from slimdet.train import TrainConfig, train

    comp = cfg.compression
    pruned = copy.deepcopy(model)
    prune(pruned, PruneConfig(importance=comp.importance, macs_ratio=ratio), progress=False)
    if comp.finetune_epochs:
        train_ds = load_dataset(dataset, "train", input_size=model.input_size, augment=True)
        train(pruned, train_ds, None, TrainConfig(epochs=comp.finetune_epochs, lr=1e-3, warmup_epochs=0.1,
                                                  max_steps_per_epoch=comp.finetune_steps_per_epoch, eval_every=0,
                                                  seed=cfg.seed),
              out_dir=_pruned_path(out, ratio).parent / "finetune", resume=True, progress=progress)  # fmt: skip
    return pruned.eval()


def _quantized(model: Any, ratio: float, bits: int, cfg: CodesignConfig, data: dict) -> dict[str, Any]:
    """mAP and layer table of ``model`` quantized to ``bits``-bit weights (simulated quantization)."""
    from slimdet.compress.quant import QuantConfig, quantize
    from slimdet.evaluate import evaluate
    from slimdet.hw.layers import layer_table

    comp = cfg.compression
    calib = data["calib"]
    qmodel = copy.deepcopy(model)
    t0 = time.perf_counter()
    quantize(qmodel, QuantConfig(weight_bits=bits, act_bits=comp.act_bits, runtime_aware=False,
                                 adaround_iters=comp.adaround_iters, calib_batches=len(calib)),
             calib=calib, progress=False)  # fmt: skip
    qmodel.eval()
    table = layer_table(qmodel, qmodel.example_inputs(1), postprocess=False)
    return {"macs_ratio": ratio, "weight_bits": bits, "map50": evaluate(qmodel, data["eval"], progress=False).map50,
            "macs": table.macs, "quantize_s": time.perf_counter() - t0,
            "table": [asdict(g) for g in table.gemm]}  # fmt: skip


def _table_from_json(rows: list[dict[str, Any]]) -> LayerTable:
    tuples = ("in_chw", "kernel", "stride", "padding", "out_hw")
    return LayerTable(gemm=tuple(GemmLayer(**{k: tuple(v) if k in tuples else v for k, v in r.items()}) for r in rows))


def _write_choice(out: Path, point: dict[str, Any], spec: SystolicSpec, cfg: CodesignConfig, dataset: str,
                  checkpoint: Path, size: int) -> Path:  # fmt: skip
    """``chosen/hardware.yaml`` and ``chosen/recipe.yaml``: the chosen point, re-runnable by ``slimdet compress``."""
    chosen = out / "chosen"
    chosen.mkdir(parents=True, exist_ok=True)
    head = (f"# Chosen by slimdet codesign (Pareto front of mAP@.5, latency, energy, area): {spec.name},\n"
            f"# derived from the {cfg.hardware.base!r} preset, whose sources apply to the values not "
            "searched.\n")  # fmt: skip
    atomic_write_text(chosen / "hardware.yaml", head + yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    comp = cfg.compression
    steps: list[Any] = [{"evaluate": {"split": cfg.eval_split}}, "simulate"]
    if point["macs_ratio"] < 1.0:
        steps.append({"prune": {"importance": comp.importance, "macs_ratio": point["macs_ratio"]}})
        if comp.finetune_epochs:
            finetune = {"epochs": comp.finetune_epochs, "lr": 1e-3, "warmup_epochs": 0.1, "val_split": None,
                        "max_steps_per_epoch": comp.finetune_steps_per_epoch}  # fmt: skip
            steps.append({"finetune": finetune})
    steps += [
        {"quantize": {"weight_bits": point["weight_bits"], "act_bits": comp.act_bits, "runtime_aware": False,
                      "adaround_iters": comp.adaround_iters, "calib_images": comp.calib_images,
                      "calib_batches": CALIB_BATCHES}},  # fmt: skip
        {"evaluate": {"split": cfg.eval_split}},
        "simulate",
        "export",
    ]
    recipe = {"checkpoint": str(checkpoint.resolve()), "dataset": dataset, "target": "hardware.yaml",
              "input_size": size, "seed": cfg.seed, "steps": steps}  # fmt: skip
    text = (f"# slimdet codesign's chosen point: {point['macs_ratio']:g} of the MACs, {point['weight_bits']}-bit "
            f"weights, on {spec.name}\n# (search: mAP@.5 {point['map50']:.4f} on {cfg.eval_images or 'all'} "
            f"{cfg.eval_split} images, modelled {point['latency_ms']:.3f} ms, {point['energy_uj']:,.0f} µJ, "
            f"area {point['area']:,.0f}).\n#   slimdet compress {chosen / 'recipe.yaml'} --out runs/codesign-chosen\n")
    path = atomic_write_text(chosen / "recipe.yaml", text + yaml.safe_dump(recipe, sort_keys=False))
    from slimdet.pipeline.recipe import load_recipe

    load_recipe(path)  # the recipe written must load: fail here rather than in the user's hands
    return path
