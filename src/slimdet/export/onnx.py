"""Export a detector's raw ``forward`` to ONNX (FP32) and check it against PyTorch.

The exported graph is ``model.forward``: one input ``images`` (B x 3 x S x S, values in [0, 1])
and the raw output tensors ``out0``, ``out1``, ... in the order ``forward`` returns them. Box
decoding and NMS (``postprocess``) stay in Python.

Exporters (torch 2.14): the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``)
still exists but warns that it is deprecated and will be removed. It is fast (well under a second
for a small conv net) and reliable for plain conv nets, so ``exporter="auto"`` tries it first and
falls back to the ``torch.export``-based exporter (``dynamo=True``, several seconds, opset >= 18)
when it fails or is gone. Either way the file is written atomically and, with ``check=True``,
compared against PyTorch on the same random input before it is moved into place.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from slimdet.errors import ConfigError, ExportError

INPUT_NAME = "images"
#: the torch.export-based exporter has no operator implementations below this opset.
DYNAMO_MIN_OPSET = 18


class Exporter(StrEnum):
    AUTO = "auto"  # TorchScript exporter, then the torch.export-based one if that fails
    TORCHSCRIPT = "torchscript"
    DYNAMO = "dynamo"


@dataclass(frozen=True)
class ExportResult:
    """What was written: the file, its graph, and how closely it matches PyTorch."""

    path: str
    size_bytes: int
    opset: int
    exporter: str  # "torchscript" or "dynamo": the one that produced the file
    input_name: str
    input_shape: tuple[int | str, ...]  # "batch" where the batch dimension is dynamic
    output_names: tuple[str, ...]
    num_nodes: int  # nodes of the top-level graph
    op_counts: dict[str, int]  # op type -> count, most frequent first
    max_abs_diff: float | None  # None when check=False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["output_names"] = list(self.output_names)
        return d


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    batch_size: int = 1,
    dynamic_batch: bool = False,
    opset: int = 17,
    exporter: Exporter | str = Exporter.AUTO,
    check: bool = True,
    atol: float = 1e-4,
) -> ExportResult:
    """Export ``model.forward`` to ``path`` and, with ``check``, verify it in ONNX Runtime.

    Args:
        model: a Detector (or any module taking one image batch); exported in eval mode, its
            training flag is restored afterwards.
        path: the .onnx file to write; replaced atomically, never left half-written.
        batch_size: batch size of the example input (the fixed batch size unless dynamic_batch).
        dynamic_batch: make the batch dimension of the input and of every output symbolic.
        opset: ONNX opset requested (the dynamo exporter uses at least 18).
        exporter: "auto", "torchscript" or "dynamo".
        check: run one random input through ONNX Runtime and PyTorch and compare all outputs.
        atol: largest absolute difference allowed by the check.

    Raises:
        ConfigError: invalid options.
        ExportError: no exporter could export the model, or the check failed (nothing is written).
    """
    if batch_size < 1:
        raise ConfigError(f"export_onnx: batch_size must be >= 1, got {batch_size}")
    try:
        exporter = Exporter(exporter)
    except ValueError:
        raise ConfigError(
            f"export_onnx: unknown exporter {exporter!r}; expected one of {[e.value for e in Exporter]}"
        ) from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = _random_input(model, batch_size)

    was_training = model.training
    model.eval()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with torch.no_grad():
            reference = _flat_outputs(model(example))
        output_names = tuple(f"out{i}" for i in range(len(reference)))
        used = _export(model, example, tmp, opset=opset, exporter=exporter, names=output_names, dynamic=dynamic_batch)
        max_diff = None
        if check:
            max_diff = _max_abs_diff(model, tmp, example, reference)
            if dynamic_batch:  # a second batch size proves the batch dimension really is symbolic
                other = _random_input(model, batch_size + 1, seed=1)
                with torch.no_grad():
                    max_diff = max(max_diff, _max_abs_diff(model, tmp, other, _flat_outputs(model(other))))
            if not max_diff <= atol:
                raise ExportError(
                    f"{path}: ONNX Runtime output differs from PyTorch by {max_diff:.3g} (max abs), more "
                    f"than atol={atol:g} ({used} exporter, opset {opset}); the file was not written"
                )
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        model.train(was_training)
    return _describe(path, exporter=used, max_abs_diff=max_diff)


def onnx_session(path: str | Path | bytes, threads: int, *, spinning: bool = False) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads and no inter-op parallelism.

    ``spinning=False`` makes idle worker threads sleep instead of busy-waiting after each run
    (ONNX Runtime spins by default): when ONNX Runtime and PyTorch are timed in turn on the same
    cores, spinning workers steal the cores PyTorch's next call needs and inflate its latency.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only
    model = path if isinstance(path, bytes) else str(path)  # a file, or a serialized model
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def _random_input(model: nn.Module, batch_size: int, seed: int = 0) -> Tensor:
    # A private generator: exporting must not move the global RNG.
    size = getattr(model, "input_size", None)
    if not isinstance(size, int):
        raise ConfigError(f"export_onnx: {type(model).__name__} has no integer input_size (a Detector has one)")
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, 3, size, size, generator=gen)
    param = next(model.parameters(), None)
    return x.to(param.device) if param is not None else x


def _flat_outputs(raw: Any) -> list[Tensor]:
    outs = [raw] if isinstance(raw, Tensor) else list(raw) if isinstance(raw, (tuple, list)) else None
    if outs is None or not outs or not all(isinstance(t, Tensor) for t in outs):
        raise ExportError(
            f"model.forward must return a tensor or a flat tuple/list of tensors to be exported, got "
            f"{type(raw).__name__}"
        )
    return outs


def _export(
    model: nn.Module,
    example: Tensor,
    tmp: Path,
    *,
    opset: int,
    exporter: Exporter,
    names: tuple[str, ...],
    dynamic: bool,
) -> str:
    errors: list[str] = []
    if exporter in (Exporter.AUTO, Exporter.TORCHSCRIPT):
        try:
            _export_torchscript(model, example, tmp, opset=opset, names=names, dynamic=dynamic)
            return Exporter.TORCHSCRIPT.value
        except Exception as exc:  # noqa: BLE001 - any failure sends us to the other exporter
            errors.append(f"torchscript exporter: {type(exc).__name__}: {_first_line(exc)}")
    if exporter in (Exporter.AUTO, Exporter.DYNAMO):
        try:
            _export_dynamo(model, example, tmp, opset=opset, names=names, dynamic=dynamic)
            return Exporter.DYNAMO.value
        except Exception as exc:  # noqa: BLE001
            errors.append(f"dynamo exporter: {type(exc).__name__}: {_first_line(exc)}")
    raise ExportError(f"could not export {type(model).__name__} to ONNX: " + "; ".join(errors))


def _export_torchscript(
    model: nn.Module, example: Tensor, tmp: Path, *, opset: int, names: tuple[str, ...], dynamic: bool
) -> None:
    axes = {name: {0: "batch"} for name in (INPUT_NAME, *names)} if dynamic else None
    with warnings.catch_warnings():
        # torch >= 2.9 warns on every call that this exporter is deprecated; we chose it knowingly.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=list(names),
            dynamic_axes=axes,
            do_constant_folding=True,
        )


def _export_dynamo(
    model: nn.Module, example: Tensor, tmp: Path, *, opset: int, names: tuple[str, ...], dynamic: bool
) -> None:
    shapes = ({0: torch.export.Dim.DYNAMIC},) if dynamic else None
    torch.onnx.export(
        model,
        (example,),
        str(tmp),
        dynamo=True,
        opset_version=max(opset, DYNAMO_MIN_OPSET),
        input_names=[INPUT_NAME],
        output_names=list(names),
        dynamic_shapes=shapes,
        external_data=False,  # one self-contained file (models < 2 GB)
        optimize=True,
        verbose=False,
    )


def _max_abs_diff(model: nn.Module, onnx_path: Path, example: Tensor, reference: list[Tensor]) -> float:
    session = onnx_session(onnx_path, threads=1)
    got = session.run(None, {INPUT_NAME: example.detach().cpu().numpy()})
    if len(got) != len(reference):
        raise ExportError(f"{onnx_path}: ONNX graph has {len(got)} outputs, PyTorch forward returned {len(reference)}")
    diff = 0.0
    for i, (a, b) in enumerate(zip(got, reference, strict=True)):
        b_np = b.detach().cpu().numpy()
        if a.shape != b_np.shape:
            raise ExportError(
                f"{onnx_path}: output out{i} has shape {a.shape} in ONNX Runtime, {b_np.shape} in PyTorch"
            )
        if a.size:
            diff = max(diff, float(np.max(np.abs(a.astype(np.float64) - b_np.astype(np.float64)))))
    return diff


def _describe(path: Path, *, exporter: str, max_abs_diff: float | None) -> ExportResult:
    proto = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    graph_input = next(i for i in proto.graph.input if i.name == INPUT_NAME)
    dims = graph_input.type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") else "batch" for d in dims)
    counts = Counter(node.op_type for node in proto.graph.node)
    return ExportResult(
        path=str(path),
        size_bytes=path.stat().st_size,
        opset=int(opset),
        exporter=exporter,
        input_name=INPUT_NAME,
        input_shape=shape,
        output_names=tuple(o.name for o in proto.graph.output),
        num_nodes=len(proto.graph.node),
        op_counts=dict(counts.most_common()),
        max_abs_diff=max_abs_diff,
    )


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
