"""Cut a detector into pipeline stages: backbone + neck | heads | decode + NMS.

A YOLO-style detector is ``postprocess(heads(neck(backbone(x))))``. The cuts:

* ``"neck"``: features (backbone + neck) | heads + decode + NMS;
* ``"heads"``: the whole network | decode + NMS (network on one worker, Python post-processing on another);
* ``"neck+heads"``: features | heads | decode + NMS (three stages);
* ``"none"``: one stage (the whole model in one piece: the reference a split must equal).

With ONNX Runtime (``backbone_runtime="onnxruntime-int8"`` for a quantized model, exported as QDQ;
``"onnxruntime"`` for a float one) the network pieces are ONNX graphs (:mod:`slimdet.schedule.parts`);
with ``"torch"`` (a float model) they are the model's own modules, on any PyTorch device. The heads
run in the same runtime as the backbone; decoding and NMS run in PyTorch (``model.postprocess``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import torch
from torch import Tensor, nn

from slimdet.errors import ConfigError
from slimdet.export.onnx import INPUT_NAME
from slimdet.models.base import Detector
from slimdet.schedule.executor import StageWorker
from slimdet.schedule.graph import Plan
from slimdet.schedule.parts import Chain, Decode, OrtPart, SplitGraphs, TorchPart, export_split

PIECES = ("backbone+neck", "heads", "decode+nms")


class Cut(StrEnum):
    NECK = "neck"
    HEADS = "heads"
    NECK_HEADS = "neck+heads"
    NONE = "none"


class BackboneRuntime(StrEnum):
    ORT_INT8 = "onnxruntime-int8"
    ORT = "onnxruntime"
    TORCH = "torch"


#: for each cut, the pieces of each stage
_GROUPS = {
    Cut.NECK: ((0,), (1, 2)),
    Cut.HEADS: ((0, 1), (2,)),
    Cut.NECK_HEADS: ((0,), (1,), (2,)),
    Cut.NONE: ((0, 1, 2),),
}


def split_detector(
    model: Detector,
    *,
    cut: Cut | str = Cut.NECK,
    backbone_runtime: BackboneRuntime | str = BackboneRuntime.ORT_INT8,
    threads: int = 1,
    device: str = "cpu",
    graphs: SplitGraphs | None = None,
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 100,
) -> list[StageWorker]:
    """Pipeline stages of ``model``: network pieces in ONNX Runtime or PyTorch, decode + NMS in PyTorch.

    Each stage takes one image per frame (a float ``3 x S x S`` tensor or array in [0, 1], or a uint8
    ``S x S x 3`` RGB array); the last returns its Detections, those of ``model.postprocess`` with the
    given thresholds.

    Args:
        model: the detector (quantized for "onnxruntime-int8"; float otherwise).
        cut: where to cut (see the module docstring).
        backbone_runtime: what runs the network pieces (the heads run in the same runtime).
        threads: intra-op threads of every stage (ONNX Runtime sessions and PyTorch).
        device: PyTorch device of the network pieces ("torch" runtime only; e.g. "cuda").
        graphs: the ONNX parts, when already exported (:func:`export_split`, :meth:`SplitGraphs.load`).

    Raises:
        ConfigError: an unknown cut or runtime, or a model that does not fit the runtime.
    """
    from slimdet.compress.quant.graph import is_quantized

    cut, runtime = _enum(Cut, cut, "cut"), _enum(BackboneRuntime, backbone_runtime, "backbone_runtime")
    quantized = is_quantized(model)
    if runtime == BackboneRuntime.ORT_INT8 and not quantized:
        raise ConfigError("split_detector: backbone_runtime='onnxruntime-int8' needs a quantized model "
                          "(slimdet.compress.quantize)")  # fmt: skip
    if runtime != BackboneRuntime.ORT_INT8 and quantized:
        raise ConfigError(f"split_detector: a quantized model runs as int8 in ONNX Runtime; use "
                          f"backbone_runtime='onnxruntime-int8', not {runtime.value!r}")  # fmt: skip
    if device != "cpu" and runtime != BackboneRuntime.TORCH:
        raise ConfigError(f"split_detector: device={device!r} needs backbone_runtime='torch' "
                          "(ONNX Runtime runs on the CPU)")  # fmt: skip
    if runtime == BackboneRuntime.TORCH:
        _check_torch_split(model)
        return _stages(cut, lambda net: TorchPart(model, net, device=device), model, threads=threads,
                       post=(conf_thres, iou_thres, max_det))  # fmt: skip
    if graphs is None:
        graphs = export_split(model, quantized=quantized)
    elif graphs.quantized != (runtime == BackboneRuntime.ORT_INT8):
        raise ConfigError(f"split_detector: the given graphs are {'QDQ' if graphs.quantized else 'float'}, "
                          f"the runtime is {runtime.value!r}")  # fmt: skip
    return stages_from_graphs(graphs, model, cut=cut, threads=threads, conf_thres=conf_thres, iou_thres=iou_thres,
                              max_det=max_det)  # fmt: skip


def stages_from_graphs(
    graphs: SplitGraphs,
    like: Detector,
    *,
    cut: Cut | str = Cut.NECK,
    threads: int = 1,
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 100,
) -> list[StageWorker]:
    """Stages from already exported graphs; ``like`` (a detector of the same architecture, float or
    quantized) only lends its ``postprocess``."""
    cut = _enum(Cut, cut, "cut")
    parts = {(0,): graphs.features, (1,): graphs.heads, (0, 1): graphs.whole}
    return _stages(cut, lambda net: OrtPart(parts[net], (INPUT_NAME,) if net[0] == 0 else graphs.cut_names,
                                            threads=threads), _postprocess_only(like), threads=threads,
                   post=(conf_thres, iou_thres, max_det))  # fmt: skip


def _stages(cut: Cut, network: Any, like: Detector, *, threads: int,
            post: tuple[float, float, int]) -> list[StageWorker]:  # fmt: skip
    stages = []
    for group in _GROUPS[cut]:
        fns: list[Any] = []
        net = tuple(p for p in group if p < 2)
        if net:
            fns.append(network(net))
        if 2 in group:
            fns.append(Decode(like, conf_thres=post[0], iou_thres=post[1], max_det=post[2]))
        name = "+".join(PIECES[p] for p in group) if len(group) < 3 else "detector"
        stages.append(StageWorker(name, fns[0] if len(fns) == 1 else Chain(tuple(fns)), threads=threads))
    return stages


def stages_from_plan(model: Detector, plan: Plan, **kwargs: Any) -> list[StageWorker]:
    """:func:`split_detector` with the cut of a planner's ``plan``, when it is one the executor supports.

    Each plan node is placed in a piece by its name (``backbone.*``/``neck.*``: features; ``heads.*``:
    heads; names with ``decode``, ``nms`` or ``postprocess``: decode + NMS; ``input``/``images``:
    ignored); the stages must then be contiguous runs of whole pieces. Devices of the plan become
    workers on this machine (``kwargs`` pick the runtime, threads and device).

    Raises:
        ConfigError: the plan cuts inside a piece, or has nodes of unknown pieces.
    """
    pieces_of: list[set[int]] = []
    for s, stage in enumerate(plan.stages):
        found: set[int] = set()
        for node in stage.nodes:
            piece = _piece_of(node)
            if piece is None:
                continue
            if piece < 0:
                raise ConfigError(f"stages_from_plan: node {node!r} of stage {s} ({stage.device}) belongs to no "
                                  f"piece the executor knows ({', '.join(PIECES)})")  # fmt: skip
            found.add(piece)
        if found:
            pieces_of.append(found)
    groups = tuple(tuple(sorted(g)) for g in pieces_of)
    seen = [p for g in groups for p in g]
    if sorted(seen) != sorted(set(seen)) or sorted(seen) != list(range(len(PIECES))) or seen != sorted(seen):
        raise ConfigError("stages_from_plan: the executor runs contiguous groups of whole pieces "
                          f"({' | '.join(PIECES)}); this plan's stages hold pieces {[list(g) for g in groups]} "
                          "(0: backbone+neck, 1: heads, 2: decode+nms)")  # fmt: skip
    for cut, want in _GROUPS.items():
        if want == groups:
            return split_detector(model, cut=cut, **kwargs)
    raise ConfigError(f"stages_from_plan: no supported cut for pieces {groups}")  # pragma: no cover


def executor_cuts(node_names: Sequence[str]) -> set[str]:
    """The nodes (in graph order) after which the executor can cut: the last node of each piece
    (backbone+neck | heads | decode+nms) that another piece follows; for ``pipeline_plan(cut_after=...)``."""
    known = [(name, piece) for name in node_names if (piece := _piece_of(name)) is not None and piece >= 0]
    cuts = set()
    for p in range(len(PIECES) - 1):
        upto = [i for i, (_, piece) in enumerate(known) if piece <= p]
        after = [i for i, (_, piece) in enumerate(known) if piece > p]
        if upto and after and max(upto) < min(after):  # every node of the later pieces comes after the cut
            cuts.add(known[max(upto)][0])
    return cuts


def _piece_of(node: str) -> int | None:
    low = node.lower()
    if low in ("input", "images", "image") or low.startswith("input"):
        return None
    if low.startswith(("backbone", "neck")):
        return 0
    if low.startswith("heads"):
        return 1
    if any(key in low for key in ("decode", "nms", "postprocess")):
        return 2
    return -1


def _check_torch_split(model: Detector) -> None:
    """The "torch" pieces call ``backbone``, ``neck`` and ``heads`` directly: require that this is the forward."""
    if not all(hasattr(model, a) for a in ("backbone", "neck", "heads")):
        raise ConfigError(f"split_detector: {type(model).__name__} has no backbone/neck/heads to run as pieces")
    was = model.training
    model.eval()
    try:
        x = model.example_inputs(1).to(next(model.parameters()).device)
        with torch.no_grad():
            ref = model(x)
            feats = model.neck(model.backbone(x))
            got = tuple(h(f) for h, f in zip(model.heads, feats, strict=True))
    finally:
        model.train(was)
    ref = (ref,) if isinstance(ref, Tensor) else tuple(ref)
    if len(ref) != len(got) or not all(torch.equal(a, b) for a, b in zip(ref, got, strict=True)):
        raise ConfigError(f"split_detector: {type(model).__name__}.forward is not heads(neck(backbone(x))), so it "
                          "cannot be cut into PyTorch pieces (a quantized model: use 'onnxruntime-int8')")  # fmt: skip


def _postprocess_only(model: Detector) -> Detector:
    """A copy of ``model`` that can only decode: it is sent to a worker, so it keeps none of the network
    (modules, parameters, a quantized model's traced graph and the ``forward`` bound to it)."""
    like = copy.copy(model)
    like.__dict__ = {k: v for k, v in model.__dict__.items()
                     if k != "forward" and not isinstance(v, nn.Module)}  # fmt: skip
    like._modules, like._parameters, like._buffers = {}, {}, {}
    return like


def _enum(kind: type[StrEnum], value: Any, what: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"split_detector: unknown {what} {value!r}; expected one of "
                          f"{[k.value for k in kind]}") from None  # fmt: skip
