"""Measured devices: time a model at batch 1 on a real runtime, and calibrate a roofline against it.

* :func:`measure` / :func:`measure_many`: ONNX Runtime on CPU (fp32: the model exported by
  :func:`slimdet.export.onnx.export_onnx`; int8: a quantized slimdet model exported as QDQ by
  :func:`slimdet.export.qdq.export_deployable`, or any given ``.onnx`` file), or on a GPU through ONNX
  Runtime's CUDA / TensorRT execution providers (fp16; int8 from the QDQ file). A provider this machine
  does not have raises :class:`ProviderUnavailableError` with the reason (:func:`provider_status` says
  so first). Several models are timed interleaved (each once per round, in a random order) so that machine
  noise hits them alike.
* :func:`profile_nodes`: per-node kernel times from ONNX Runtime's profiler, mapped back to the layer
  names of the model where the exported node names carry them (TorchScript export scopes).
* :func:`calibrate`: fit ``compute_efficiency``, ``memory_efficiency`` and ``op_overhead_s`` of a
  :class:`~slimdet.hw.spec.RooflineSpec` (bounded least squares on log latencies, i.e. relative errors)
  so that :func:`slimdet.hw.roofline.estimate` predicts measured :class:`Sample` latencies.
"""

from __future__ import annotations

import itertools
import json
import re
import tempfile
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from torch import nn

from slimdet.errors import ConfigError
from slimdet.export.onnx import INPUT_NAME, onnx_session
from slimdet.hw.calibrate import FIT_FIELDS, CalibrationFit, Sample, calibrate, fit_roofline  # noqa: E402,F401
from slimdet.hw.layers import LayerTable
from slimdet.profiling.latency import LatencyStat, summarize, time_interleaved

ModelOrOnnx = nn.Module | str | Path


class Precision(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class Provider(StrEnum):
    CPU = "cpu"
    CUDA = "cuda"
    TENSORRT = "tensorrt"


_ORT_NAMES = {Provider.CPU: "CPUExecutionProvider", Provider.CUDA: "CUDAExecutionProvider",
              Provider.TENSORRT: "TensorrtExecutionProvider"}  # fmt: skip
_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul"}


class ProviderUnavailableError(ConfigError):
    """The requested execution provider is not usable on this machine (the message says why)."""


@dataclass(frozen=True)
class Measurement:
    """Batch-1 latency of one model on one runtime."""

    model: str
    provider: str
    precision: str
    threads: int
    input_shape: tuple[int, ...]
    latency: LatencyStat
    times_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return self.latency.median_s

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["times_s"] = list(self.times_s)
        return d


def provider_status(provider: Provider | str) -> tuple[bool, str]:
    """(usable, reason): whether ONNX Runtime on this machine offers ``provider``."""
    provider = _enum(Provider, provider, "provider")
    name = _ORT_NAMES[provider]
    available = ort.get_available_providers()
    if name not in available:
        return False, (
            f"{name} is not available in this onnxruntime build ({ort.__version__}; available: "
            f"{', '.join(available)}): {provider.value} needs onnxruntime-gpu and an NVIDIA GPU"
        )
    return True, f"{name} available"


def measure(
    model_or_onnx: ModelOrOnnx,
    *,
    provider: Provider | str = Provider.CPU,
    precision: Precision | str = Precision.FP32,
    threads: int = 1,
    runs: int = 50,
    warmup: int = 5,
    work_dir: str | Path | None = None,
) -> Measurement:
    """Batch-1 latency of a detector (exported here) or an ONNX file on ``provider`` at ``precision``.

    Args:
        model_or_onnx: a slimdet Detector (float for fp32/fp16, quantized for int8) or an .onnx file.
        provider: "cpu" (ONNX Runtime CPU), "cuda" or "tensorrt" (ONNX Runtime GPU providers).
        precision: "fp32", "fp16" (GPU only) or "int8" (a QDQ graph).
        threads: ONNX Runtime intra-op threads.
        runs: timed runs after ``warmup`` untimed ones.
        work_dir: where exported files go (default: a temporary directory, removed after).

    Raises:
        ProviderUnavailableError: the provider is not usable here.
        ConfigError: invalid options, or a model/file that does not match ``precision``.
    """
    name = _display_name(model_or_onnx)
    return measure_many({name: model_or_onnx}, provider=provider, precision=precision, threads=threads,
                        runs=runs, warmup=warmup, work_dir=work_dir)[name]  # fmt: skip


def measure_many(
    models: Mapping[str, ModelOrOnnx],
    *,
    provider: Provider | str = Provider.CPU,
    precision: Precision | str | Mapping[str, Precision | str] = Precision.FP32,
    threads: int = 1,
    runs: int = 50,
    warmup: int = 5,
    work_dir: str | Path | None = None,
    rewarm: bool = True,
    on_step: Callable[[], None] | None = None,
) -> dict[str, Measurement]:
    """:func:`measure` for several models, timed interleaved in one loop; ``precision`` may be given per name.

    With ``rewarm`` (default), each timed call follows an untimed call of the same model, so every model is
    timed with its weights and buffers in cache, as in a loop that runs it alone (its steady-state latency),
    not after the other models evicted them; timing then takes twice as long. ``on_step`` is called after
    every timed call.
    """
    provider = _enum(Provider, provider, "provider")
    if threads < 1 or runs < 1 or warmup < 0:
        raise ConfigError(f"measure: threads and runs must be >= 1 and warmup >= 0, got {threads}, {runs}, {warmup}")
    ok, reason = provider_status(provider)
    if not ok:
        raise ProviderUnavailableError(f"measure: {reason}")
    precisions = {k: _enum(Precision, precision[k] if isinstance(precision, Mapping) else precision, "precision")
                  for k in models}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="slimdet-measure-") as tmp:
        work = Path(work_dir) if work_dir is not None else Path(tmp)
        sessions, feeds = {}, {}
        for key, item in models.items():
            path = prepare_onnx(item, precision=precisions[key], work_dir=work, stem=_safe(key))
            sessions[key] = _session(path, provider, precisions[key], threads)
            feeds[key] = _random_feed(sessions[key])
        fns: dict[str, Callable[[], object]] = {}
        for k in models:
            run = lambda s=sessions[k], f=feeds[k]: s.run(None, f)  # noqa: E731
            if rewarm and len(models) > 1:
                fns[f"{k}\0rewarm"] = run  # runs right before the timed call of the same model
            fns[k] = run
        calls = itertools.count(1)
        per_timed = len(fns) // len(models)
        step = None if on_step is None else (lambda: on_step() if next(calls) % per_timed == 0 else None)
        times = time_interleaved(fns, warmup=warmup, runs=runs, on_step=step)
    return {k: Measurement(model=k, provider=provider.value, precision=precisions[k].value, threads=threads,
                           input_shape=tuple(feeds[k][INPUT_NAME].shape),
                           latency=summarize(f"onnxruntime-{provider.value}-{precisions[k].value}", 1, times[k]),
                           times_s=tuple(times[k]))
            for k in models}  # fmt: skip


def prepare_onnx(item: ModelOrOnnx, *, precision: Precision | str, work_dir: str | Path, stem: str = "model") -> Path:
    """The batch-1 ONNX file to run ``item`` at ``precision``: a given file (checked), or an export.

    fp32 and fp16 take a float model's FP32 export (fp16 is applied by the GPU provider); int8 takes a
    quantized model's QDQ export. A file with quantize/dequantize nodes is int8, any other is float.
    """
    from slimdet.compress.quant.graph import is_quantized
    from slimdet.export.onnx import export_onnx
    from slimdet.export.qdq import export_deployable

    precision = _enum(Precision, precision, "precision")
    if isinstance(item, (str, Path)):
        path = Path(item)
        if not path.is_file():
            raise ConfigError(f"measure: ONNX file {path} does not exist")
        ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
        int8 = bool(ops & _QDQ_OPS)
        if int8 != (precision == Precision.INT8):
            kind = "an int8 (QDQ) graph" if int8 else "a float graph"
            raise ConfigError(f"measure: {path} is {kind}, which does not run at precision={precision.value!r}")
        return path
    quantized = is_quantized(item)
    if quantized != (precision == Precision.INT8):
        want = "a quantized model (slimdet.compress.quant.quantize)" if precision == Precision.INT8 else "a float model"
        raise ConfigError(f"measure: precision={precision.value!r} needs {want}; "
                          f"got a {'quantized' if quantized else 'float'} {type(item).__name__}")  # fmt: skip
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{stem}_{precision.value}.onnx"
    if quantized:
        export_deployable(item, path, batch_size=1, check=False)  # type: ignore[arg-type]
    else:
        export_onnx(item, path, batch_size=1)
    return path


def _session(path: Path, provider: Provider, precision: Precision, threads: int) -> ort.InferenceSession:
    if provider == Provider.CPU:
        if precision == Precision.FP16:
            raise ConfigError("measure: precision='fp16' needs a GPU provider ('cuda' or 'tensorrt'); ONNX Runtime's "
                              "x86 CPU provider has no fp16 convolution kernels")  # fmt: skip
        return onnx_session(path, threads)
    # GPU providers: not exercised on machines without a GPU (provider_status refuses them first)
    model: str | bytes = str(path)
    options: dict[str, Any] = {}
    if provider == Provider.TENSORRT:
        # TensorRT reads the QDQ nodes as explicit int8 quantization; fp16 lets it pick fp16 kernels
        options = {"trt_fp16_enable": precision != Precision.FP32, "trt_int8_enable": precision == Precision.INT8}
    elif precision == Precision.FP16:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True).SerializeToString()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    session = ort.InferenceSession(model, sess_options=opts,
                                   providers=[(_ORT_NAMES[provider], options), "CPUExecutionProvider"])  # fmt: skip
    if session.get_providers()[0] != _ORT_NAMES[provider]:
        raise ProviderUnavailableError(f"measure: ONNX Runtime could not start {_ORT_NAMES[provider]} (it fell back "
                                       f"to {session.get_providers()}); check the CUDA/TensorRT libraries")  # fmt: skip
    return session


def _random_feed(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    inp = session.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    return {inp.name: np.random.default_rng(0).random(shape, dtype=np.float32).astype(dtype)}


# --- per-node timing from ONNX Runtime's profiler -------------------------------------------------------


@dataclass(frozen=True)
class NodeTime:
    """Median kernel time of one node of the optimized graph, and the layer it comes from (None if unknown)."""

    node: str
    op_type: str
    layer: str | None
    median_s: float
    runs: int


def profile_nodes(
    path: str | Path, *, threads: int = 1, runs: int = 20, warmup: int = 5, layers: LayerTable | None = None
) -> list[NodeTime]:
    """Per-node kernel times of an ONNX file on ONNX Runtime's CPU provider (its built-in profiler).

    Node names of a TorchScript export carry the module path (``/backbone/stem/stem.0/Conv``); with
    ``layers`` given, a node is mapped to the GEMM layer or element-wise op of that module when one
    exists. Fused and layout nodes the runtime inserts (``ReorderInput``, ...) map to None, and so do
    the flat names of a quantized (torch.fx) export. Profiling adds per-node cost: use these times to
    split a model's latency, not as the latency itself.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="slimdet-ortprof-") as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        feed = _random_feed(session)
        for _ in range(warmup + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    durations: dict[str, list[float]] = defaultdict(list)
    op_types: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            node = e["name"].removesuffix("_kernel_time")
            durations[node].append(e["dur"] * 1e-6)  # the profiler's "dur" is in microseconds
            op_types[node] = e.get("args", {}).get("op_name", "")
    names = _layer_names(layers) if layers is not None else {}
    out = []
    for node, d in durations.items():
        timed = d[warmup:] if len(d) > warmup else d
        module, kind = scope_to_module(node) or "", _NODE_KINDS.get(op_types[node], "")
        # a module called again gets "_1", "_2", ... on its last scope level
        layer = names.get((module, kind)) or names.get((re.sub(r"_\d+$", "", module), kind))
        out.append(NodeTime(node=node, op_type=op_types[node], layer=layer,
                            median_s=float(np.median(timed)), runs=len(timed)))  # fmt: skip
    return out


def scope_to_module(node: str) -> str | None:
    """The module path in a TorchScript-exported node name: ``/backbone/stage1/stage1.1/cv1/cv1.0/Conv``
    -> ``backbone.stage1.1.cv1.0`` (each scope level repeats its parent's attribute before the dot; the
    path ends at the first capitalized part, the op)."""
    if not node.startswith("/"):
        return None
    parts: list[str] = []
    parent = ""
    for comp in node.strip("/").split("/"):
        if not comp or comp[0].isupper():  # the op part: "Conv", "Mul/QuickGeluFusion", ...
            break
        parts.append(comp.removeprefix(parent + ".") if parent and comp.startswith(parent + ".") else comp)
        parent = comp
    return ".".join(parts) or None


#: ONNX Runtime node op type -> the kind of layer-table row it executes ("gemm" for GEMM layers)
_NODE_KINDS = {**dict.fromkeys(("Conv", "FusedConv", "NhwcFusedConv", "QLinearConv", "ConvInteger", "Gemm", "MatMul",
                                "FusedGemm", "QLinearMatMul", "MatMulInteger"), "gemm"),
               **dict.fromkeys(("QuickGelu", "Sigmoid", "QLinearSigmoid", "Relu", "Clip", "HardSigmoid", "HardSwish",
                                "LeakyRelu", "Tanh", "Softmax"), "activation"),
               **dict.fromkeys(("Add", "Sub", "Mul", "Div", "QLinearAdd", "QLinearMul"), "elementwise"),
               **dict.fromkeys(("Concat", "QLinearConcat"), "concat"),
               **dict.fromkeys(("MaxPool", "NhwcMaxPool", "AveragePool", "GlobalAveragePool", "QLinearAveragePool",
                                "QLinearGlobalAveragePool", "ReduceMean"), "reduce"),
               **dict.fromkeys(("Resize", "Upsample"), "resize")}  # fmt: skip


def _layer_names(layers: LayerTable) -> dict[tuple[str, str], str]:
    """(module path, row kind) -> row name: GEMM layers by their module, other ops by the module they ran in.

    Every dotted suffix of a module path is a key too (an exported wrapper's scope can leave out its
    outer attribute, e.g. ``net.``), unless two rows share it.
    """
    rows = [((g.name, "gemm"), g.name) for g in layers.gemm]
    rows += [((op.name.split("/", 1)[0], op.op), op.name) for op in layers.ops if "/" in op.name]
    names: dict[tuple[str, str], str] = {}
    suffixes: dict[tuple[str, str], str | None] = {}
    for (module, kind), name in rows:
        names.setdefault((module, kind), name)
        parts = module.split(".")
        for i in range(1, len(parts)):
            key = (".".join(parts[i:]), kind)
            suffixes[key] = name if suffixes.get(key, name) == name else None
    return {**{k: v for k, v in suffixes.items() if v is not None and k not in names}, **names}


# --- calibration ------------------------------------------------------------------------------------


def _enum(cls: type[StrEnum], value: Any, field: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        raise ConfigError(f"measure: {field} must be one of {[e.value for e in cls]}, got {value!r}") from None


def _display_name(item: ModelOrOnnx) -> str:
    if isinstance(item, (str, Path)):
        return Path(item).stem
    return str(getattr(item, "model_config", {}).get("name") or type(item).__name__)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "model"
