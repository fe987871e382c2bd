"""Graph passes on a traced detector: ``optimize_graph(model, GraphConfig(...)) -> GraphResult``.

The model's ``forward`` is traced with torch.fx and rewritten by named passes, in order:

* ``identity``: nn.Identity, dropout (the result is an inference graph), reshapes / views /
  flattens / expands / permutes / ``contiguous`` that change nothing;
* ``dead_code``: nodes whose results never reach an output (and modules only they called);
* ``const_fold``: what depends only on parameters, buffers and literals, computed once;
* ``cse``: duplicated computations (same op, same inputs) computed once;
* ``fold_bn``: BatchNorm folded into the preceding conv / linear;
* ``rep_branches``: RepVGG-style parallel kxk + 1x1 + identity branches (each with an optional
  BatchNorm) summed -> one kxk conv;
* ``fuse_conv_act``: conv (+ BatchNorm) + activation -> one call.

Each pass reports the graph's nodes and the model's parameters before and after it and what it
changed; after each pass the model's outputs are compared with the original ones on the example
batch (and a batch one larger), and a relative error above ``tolerance`` raises. The passes run on
a copy first, so a failing check leaves the model untouched.

The optimized graph is *installed*: the model keeps its class, its attributes and the state-dict
names of what is left, and its ``forward`` runs the graph. Models that torch.fx cannot trace as a
whole (Faster R-CNN: data-dependent proposals) get the passes on their largest traceable
submodules. The model records the passes (``model_config["transforms"]``), and ``load_model``
runs them again on the freshly built model before loading the state dict. An installed graph
notices when its modules were replaced or re-shaped (pruning, ``.to()``) and traces itself again.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.fx as fx
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

# importing the pass modules registers their passes
from slimdet.compress import graph_fuse as _fuse  # noqa: F401
from slimdet.compress.graph_install import example_batch, install, installed_graph, take_installed_graph
from slimdet.compress.graph_passes import GRAPH_PASSES, PassContext
from slimdet.compress.graph_trace import Folded, GraphTracer, ZeroBranch, count_nodes, trace_module
from slimdet.errors import CheckpointError, ConfigError, SlimdetError
from slimdet.models.registry import record_transform, refuse_after_final, register_replay
from slimdet.registry import unknown_name_message

__all__ = ["DEFAULT_PASSES", "GraphCheckError", "GraphConfig", "GraphResult", "PassReport", "installed_graph",
           "optimize_graph", "rel_error", "take_installed_graph"]  # fmt: skip

RECORD_VERSION = 1
DEFAULT_PASSES = ("identity", "dead_code", "const_fold", "cse", "fold_bn", "rep_branches", "fuse_conv_act")


class GraphCheckError(SlimdetError):
    """A graph pass changed the model's outputs by more than the tolerance."""


class GraphConfig(BaseModel):
    """Which graph passes to run, in order, and how close the outputs must stay."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: pass names (see slimdet.compress.graph), run in this order
    passes: list[str] = Field(default_factory=lambda: list(DEFAULT_PASSES), min_length=1)
    #: largest relative output error allowed after each pass: max |new - old| / max |old| per output
    tolerance: float = Field(1e-5, gt=0)

    @field_validator("passes")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in GRAPH_PASSES:
                raise ValueError(unknown_name_message("graph pass", name, GRAPH_PASSES.names()))
        dup = sorted({n for n in value if value.count(n) > 1})
        if dup:
            raise ValueError(f"graph passes listed more than once: {dup}")
        return value


@dataclass(frozen=True)
class PassReport:
    """One pass over every traced part of the model."""

    name: str
    nodes_before: int
    nodes_after: int
    params_before: int
    params_after: int
    changes: tuple[str, ...]
    #: model outputs after this pass vs the original model's, relative (see GraphConfig.tolerance)
    max_rel_error: float
    time_s: float


@dataclass(frozen=True)
class GraphResult:
    """What the passes did, pass by pass, and how close the outputs stayed."""

    config: dict[str, Any]
    #: the traced parts: "" for the whole model, else submodule names
    scopes: tuple[str, ...]
    passes: tuple[PassReport, ...]
    #: the installed graphs' outputs vs the original ones (example batch and one a batch larger): checked
    max_rel_error: float
    #: the model's outputs vs the original model's; for submodule scopes only reported, not checked (a
    #: data-dependent second stage, NMS among near-equal scores, may amplify a difference of 1e-7)
    model_rel_error: float
    time_s: float
    record: dict[str, Any]

    @property
    def nodes_before(self) -> int:
        return self.passes[0].nodes_before

    @property
    def nodes_after(self) -> int:
        return self.passes[-1].nodes_after

    @property
    def params_before(self) -> int:
        return self.passes[0].params_before

    @property
    def params_after(self) -> int:
        return self.passes[-1].params_after

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(nodes_before=self.nodes_before, nodes_after=self.nodes_after, params_before=self.params_before,
                 params_after=self.params_after)  # fmt: skip
        return d

    def to_text(self) -> str:
        where = "whole model" if self.scopes == ("",) else "submodules " + ", ".join(self.scopes)
        lines = [f"graph passes on the {where}: nodes {self.nodes_before} -> {self.nodes_after}, parameters "
                 f"{self.params_before:,} -> {self.params_after:,}, max relative output error {self.max_rel_error:.2g}"
                 + ("" if self.scopes == ("",) else f" (model outputs: {self.model_rel_error:.2g})"),
                 f"{'pass':<14} {'nodes':>11} {'params':>21} {'changes':>7} {'rel err':>8}"]  # fmt: skip
        for p in self.passes:
            lines.append(f"{p.name:<14} {p.nodes_before:>5}->{p.nodes_after:<5} {p.params_before:>10,}->"
                         f"{p.params_after:<10,} {len(p.changes):>7} {p.max_rel_error:>8.1e}")  # fmt: skip
        return "\n".join(lines)


def optimize_graph(model: nn.Module, cfg: GraphConfig | None = None, *, example: Tensor | None = None) -> GraphResult:
    """Run the graph passes of ``cfg`` on ``model`` in place, check its outputs, install the graph.

    Args:
        model: a registered detector, which records the passes for ``load_model``; or any module
            (with ``example_inputs``, or pass ``example``).
        cfg: the passes and the tolerance; all passes by default.
        example: the batch the outputs are checked on (real images are best); a random batch of
            ``model.example_inputs(2)`` when None. A batch one image larger is checked too.

    Raises:
        ConfigError: a quantized model (run the passes before quantizing), or nothing traceable.
        GraphCheckError: a pass moved the outputs by more than ``cfg.tolerance`` (found on a copy of
            the model first: the model is unchanged).
    """
    cfg = cfg or GraphConfig()
    start = time.perf_counter()
    refuse_after_final(model, "graph")
    _check_not_quantized(model)
    batches = _batches(model, example)
    was_training = model.training
    model.eval()
    try:
        scopes = _scopes(model)
        reference = _capture(model, scopes, batches)
        work = copy.deepcopy(model)
        reports = _run(work, cfg.passes, scopes, reference, tolerance=cfg.tolerance)
        _run(model, cfg.passes, scopes, reference, tolerance=None)
        structure = _structure(model, scopes)
        if structure != _structure(work, scopes):  # the passes must depend on the structure only
            raise RuntimeError("graph passes gave different results on a model and its copy")
        error = _installed_error(model, scopes, reference)
        model_error = _model_error(model, reference)
    finally:
        model.train(was_training)
    if not error <= cfg.tolerance:
        raise GraphCheckError(f"graph passes {cfg.passes}: the installed graph's outputs differ from the original "
                              f"ones by {error:.3g} (relative), more than {cfg.tolerance:g}")  # fmt: skip
    record = {"kind": "graph", "version": RECORD_VERSION, "passes": list(cfg.passes), **structure}
    if isinstance(getattr(model, "model_config", None), dict):  # a registered model: load_model replays it
        record_transform(model, record)
    return GraphResult(config=cfg.model_dump(mode="json"), scopes=tuple(scopes), passes=tuple(reports),
                       max_rel_error=error, model_rel_error=model_error, time_s=time.perf_counter() - start,
                       record=record)  # fmt: skip


@register_replay("graph")
def replay_graph(model: nn.Module, entry: dict[str, Any]) -> nn.Module:
    """Run the recorded passes on a freshly built model (``load_model``); the state dict is loaded after."""
    if entry.get("version") != RECORD_VERSION:
        raise CheckpointError(f"graph record version {entry.get('version')!r} is not {RECORD_VERSION}")
    name = getattr(model, "model_config", {}).get("name", type(model).__name__)
    try:
        passes = GraphConfig(passes=entry["passes"]).passes
        scopes = _scopes(model)
        batches = _batches(model, None)
        was_training = model.training
        model.eval()
        try:
            _run(model, passes, scopes, _capture(model, scopes, batches), tolerance=None)
        finally:
            model.train(was_training)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"graph record does not fit model {name!r}: {exc}") from None
    got = _structure(model, scopes)
    for key, value in got.items():
        if entry.get(key) != value:
            raise CheckpointError(f"graph record does not fit model {name!r}: the passes give {key}={value}, "
                                  f"the record says {entry.get(key)}")  # fmt: skip
    return model


# ----------------------------------------------------------------------------------------------
# running the passes


def _run(model: nn.Module, passes: list[str], scopes: list[str], reference: dict[str, Any],
         *, tolerance: float | None) -> list[PassReport]:  # fmt: skip
    """Trace every scope, run the passes over all of them, install the graphs; with a tolerance,
    check the outputs after every pass."""
    contexts = []
    for name in scopes:
        module = model.get_submodule(name) if name else model
        inputs = [args for args, _ in reference[name]]
        contexts.append(PassContext(module, trace_module(module), name, inputs))
    reports = []
    for pass_name in passes:
        fn = GRAPH_PASSES.get(pass_name)
        nodes0, params0 = sum(count_nodes(c.graph) for c in contexts), _params(model)
        t0 = time.perf_counter()
        changes: list[str] = []
        for ctx in contexts:
            changes += fn(ctx)
            ctx.graph.lint()
        elapsed = time.perf_counter() - t0
        error = 0.0
        if tolerance is not None:
            error = max(_scope_error(ctx, reference[ctx.prefix]) for ctx in contexts)
            if not error <= tolerance:
                raise GraphCheckError(f"graph pass {pass_name!r} changed the outputs of "
                                      f"{_label(model)} by {error:.3g} (relative), more than {tolerance:g}; "
                                      f"the model was not changed")  # fmt: skip
        reports.append(PassReport(pass_name, nodes0, sum(count_nodes(c.graph) for c in contexts), params0,
                                  _params(model), tuple(changes), error, elapsed))  # fmt: skip
    for ctx in contexts:
        install(ctx.root, ctx.graph, passes, ctx.prefix)
    return reports


def _scopes(model: nn.Module) -> list[str]:
    """The whole model when torch.fx traces it, else its largest traceable submodules that hold
    weights and are more than one leaf layer."""
    found: list[str] = []
    tracer = GraphTracer()

    def visit(name: str, module: nn.Module) -> None:
        if (name and not _has_state(module)) or tracer.is_leaf_module(module, name):
            return
        try:
            trace_module(module)
        except Exception:  # noqa: BLE001 - any tracing failure: try the parts
            for child, sub in module.named_children():
                visit(f"{name}.{child}" if name else child, sub)
            return
        found.append(name)

    visit("", model)
    if not found:
        raise ConfigError(f"graph passes: no part of {_label(model)} can be traced by torch.fx")
    return found


def _capture(model: nn.Module, scopes: list[str], batches: list[Tensor]) -> dict[str, list[tuple[tuple, Any]]]:
    """Per scope, the (args, output) of every call during a forward of each batch; "" is the model.

    Scopes called with keyword arguments, or never called, are dropped from ``scopes``.
    """
    calls: dict[str, list[tuple[tuple, Any]]] = {s: [] for s in scopes}
    with_kwargs: set[str] = set()

    def hook(name: str):  # noqa: ANN202
        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if kwargs:
                with_kwargs.add(name)
            calls[name].append((_clone(args), _clone(output)))

        return record

    handles = [model.get_submodule(s).register_forward_hook(hook(s), with_kwargs=True) for s in scopes if s]
    try:
        with torch.no_grad():
            for batch in batches:
                out = model(batch)
                if "" in calls:
                    calls[""].append(((batch,), _clone(out)))
    finally:
        for h in handles:
            h.remove()
    calls["__model__"] = [((b,), out) for b, (_, out) in zip(batches, calls[""], strict=True)] if "" in calls else []
    if "" not in calls:  # the model's own outputs, to report how the installed submodules change them
        with torch.no_grad():
            calls["__model__"] = [((b,), _clone(model(b))) for b in batches]
    dropped = [s for s in scopes if s in with_kwargs or not calls[s]]
    for s in dropped:
        scopes.remove(s)
    if not scopes:
        raise ConfigError(f"graph passes: no traceable part of {_label(model)} is called by its forward")
    return calls


def _scope_error(ctx: PassContext, calls: list[tuple[tuple, Any]]) -> float:
    gm = fx.GraphModule(ctx.root, ctx.graph)
    with torch.no_grad():
        return max(rel_error(gm(*args), out) for args, out in calls)


def _installed_error(model: nn.Module, scopes: list[str], reference: dict[str, Any]) -> float:
    with torch.no_grad():
        return max(rel_error((model.get_submodule(s) if s else model)(*args), out)
                   for s in scopes for args, out in reference[s])  # fmt: skip


def _model_error(model: nn.Module, reference: dict[str, Any]) -> float:
    with torch.no_grad():
        return max(rel_error(model(*args), out) for args, out in reference["__model__"])


def rel_error(got: Any, expected: Any) -> float:
    """Largest ``max |got - expected| / max |expected|`` over the tensors of two outputs of one structure."""
    a, b = tree_leaves(got), tree_leaves(expected)
    if len(a) != len(b):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if not isinstance(y, Tensor):
            worst = max(worst, 0.0 if x == y else float("inf"))
            continue
        if not isinstance(x, Tensor) or x.shape != y.shape:
            return float("inf")
        if y.numel():
            x, y = x.detach().double(), y.detach().double()
            worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)))
    return worst


def _structure(model: nn.Module, scopes: list[str]) -> dict[str, Any]:
    """What the passes changed in the module tree: the record ``load_model`` checks its replay against."""
    kinds: dict[str, list[str]] = {"folded": [], "zero_branches": [], "fused": []}
    for name, m in model.named_modules():
        if isinstance(m, Folded):
            kinds["folded"].append(name)
        elif isinstance(m, ZeroBranch):
            kinds["zero_branches"].append(name)
        elif isinstance(m, _fuse.ConvAct2d):
            kinds["fused"].append(name)
    consts = sorted(n for n, _ in model.named_buffers() if n.rpartition(".")[2].startswith("_graph_const_"))
    return {"scopes": list(scopes), **kinds, "constants": consts}


def _batches(model: nn.Module, example: Tensor | None) -> list[Tensor]:
    if example is None:
        if not hasattr(model, "example_inputs"):
            raise ConfigError(f"optimize_graph: {_label(model)} has no example_inputs(); pass example=")
        example = example_batch(model, 2)
    if not isinstance(example, Tensor) or example.dim() < 1 or example.shape[0] < 1:
        raise ConfigError(f"optimize_graph: example must be a batch tensor, got {type(example).__name__}")
    return [example, torch.cat([example, example[:1]])]


def _check_not_quantized(model: nn.Module) -> None:
    from slimdet.compress.quant.graph import is_quantized

    if is_quantized(model):
        raise ConfigError(f"optimize_graph: {_label(model)} is quantized; run the graph passes before quantizing")


def _clone(value: Any) -> Any:
    return tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, value)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _label(model: nn.Module) -> str:
    return repr(getattr(model, "model_config", {}).get("name", type(model).__name__))
