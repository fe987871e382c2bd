"""The deep-compression archive: a model in few bytes, decoded exactly into a runnable detector.

Deep compression's last stage (Han, Mao & Dally, ICLR 2016, section 4): for every shared layer
(``slimdet.compress.share``) the archive holds its codebook (raw), the Huffman-coded centroid
indices of its nonzero weights, and the Huffman-coded positions of those nonzeros as gaps (zeros
skipped since the previous nonzero, row-major). A gap of ``span = 2^gap_bits`` or more is written as
escape symbols, each skipping ``span`` zeros, then the remainder: Han et al.'s filler zeros, except
that the escape costs no index. ``gap_bits`` is chosen per layer for the smallest coded size. Every
other tensor of the state dict (biases, BatchNorm, unshared layers) is stored raw, so it comes back
bit for bit; so do the codebooks and indices, hence the shared weights and the outputs.

Layout, little-endian::

    b"SLIMDARC"  u16 version  u32 crc32(rest)  u32 meta_len
    meta: zlib(JSON {"format", "version", "model": model_config, "tensors": [entry, ...]})
    body: one blob per entry, in order
        raw entry    {"key", "kind": "raw", "dtype", "shape", "nbytes"}: the tensor's bytes
        shared entry {"layer", "kind": "shared", "dtype", "index_dtype", "shape", "bits", "nbytes"}:
                     2^bits centroids, Huffman stream of indices, u8 gap_bits, Huffman stream of gaps

``read_archive`` rebuilds the architecture from the model config (replaying the recorded
transforms, as ``load_model`` does) and loads the decoded state dict strictly.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from slimdet.compress.share import MAX_BITS, StageBytes, shared_layers, stage_bytes
from slimdet.errors import CheckpointError, ExportError, SlimdetError
from slimdet.export.huffman import coded_bytes, decode_stream, encode_stream
from slimdet.io import atomic_write
from slimdet.models.base import Detector

__all__ = ["ARCHIVE_SUFFIX", "ArchiveResult", "LayerArchive", "archive_bytes", "read_archive", "write_archive"]

MAGIC = b"SLIMDARC"
VERSION = 1
ARCHIVE_FORMAT = "slimdet-archive"
ARCHIVE_SUFFIX = ".sdz"
#: bounds on what a (possibly hostile) file may make the reader allocate
MAX_META_BYTES = 1 << 26
MAX_SHARED_ELEMENTS = 1 << 32
_INDEX_DTYPES = ("uint8", "int16", "int32", "int64")
_HEADER = struct.Struct("<8sHII")  # magic, version, crc32 of everything after the header, meta length
#: gap alphabets tried per layer: 2^0 .. 2^8 gap symbols plus the escape
GAP_BITS = range(9)
_NUMPY_DTYPES = {"float32": "<f4", "float64": "<f8", "float16": "<f2", "bfloat16": "<i2", "int64": "<i8",
                 "int32": "<i4", "int16": "<i2", "int8": "i1", "uint8": "u1", "bool": "?"}  # fmt: skip


@dataclass(frozen=True)
class LayerArchive:
    """Bytes of one shared layer in the archive."""

    name: str
    numel: int
    nonzeros: int
    bits: int
    gap_bits: int
    codebook_bytes: int
    index_bytes: int
    position_bytes: int

    @property
    def bytes(self) -> int:
        return self.codebook_bytes + self.index_bytes + self.position_bytes

    def to_dict(self) -> dict[str, Any]:
        per_nz = 8 / max(1, self.nonzeros)
        return {"name": self.name, "numel": self.numel, "nonzeros": self.nonzeros, "bits": self.bits,
                "gap_bits": self.gap_bits, "codebook_bytes": self.codebook_bytes, "index_bytes": self.index_bytes,
                "position_bytes": self.position_bytes, "bytes": self.bytes,
                "index_bits_per_nonzero": self.index_bytes * per_nz,
                "position_bits_per_nonzero": self.position_bytes * per_nz}  # fmt: skip


@dataclass(frozen=True)
class ArchiveResult:
    """What ``write_archive`` wrote; ``stages.huffman_bytes`` is the file size."""

    path: str
    size_bytes: int
    stages: StageBytes
    layers: tuple[LayerArchive, ...]
    #: tensors stored as they are (everything but the shared layers)
    raw_bytes: int
    #: compressed metadata (model config, tensor names and shapes)
    meta_bytes: int

    @property
    def ratio(self) -> float:
        """Dense FP32 state dict bytes over archive bytes."""
        return self.stages.dense_bytes / self.size_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size_bytes": self.size_bytes, "ratio": self.ratio, **self.stages.to_dict(),
                "raw_bytes": self.raw_bytes, "meta_bytes": self.meta_bytes,
                "layers": [layer.to_dict() for layer in self.layers]}  # fmt: skip


def write_archive(model: Detector, path: str | Path) -> ArchiveResult:
    """Write ``model`` (its config and state dict) as a compressed archive, atomically.

    Raises:
        ExportError: a tensor of a type the archive cannot hold, or a model config that is not JSON.
    """
    data, layers, raw, meta = _encode(model)
    path = atomic_write(path, lambda f: f.write(data))
    return ArchiveResult(path=str(path), size_bytes=len(data), stages=stage_bytes(model, huffman_bytes=len(data)),
                         layers=tuple(layers), raw_bytes=raw, meta_bytes=meta)  # fmt: skip


def archive_bytes(model: Detector) -> bytes:
    """The bytes ``write_archive`` would write for ``model``."""
    return _encode(model)[0]


def read_archive(path: str | Path) -> Detector:
    """Rebuild the model stored by ``write_archive`` (in eval mode).

    Raises:
        CheckpointError: the file is missing, is not an archive, is corrupt or truncated, or its
            model config no longer builds a model its tensors fit.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: archive file not found")
    try:
        config, state = _decode(path.read_bytes())
    except (ValueError, KeyError, TypeError, IndexError, struct.error, zlib.error) as exc:
        raise CheckpointError(f"{path}: not a readable slimdet archive: {exc}") from None
    from slimdet.models.registry import model_from_config

    try:
        model = model_from_config(config)
        model.load_state_dict(state, strict=True)
    except (SlimdetError, RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: archive does not rebuild model {config.get('name')!r}: {first}") from None
    return model.eval()


# ----- encoding ---------------------------------------------------------------------------------
def _encode(model: Detector) -> tuple[bytes, list[LayerArchive], int, int]:
    shared = shared_layers(model)
    state = model.state_dict()
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    layers: list[LayerArchive] = []
    raw = 0
    written: set[str] = set()
    for key, tensor in state.items():
        layer, _, part = key.rpartition(".")
        if layer in shared and part in ("weight_centroids", "weight_index"):
            if layer in written:
                continue  # the layer's other tensor: written with the first
            blob, info = _encode_shared(layer, state[f"{layer}.weight_centroids"], state[f"{layer}.weight_index"])
            layers.append(info)
            written.add(layer)
            entries.append({"layer": layer, "kind": "shared", "dtype": _dtype_name(state[f"{layer}.weight_centroids"]),
                            "index_dtype": _dtype_name(state[f"{layer}.weight_index"]),
                            "shape": list(state[f"{layer}.weight_index"].shape), "bits": info.bits,
                            "nbytes": len(blob)})  # fmt: skip
        else:
            blob = _tensor_bytes(key, tensor)
            raw += len(blob)
            entries.append({"key": key, "kind": "raw", "dtype": _dtype_name(tensor), "shape": list(tensor.shape),
                            "nbytes": len(blob)})  # fmt: skip
        blobs.append(blob)
    try:
        meta_json = json.dumps({"format": ARCHIVE_FORMAT, "version": VERSION, "model": model.model_config,
                                "tensors": entries}, separators=(",", ":"))  # fmt: skip
    except TypeError as exc:
        raise ExportError(f"archive: the model config is not plain JSON data: {exc}") from None
    meta = zlib.compress(meta_json.encode("utf-8"), 9)
    rest = b"".join([meta, *blobs])
    return _HEADER.pack(MAGIC, VERSION, zlib.crc32(rest), len(meta)) + rest, layers, raw, len(meta)


def _encode_shared(name: str, centroids: Tensor, index: Tensor) -> tuple[bytes, LayerArchive]:
    k = centroids.numel()
    flat = index.detach().cpu().reshape(-1).numpy().astype(np.int64)
    positions = np.flatnonzero(flat != k)
    codebook = _tensor_bytes(f"{name}.weight_centroids", centroids)
    indices = encode_stream(flat[positions])
    gaps = np.diff(positions, prepend=-1) - 1  # zeros skipped before each nonzero
    gap_bits = min(GAP_BITS, key=lambda g: coded_bytes(_gap_counts(gaps, 1 << g)))
    places = struct.pack("<B", gap_bits) + encode_stream(_gap_symbols(gaps, 1 << gap_bits))
    info = LayerArchive(name=name, numel=flat.size, nonzeros=len(positions), bits=(k - 1).bit_length(),
                        gap_bits=gap_bits, codebook_bytes=len(codebook), index_bytes=len(indices),
                        position_bytes=len(places))  # fmt: skip
    return codebook + indices + places, info


def _gap_counts(gaps: np.ndarray, span: int) -> np.ndarray:
    counts = np.bincount(gaps % span, minlength=span + 1)
    counts[span] += int((gaps // span).sum())
    return counts


def _gap_symbols(gaps: np.ndarray, span: int) -> np.ndarray:
    """Each gap as ``gap // span`` escapes (symbol ``span``) then ``gap % span``."""
    escapes = gaps // span
    symbols = np.full(int(escapes.sum()) + len(gaps), span, dtype=np.int64)
    symbols[np.cumsum(escapes + 1) - 1] = gaps % span
    return symbols


def _tensor_bytes(key: str, tensor: Tensor) -> bytes:
    name = _dtype_name(tensor)
    if name not in _NUMPY_DTYPES:
        raise ExportError(f"archive: tensor {key!r} has dtype {tensor.dtype}, which the archive cannot store "
                          f"(supported: {', '.join(_NUMPY_DTYPES)})")  # fmt: skip
    t = tensor.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().astype(_NUMPY_DTYPES[name], copy=False).tobytes()


def _dtype_name(tensor: Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


# ----- decoding ---------------------------------------------------------------------------------
def _decode(data: bytes) -> tuple[dict[str, Any], dict[str, Tensor]]:
    if len(data) < _HEADER.size or data[:8] != MAGIC:
        raise ValueError(f"expected a file starting with {MAGIC!r} (written by slimdet.export.archive.write_archive)")
    _, version, crc, meta_len = _HEADER.unpack_from(data)
    if version != VERSION:
        raise ValueError(f"archive version {version}; this slimdet reads version {VERSION}")
    view = memoryview(data)[_HEADER.size :]
    if zlib.crc32(view) != crc:
        raise ValueError("checksum mismatch: the file is corrupt or truncated")
    inflate = zlib.decompressobj()
    meta_json = inflate.decompress(view[:meta_len], MAX_META_BYTES)
    if inflate.unconsumed_tail or not inflate.eof:
        raise ValueError(f"metadata is truncated or inflates beyond {MAX_META_BYTES} bytes")
    meta = json.loads(meta_json.decode("utf-8"))
    if meta.get("format") != ARCHIVE_FORMAT:
        raise ValueError(f"metadata format {meta.get('format')!r}, expected {ARCHIVE_FORMAT!r}")
    offset = meta_len
    state: dict[str, Tensor] = {}
    for entry in meta["tensors"]:
        blob = view[offset : offset + entry["nbytes"]]
        if len(blob) != entry["nbytes"]:
            raise ValueError(f"body ends inside the tensor {entry.get('key') or entry.get('layer')!r}")
        offset += entry["nbytes"]
        if entry["kind"] == "raw":
            state[entry["key"]] = _tensor_from(blob, entry["dtype"], entry["shape"])
        elif entry["kind"] == "shared":
            centroids, index = _decode_shared(blob, entry)
            state[f"{entry['layer']}.weight_centroids"] = centroids
            state[f"{entry['layer']}.weight_index"] = index
        else:
            raise ValueError(f"unknown tensor kind {entry['kind']!r}")
    if offset != len(view):
        raise ValueError(f"{len(view) - offset} bytes after the last tensor")
    return meta["model"], state


def _decode_shared(blob: memoryview, entry: dict[str, Any]) -> tuple[Tensor, Tensor]:
    if not 1 <= int(entry["bits"]) <= MAX_BITS:
        raise ValueError(f"layer {entry['layer']!r}: bits {entry['bits']!r} not in [1, {MAX_BITS}]")
    k = 2 ** int(entry["bits"])
    shape = [int(s) for s in entry["shape"]]
    numel = int(np.prod(shape))
    if numel > MAX_SHARED_ELEMENTS:
        raise ValueError(f"layer {entry['layer']!r}: shape {shape} is implausibly large")
    width = np.dtype(_NUMPY_DTYPES[entry["dtype"]]).itemsize * k
    centroids = _tensor_from(blob[:width], entry["dtype"], [k])
    indices, offset = decode_stream(blob, width)
    (gap_bits,) = struct.unpack_from("<B", blob, offset)
    symbols, offset = decode_stream(blob, offset + 1)
    if offset != len(blob):
        raise ValueError(f"layer {entry['layer']!r}: {len(blob) - offset} stray bytes")
    span = 1 << gap_bits
    if gap_bits not in GAP_BITS or symbols.max(initial=0) > span or (len(symbols) and symbols[-1] == span):
        raise ValueError(f"layer {entry['layer']!r}: invalid position stream")
    real = np.flatnonzero(symbols != span)
    escapes = np.cumsum(symbols == span)[real]
    positions = np.cumsum(np.diff(escapes, prepend=0) * span + symbols[real] + 1) - 1
    if len(positions) != len(indices) or (len(positions) and positions[-1] >= numel) or indices.max(initial=0) >= k:
        raise ValueError(f"layer {entry['layer']!r}: positions and indices do not fit a weight of shape {shape}")
    flat = np.full(numel, k, dtype=np.int64)
    flat[positions] = indices
    if entry["index_dtype"] not in _INDEX_DTYPES:
        raise ValueError(f"layer {entry['layer']!r}: index dtype {entry['index_dtype']!r} not in {_INDEX_DTYPES}")
    index = torch.from_numpy(flat).reshape(shape).to(getattr(torch, entry["index_dtype"]))
    return centroids, index


def _tensor_from(blob: memoryview, dtype: str, shape: list[int]) -> Tensor:
    array = np.frombuffer(blob, dtype=_NUMPY_DTYPES[dtype]).reshape(shape)
    tensor = torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor
