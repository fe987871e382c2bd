"""A detector's network as parts: ONNX graphs cut at the neck outputs, and the stage functions that run them.

:func:`export_split` exports the network once with the neck outputs (the inputs of the heads' first
convs, found through ``feature_layers()``) as extra graph outputs, so the cut tensors are known by
name, not guessed; the graph is then cut there with ``onnx.utils.Extractor``. In a QDQ graph the cut
is moved to the int8 tensor before the neck output's DequantizeLinear: four times fewer bytes cross
between workers, both halves keep their integer kernels, and the parts compute exactly what the whole
graph computes (checked on a random image when the parts are made).

The stage functions (:class:`OrtPart`, :class:`TorchPart`, :class:`Decode`, :class:`Chain`) are
picklable and build their heavy state (an ONNX Runtime session) in ``setup()``, inside the worker.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx.utils import Extractor
from torch import Tensor, nn

from slimdet.data.transforms import to_tensor
from slimdet.errors import ConfigError, ExportError
from slimdet.export.onnx import INPUT_NAME, onnx_session
from slimdet.models.base import Detector


@dataclass
class OrtPart:
    """One ONNX graph (serialized) run by ONNX Runtime on the CPU.

    Called with one image (``3 x S x S`` or ``1 x 3 x S x S``, a tensor or an array) when the graph's
    input is ``images``, else with a tuple of arrays in ``input_names`` order; returns the tuple of outputs.
    """

    model: bytes
    input_names: tuple[str, ...]
    threads: int = 1
    _session: Any = field(default=None, init=False, repr=False, compare=False)

    def setup(self) -> None:
        if self._session is None:
            self._session = onnx_session(self.model, self.threads)

    def __call__(self, item: Any) -> tuple[np.ndarray, ...]:
        self.setup()
        if self.input_names == (INPUT_NAME,):
            feeds = {INPUT_NAME: _image_batch(item)}
        else:
            feeds = dict(zip(self.input_names, item, strict=True))
        return tuple(self._session.run(None, feeds))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_session": None}


@dataclass
class TorchPart:
    """Pieces of a float YOLO detector run by its own modules (``backbone+neck``, ``heads`` or both).

    Returns NumPy arrays (cheap to send to the next worker); ``device`` may be ``"cuda"``.
    """

    model: Detector
    pieces: tuple[int, ...]
    device: str = "cpu"
    _ready: bool = field(default=False, init=False, repr=False, compare=False)

    def setup(self) -> None:
        if not self._ready:
            self.model.to(self.device).eval()
            self._ready = True

    @torch.no_grad()
    def __call__(self, item: Any) -> tuple[np.ndarray, ...]:
        self.setup()
        m = self.model
        if self.pieces[0] == 0:
            x = torch.from_numpy(_image_batch(item)).to(self.device)
            feats = m.neck(m.backbone(x))
        else:
            feats = tuple(torch.from_numpy(np.asarray(t)).to(self.device) for t in item)
        out = feats if 1 not in self.pieces else tuple(h(f) for h, f in zip(m.heads, feats, strict=True))
        return tuple(t.cpu().numpy() for t in out)


@dataclass
class Decode:
    """``like.postprocess`` of one image's raw outputs (arrays or tensors): its Detections, in PyTorch."""

    like: Detector
    conf_thres: float = 0.001
    iou_thres: float = 0.6
    max_det: int = 100

    @torch.no_grad()
    def __call__(self, raw: Sequence[Any]) -> dict[str, Tensor]:
        tensors = tuple(torch.as_tensor(r) for r in raw)
        return self.like.postprocess(tensors, conf_thres=self.conf_thres, iou_thres=self.iou_thres,
                                     max_det=self.max_det)[0]  # fmt: skip


@dataclass
class Chain:
    """Functions applied one after the other, inside one stage."""

    fns: tuple[Any, ...]

    def setup(self) -> None:
        for fn in self.fns:
            setup = getattr(fn, "setup", None)
            if callable(setup):
                setup()

    def __call__(self, item: Any) -> Any:
        for fn in self.fns:
            item = fn(item)
        return item


def _image_batch(item: Any) -> np.ndarray:
    """One frame as the network's ``1 x 3 x S x S`` float32 input.

    A frame is a float image ``3 x S x S`` (or ``1 x 3 x S x S``) in [0, 1], as datasets yield it, or a
    uint8 RGB image ``S x S x 3``, as decoded from a file or a camera (and letterboxed to the input
    size): that is converted here exactly as the datasets convert it, and is 4x fewer bytes to send.
    """
    x = item.detach().cpu().numpy() if isinstance(item, Tensor) else np.asarray(item)
    if x.dtype == np.uint8:
        if x.ndim != 3 or x.shape[2] != 3:
            raise ValueError(f"a uint8 frame must be one H x W x 3 RGB image, got shape {tuple(x.shape)}")
        x = to_tensor(x).numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[:2] != (1, 3):
        raise ValueError(f"a frame must be one image, 3 x H x W or 1 x 3 x H x W, got shape {tuple(x.shape)}")
    return x


@dataclass(frozen=True)
class SplitGraphs:
    """A detector's network as ONNX graphs: in one piece and cut at the neck outputs.

    Attributes:
        whole: ``images -> out0..``, the graph in one piece.
        features: ``images -> cut tensors`` (backbone + neck).
        heads: ``cut tensors -> out0..``.
        cut_names: the tensors crossing the cut (int8 codes in a QDQ graph), in head order.
        quantized: whether the graphs are QDQ (int8 kernels).
    """

    whole: bytes
    features: bytes
    heads: bytes
    cut_names: tuple[str, ...]
    quantized: bool

    def save(self, directory: str | Path) -> Path:
        """Write ``whole.onnx``, ``features.onnx``, ``heads.onnx`` and ``split.json`` into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name in ("whole", "features", "heads"):
            (d / f"{name}.onnx").write_bytes(getattr(self, name))
        (d / "split.json").write_text(json.dumps({"cut_names": list(self.cut_names), "quantized": self.quantized}))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> SplitGraphs:
        d = Path(directory)
        try:
            meta = json.loads((d / "split.json").read_text())
            parts = {name: (d / f"{name}.onnx").read_bytes() for name in ("whole", "features", "heads")}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{d}: not a directory written by SplitGraphs.save ({exc})") from None
        return cls(**parts, cut_names=tuple(meta["cut_names"]), quantized=bool(meta["quantized"]))


def export_split(model: Detector, *, quantized: bool | None = None, opset: int = 17, check: bool = True) -> SplitGraphs:
    """Export ``model``'s network to ONNX and cut it at the neck outputs (the inputs of the heads).

    Args:
        model: a YOLO-style detector (``feature_layers()`` names the first conv of each head level);
            quantized (QDQ export, int8 kernels) or float.
        quantized: default: whether ``model`` is quantized.
        check: run a random image through the parts and the whole graph and require identical outputs.

    Raises:
        ConfigError: the model has no ``feature_layers`` (no neck/head boundary to cut at).
        ExportError: the graph cannot be cut there, or the parts disagree with the whole.
    """
    from slimdet.compress.quant.graph import frozen, is_quantized
    from slimdet.export.onnx import export_onnx
    from slimdet.export.qdq import rewrite_qdq

    quantized = is_quantized(model) if quantized is None else quantized
    layers = _feature_layers(model)
    wrapper = _WithFeatures(model, layers)
    n_out = _count_outputs(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "split.onnx"
        if quantized:
            with frozen(model):
                export_onnx(wrapper, path, opset=opset, exporter="torchscript", check=False)
        else:
            export_onnx(wrapper, path, opset=opset, check=False)
        proto = onnx.load(str(path))
    if quantized:
        rewrite_qdq(proto)
    outputs = [o.name for o in proto.graph.output]
    out_names, feat_names = outputs[:n_out], outputs[n_out:]
    producer = {o: n for n in proto.graph.node for o in n.output}
    cut = []
    for name in feat_names:
        node = producer.get(name)
        while node is not None and node.op_type == "Identity":
            name, node = node.input[0], producer.get(node.input[0])
        # a QDQ graph: cut before the DequantizeLinear, on the int8 codes
        cut.append(node.input[0] if node is not None and node.op_type == "DequantizeLinear" else name)
    del proto.graph.output[n_out:]
    proto = onnx.shape_inference.infer_shapes(proto)
    ex = Extractor(proto)
    try:
        whole = ex.extract_model([INPUT_NAME], out_names)
        features = ex.extract_model([INPUT_NAME], cut)
        heads = ex.extract_model(cut, out_names)
        for part in (whole, features, heads):
            onnx.checker.check_model(part)
    except Exception as exc:  # noqa: BLE001 - onnx raises several types
        raise ExportError(f"export_split: the graph cannot be cut at {cut}: {exc}") from exc
    if any(INPUT_NAME in n.input for n in heads.graph.node):
        raise ExportError(f"export_split: the heads still read {INPUT_NAME!r}: {cut} is not a cut of the graph")
    graphs = SplitGraphs(whole.SerializeToString(), features.SerializeToString(), heads.SerializeToString(),
                         tuple(cut), quantized)  # fmt: skip
    if check:
        x = np.random.default_rng(0).random((1, 3, model.input_size, model.input_size), dtype=np.float32)
        ref = OrtPart(graphs.whole, (INPUT_NAME,))(x)
        got = OrtPart(graphs.heads, graphs.cut_names)(OrtPart(graphs.features, (INPUT_NAME,))(x))
        if not all(np.array_equal(a, b) for a, b in zip(ref, got, strict=True)):
            raise ExportError("export_split: the two parts do not compute what the whole graph computes")
    return graphs


class _WithFeatures(nn.Module):
    """``model.forward`` plus, as extra outputs, the inputs of the heads' first convs (the neck outputs)."""

    def __init__(self, model: Detector, layers: list[str]) -> None:
        super().__init__()
        self.model = model
        self.input_size = model.input_size
        self.layers = layers

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        modules = dict(self.model.named_modules())
        seen: dict[str, Tensor] = {}

        def keep(name: str):  # noqa: ANN202
            def hook(_module: nn.Module, args: tuple) -> None:
                seen.setdefault(name, args[0])

            return hook

        hooks = [modules[name].register_forward_pre_hook(keep(name)) for name in self.layers]
        try:
            raw = self.model(images)
        finally:
            for h in hooks:
                h.remove()
        raw = (raw,) if isinstance(raw, Tensor) else tuple(raw)
        return (*raw, *(seen[name] for name in self.layers))


def _feature_layers(model: nn.Module) -> list[str]:
    get = getattr(model, "feature_layers", None)
    if not callable(get):
        raise ConfigError(f"split: {type(model).__name__} has no feature_layers(); only YOLO-style detectors "
                          "(backbone, neck, heads) can be cut at the neck")  # fmt: skip
    return list(get())


def _count_outputs(model: Detector) -> int:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            raw = model(model.example_inputs(1).to(next(model.parameters()).device))
    finally:
        model.train(was)
    return 1 if isinstance(raw, Tensor) else len(raw)
