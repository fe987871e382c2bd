"""A detector whose raw ``forward`` runs in ONNX Runtime, for scoring exported (and quantized) files.

``OrtDetector(path, like=model)`` wraps a file written by :func:`slimdet.export.onnx.export_onnx`
(one input ``images``, outputs ``out0..outN`` in the order ``model.forward`` returns them) and
borrows everything else from ``like``: ``postprocess`` (decoding and NMS stay in Python, as in
export), ``num_classes`` and ``input_size``. So ``evaluate(OrtDetector(path, like=model), dataset)``
is the mAP of what ONNX Runtime computes, e.g. of an int8 QDQ graph next to its FP32 source.

A file exported with a fixed batch size serves any batch: larger batches run in chunks of that size,
and a short last chunk is padded with zero images whose outputs are dropped (outputs are per image).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from slimdet.errors import ConfigError, ExportError
from slimdet.export.onnx import INPUT_NAME, onnx_session
from slimdet.models.base import Detections, Detector, Raw

# ONNX Runtime's type strings for the input dtypes a detector export can have
_INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class OrtDetector(nn.Module):
    """An exported detector run by ONNX Runtime (CPU), with the Python side of ``like``.

    It has no parameters, so callers that look for a device (``evaluate``) run it on CPU. Its
    ``train``/``eval`` flag changes nothing: the graph is whatever was exported (eval mode).

    Attributes:
        path: the ONNX file.
        batch_size: the file's fixed batch size, or None when its batch dimension is symbolic.
        session: the ONNX Runtime session.
    """

    def __init__(self, path: str | Path, *, like: Detector, threads: int = 1) -> None:
        """Open ``path`` and check it against ``like``.

        Args:
            path: an ONNX file exported from a detector of the same architecture as ``like``.
            like: the detector whose ``postprocess``, ``num_classes`` and ``input_size`` are used;
                it is run once on one image to check the file's outputs against its ``forward``.
            threads: ONNX Runtime intra-op threads.

        Raises:
            ConfigError: ``path`` does not exist, ``like`` is not a Detector, threads < 1, or the file's
                input or outputs do not fit ``like`` (image size, channels, number or shape of outputs).
            ExportError: ONNX Runtime cannot load the file, or it is not a one-input ``images`` graph.
        """
        super().__init__()
        path = Path(path)
        if not isinstance(like, Detector):
            raise ConfigError(f"OrtDetector({path}): like= must be a slimdet Detector, got {type(like).__name__}")
        if threads < 1:
            raise ConfigError(f"OrtDetector({path}): threads must be >= 1, got {threads}")
        if not path.is_file():
            raise ConfigError(f"OrtDetector: ONNX file {path} does not exist")
        try:
            session = onnx_session(path, threads)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own exception types
            raise ExportError(f"{path}: ONNX Runtime cannot load this file: {_first_line(exc)}") from None
        object.__setattr__(self, "_like", like)  # not a submodule: no parameters, no state_dict entries
        self.path = path
        self.session = session
        self.batch_size, self._dtype = _check_input(path, session, like)
        self._single = _check_outputs(path, session, like, self.batch_size)

    @property
    def like(self) -> Detector:
        """The detector this file was exported from (or one of the same architecture)."""
        return self._like

    @property
    def num_classes(self) -> int:
        return self._like.num_classes

    @property
    def input_size(self) -> int:
        return self._like.input_size

    def forward(self, images: Tensor) -> Raw:
        """Raw outputs for ``images`` (B x 3 x S x S), as ``like.forward`` returns them, on the images' device."""
        n = images.shape[0]
        x = images.detach().cpu().numpy().astype(self._dtype, copy=False)
        step = self.batch_size or n
        chunks: list[list[np.ndarray]] = []
        for start in range(0, n, step):
            part = x[start : start + step]
            if len(part) < step:  # a fixed-batch file: pad the last chunk with zero images
                part = np.concatenate([part, np.zeros((step - len(part), *part.shape[1:]), dtype=part.dtype)])
            chunks.append(self.session.run(None, {INPUT_NAME: np.ascontiguousarray(part)}))
        outs = tuple(
            _to_tensor(np.concatenate([c[i] for c in chunks])[:n] if len(chunks) > 1 else chunks[0][i][:n], images)
            for i in range(len(chunks[0]))
        )
        return outs[0] if self._single else outs

    def postprocess(self, raw: Raw, **kw: Any) -> list[Detections]:
        """``like.postprocess``: decoding and NMS in Python."""
        return self._like.postprocess(raw, **kw)

    @torch.no_grad()
    def predict(self, images: Tensor, **kw: Any) -> list[Detections]:
        """Detections for a batch: ONNX Runtime's raw outputs through ``like.postprocess``."""
        return self.postprocess(self(images), **kw)

    def example_inputs(self, batch_size: int = 1) -> Tensor:
        return self._like.example_inputs(batch_size)

    def extra_repr(self) -> str:
        batch = self.batch_size if self.batch_size is not None else "dynamic"
        return f"path={str(self.path)!r}, like={type(self._like).__name__}, batch_size={batch}"


def _check_input(path: Path, session: Any, like: Detector) -> tuple[int | None, type]:
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise ExportError(
            f"{path}: expected one graph input named {INPUT_NAME!r} (a slimdet export), got {[i.name for i in inputs]}"
        )
    inp = inputs[0]
    if inp.type not in _INPUT_DTYPES:
        raise ExportError(f"{path}: input {INPUT_NAME!r} has type {inp.type}, expected one of {list(_INPUT_DTYPES)}")
    shape = list(inp.shape)
    size = like.input_size
    expected = ["batch", 3, size, size]
    fits = len(shape) == 4 and all(
        not isinstance(got, int) or got == want for got, want in zip(shape[1:], expected[1:], strict=True)
    )
    if not fits:
        raise ConfigError(
            f"{path}: input {INPUT_NAME!r} has shape {shape}, but {type(like).__name__} takes {expected} "
            f"(input_size={size})"
        )
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    return batch, _INPUT_DTYPES[inp.type]


def _check_outputs(path: Path, session: Any, like: Detector, batch: int | None) -> bool:
    """Compare the file's outputs with ``like.forward`` on one image; True when forward returns one tensor.

    Every output must be batch-major (first dimension = the input's batch), which running a
    fixed-batch file in chunks relies on.
    """
    was_training = like.training
    like.eval()
    try:
        with torch.no_grad():
            raw = like(like.example_inputs(1).to(_device(like)))
    finally:
        like.train(was_training)
    single = isinstance(raw, Tensor)
    want = [raw] if single else list(raw)
    got = session.get_outputs()
    if len(got) != len(want):
        raise ConfigError(
            f"{path}: the graph has {len(got)} outputs ({[o.name for o in got]}), but "
            f"{type(like).__name__}.forward returns {len(want)}"
        )
    for out, ref in zip(got, want, strict=True):
        shape = list(out.shape)
        ref_shape = [batch or "batch", *ref.shape[1:]]
        same = len(shape) == len(ref_shape) and all(
            not isinstance(a, int) or a == b for a, b in zip(shape, ref_shape, strict=True)
        )
        if not same:
            raise ConfigError(
                f"{path}: output {out.name!r} has shape {shape}, but {type(like).__name__}.forward gives "
                f"{ref_shape} (num_classes={like.num_classes}, input_size={like.input_size})"
            )
    return single


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _to_tensor(array: np.ndarray, like: Tensor) -> Tensor:
    t = torch.from_numpy(np.ascontiguousarray(array))
    if t.is_floating_point() and t.dtype != torch.float32:
        t = t.float()
    return t.to(like.device)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
