"""The installed graph: an optimized FX graph run as a module's ``forward``.

The module keeps its class, its attributes and the state-dict names of what is left; its
``forward`` (an instance attribute) runs the graph. The graph notices when a module, parameter or
attribute tensor it uses was replaced (pruning, a module swapped, ``.to()``) and then traces and
optimizes the module again: traced graphs hold some sizes as constants, such as the slice bounds a
forward reads from a conv's width.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from slimdet.compress.graph_fuse import unfuse_activations
from slimdet.compress.graph_passes import GRAPH_PASSES, PassContext
from slimdet.compress.graph_trace import trace_module

__all__ = ["InstalledGraph", "install", "installed_graph", "take_installed_graph"]


class InstalledGraph:
    """A module's optimized graph, run as its ``forward``; traced and optimized again when a module,
    parameter or attribute tensor it uses was replaced."""

    def __init__(self, root: nn.Module, graph: fx.Graph, passes: list[str], prefix: str) -> None:
        self.root, self.passes, self.prefix = root, list(passes), prefix
        self._build(graph)

    def _build(self, graph: fx.Graph) -> None:
        graph.lint()
        self.gm = fx.GraphModule(self.root, graph)
        self.watch = _watch_list(self.root, graph)

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.current():
            self.refresh()
        return self.gm(*args, **kwargs)

    def current(self) -> bool:
        return all(d.get(k) is v for d, k, v in self.watch)

    def refresh(self) -> None:
        """Trace and optimize the module again (no output check: the module itself changed)."""
        graph = trace_module(self.root)
        inputs = [(example_batch(self.root, b),) for b in (1, 2)] if hasattr(self.root, "example_inputs") else []
        ctx = PassContext(self.root, graph, self.prefix, inputs)
        was_training = self.root.training
        self.root.eval()
        try:
            for name in self.passes:
                GRAPH_PASSES.get(name)(ctx)
        finally:
            self.root.train(was_training)
        self._build(graph)


def installed_graph(module: nn.Module) -> InstalledGraph | None:
    """The optimized graph ``module`` runs as its forward, if any (brought up to date)."""
    installed = module.__dict__.get("_slim_graph")
    if installed is not None and not installed.current():
        installed.refresh()
    return installed


def take_installed_graph(model: nn.Module) -> fx.Graph | None:
    """Detach the model's installed graph and return a copy with fused activations split again
    (for quantization, which puts its own graph in place); None when the model has none."""
    installed = installed_graph(model)
    if installed is None:
        return None
    graph = fx.Graph()
    graph.output(graph.graph_copy(installed.graph, {}))
    del model.__dict__["_slim_graph"]
    del model.__dict__["forward"]
    unfuse_activations(model, graph)
    return graph


def install(module: nn.Module, graph: fx.Graph, passes: list[str], prefix: str) -> None:
    """Make ``graph`` (traced from ``module``, optimized by ``passes``) the module's forward."""
    installed = InstalledGraph(module, graph, passes, prefix)
    object.__setattr__(module, "_slim_graph", installed)
    object.__setattr__(module, "forward", installed.forward)


def _watch_list(root: nn.Module, graph: fx.Graph) -> list[tuple[dict[str, Any], str, Any]]:
    """(dict, key, object) triples that must stay the same for the graph to be valid."""
    seen: set[tuple[int, str]] = set()
    out: list[tuple[dict[str, Any], str, Any]] = []

    def add(d: dict[str, Any], key: str) -> None:
        if (id(d), key) not in seen and key in d:
            seen.add((id(d), key))
            out.append((d, key, d[key]))

    for node in graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        owner_path, _, name = node.target.rpartition(".")
        owner = root.get_submodule(owner_path)
        if node.op == "call_module":
            add(owner._modules, name)
            module = owner._modules[name]
            for key in module._parameters:
                add(module._parameters, key)
        else:
            add(owner._parameters, name)
            add(owner._buffers, name)
    return out


def example_batch(model: nn.Module, batch: int) -> Tensor:
    """A random batch shaped like ``model.example_inputs(batch)`` on the model's device; the global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        shape = model.example_inputs(batch).shape
    example = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    param = next(model.parameters(), None)
    return example.to(param.device) if param is not None else example
