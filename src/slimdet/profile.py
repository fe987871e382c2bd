"""Profile a detector: parameters, MACs per layer, bytes on disk, forward memory, measured latency.

``profile(model)`` measures on the CPU of this machine. Latency is of ``model.forward`` (raw
outputs; box decoding and NMS are not included) in PyTorch eager mode and in ONNX Runtime FP32,
timed in interleaved repetitions so that machine noise hits both alike.
"""

from __future__ import annotations

import copy
import platform
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch
from torch import nn
from tqdm.auto import tqdm

from slimdet.errors import ConfigError
from slimdet.export.onnx import INPUT_NAME, onnx_session
from slimdet.profiling.latency import LatencyStat, peak_forward_alloc_bytes, summarize, time_interleaved, torch_threads
from slimdet.profiling.macs import LayerProfile, layer_table

EAGER = "torch-eager"
ORT = "onnxruntime-cpu"
LATENCY_OF = "model.forward: raw outputs, no postprocess/NMS; input B x 3 x S x S float32"


@dataclass(frozen=True)
class ProfileResult:
    """Costs of one model on this machine; all sizes in bytes, times in seconds, MACs at batch 1."""

    model: str
    input_size: int
    params: int
    macs: int
    layers: tuple[LayerProfile, ...]
    uncounted_layers: tuple[str, ...]  # leaf modules with weights but no MAC formula (counted as 0)
    state_dict_size_bytes: int  # torch.save(model.state_dict()) on disk
    onnx_size_bytes: int | None  # the exported FP32 ONNX file; None when onnx=False
    # peak bytes held by PyTorch's CPU allocator during one batch-1 eager forward (activations,
    # temporaries, outputs; weights excluded) -- see profiling.latency.peak_forward_alloc_bytes
    peak_forward_alloc_bytes: int
    threads: int  # torch intra-op threads and ONNX Runtime intra_op_num_threads
    ort_spinning: bool  # whether ONNX Runtime's idle workers busy-wait (off: see export.onnx.onnx_session)
    warmup: int
    runs: int
    latency: tuple[LatencyStat, ...]
    latency_of: str = LATENCY_OF
    environment: dict[str, str] = field(default_factory=dict)

    def latency_for(self, runtime: str, batch_size: int) -> LatencyStat:
        for stat in self.latency:
            if stat.runtime == runtime and stat.batch_size == batch_size:
                return stat
        have = [(s.runtime, s.batch_size) for s in self.latency]
        raise KeyError(f"no latency measured for {runtime!r} at batch {batch_size}; have {have}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (lists instead of tuples)."""
        return _jsonable(asdict(self))

    def to_text(self, *, layers: bool = False) -> str:
        """A short human-readable summary; ``layers=True`` appends the per-layer table."""
        onnx_size = f"{_si(self.onnx_size_bytes)}B" if self.onnx_size_bytes is not None else "-"
        lines = [
            f"{self.model}  input {self.input_size}x{self.input_size}  threads {self.threads}  "
            f"ONNX Runtime spinning {'on' if self.ort_spinning else 'off'}",
            f"params {_si(self.params)}  MACs {_si(self.macs)} (batch 1)  "
            f"state dict {_si(self.state_dict_size_bytes)}B  ONNX {onnx_size}  "
            f"peak forward alloc {_si(self.peak_forward_alloc_bytes)}B",
            f"latency of {self.latency_of}; {self.runs} runs after {self.warmup} warm-up",
            f"{'runtime':<16} {'batch':>5} {'median ms':>10} {'p90 ms':>8} {'ms/image':>9}",
        ]
        for s in self.latency:
            lines.append(
                f"{s.runtime:<16} {s.batch_size:>5} {s.median_s * 1e3:>10.2f} {s.p90_s * 1e3:>8.2f} "
                f"{s.median_per_image_s * 1e3:>9.2f}"
            )
        if self.uncounted_layers:
            lines.append(f"MACs not counted for: {', '.join(self.uncounted_layers)}")
        if layers:
            lines.append(f"{'layer':<40} {'type':<18} {'output':<20} {'params':>10} {'MACs':>14}")
            for r in self.layers:
                shape = "x".join(map(str, r.output_shape))
                lines.append(f"{r.name[:40]:<40} {r.type[:18]:<18} {shape:<20} {r.params:>10} {r.macs:>14}")
            lines.append(f"{'total':<40} {'':<18} {'':<20} {self.params:>10} {self.macs:>14}")
        return "\n".join(lines)


def profile(
    model: nn.Module,
    *,
    batch_sizes: Sequence[int] = (1, 8),
    threads: int | None = None,
    warmup: int = 5,
    runs: int = 30,
    onnx: bool = True,
    workdir: str | Path | None = None,
    progress: bool = True,
) -> ProfileResult:
    """Measure ``model`` (a Detector, or any module with ``input_size``) on this machine's CPU.

    Args:
        model: profiled in eval mode on a CPU copy when it lives elsewhere; its training flag is
            restored afterwards.
        batch_sizes: batch sizes to time; MACs, the layer table and memory are for batch 1.
        threads: intra-op threads for PyTorch and ONNX Runtime; None means torch.get_num_threads().
            PyTorch's count is set for the duration of the call only.
        warmup: untimed calls per runtime and batch size before timing.
        runs: timed calls per runtime and batch size (interleaved eager / ONNX Runtime).
        onnx: also export to ONNX (checked against PyTorch) and time ONNX Runtime.
        workdir: where the state dict and ONNX files are written and kept; a temporary folder,
            removed afterwards, when None.
        progress: show a tqdm bar over the timed runs.
    """
    sizes = tuple(batch_sizes)
    if not sizes or any(int(b) != b or b < 1 for b in sizes):
        raise ConfigError(f"profile: batch_sizes must be positive integers, got {batch_sizes!r}")
    if runs < 1 or warmup < 0:
        raise ConfigError(f"profile: need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    input_size = getattr(model, "input_size", None)
    if not isinstance(input_size, int):
        raise ConfigError(f"profile: {type(model).__name__} has no integer input_size attribute (a Detector has one)")
    threads = threads if threads is not None else torch.get_num_threads()

    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    net = model if on_cpu else copy.deepcopy(model).cpu()
    was_training = model.training
    net.eval()
    try:
        with torch_threads(threads), tempfile.TemporaryDirectory(prefix="slimdet-profile-") as tmp:
            work = Path(workdir) if workdir is not None else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            return _measure(net, sizes, input_size, threads, warmup, runs, onnx, work, progress)
    finally:
        model.train(was_training)


def _measure(
    net: nn.Module,
    sizes: tuple[int, ...],
    input_size: int,
    threads: int,
    warmup: int,
    runs: int,
    onnx: bool,
    work: Path,
    progress: bool,
) -> ProfileResult:
    gen = torch.Generator().manual_seed(0)  # private RNG: profiling must not move the global one
    inputs = {b: torch.rand(b, 3, input_size, input_size, generator=gen) for b in sizes}
    one = inputs.get(1, torch.rand(1, 3, input_size, input_size, generator=gen))

    layers = layer_table(net, one)
    sd_path = work / "state_dict.pt"
    torch.save(net.state_dict(), sd_path)
    peak = peak_forward_alloc_bytes(net, one)

    from slimdet.compress.quant.graph import is_quantized
    from slimdet.export.qdq import export_deployable

    quantized = is_quantized(net)
    sessions: dict[int, ort.InferenceSession] = {}
    onnx_size = None
    if onnx:
        for b in sizes:  # one static-shape file per batch size: what a deployment would ship
            # a quantized model: its QDQ file, which ONNX Runtime runs with integer kernels
            exported = export_deployable(net, work / f"model_b{b}.onnx", batch_size=b, check=not quantized)
            onnx_size = onnx_size if onnx_size is not None else exported.size_bytes
            sessions[b] = onnx_session(exported.path, threads, spinning=False)

    stats: list[LatencyStat] = []
    per_size = (1 if quantized else 2) if onnx else 1
    bar = tqdm(total=len(sizes) * runs * per_size, desc="profile", unit="run", disable=not progress)
    with bar, torch.no_grad():
        for b in sizes:
            x = inputs[b]
            # A quantized model's PyTorch forward is the fake-quant simulation, not a deployment: only
            # ONNX Runtime's integer execution is timed for it.
            fns = {} if quantized and onnx else {EAGER: lambda x=x: net(x)}
            if onnx:
                feed = {INPUT_NAME: x.numpy()}
                fns[ORT] = lambda s=sessions[b], feed=feed: s.run(None, feed)
            times = time_interleaved(fns, warmup=warmup, runs=runs, on_step=lambda: bar.update(1))
            stats.extend(summarize(name, b, t) for name, t in times.items())

    name = getattr(net, "model_config", {}).get("name") or type(net).__name__
    return ProfileResult(
        model=str(name),
        input_size=input_size,
        params=sum(p.numel() for p in net.parameters()),
        macs=sum(r.macs for r in layers),
        layers=tuple(layers),
        uncounted_layers=tuple(r.name for r in layers if not r.counted),
        state_dict_size_bytes=sd_path.stat().st_size,
        onnx_size_bytes=onnx_size,
        peak_forward_alloc_bytes=peak,
        threads=threads,
        ort_spinning=False,
        warmup=warmup,
        runs=runs,
        latency=tuple(stats),
        environment=_environment(),
    )


def _environment() -> dict[str, str]:
    return {
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _si(n: int) -> str:
    """366 -> '366 ', 86016 -> '86.0 k', 1234567 -> '1.23 M' (decimal prefixes)."""
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.3g} {prefix}"
    return f"{n} "


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
