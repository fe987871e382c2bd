import json
import struct
import zlib

import numpy as np
import pytest
import torch

from slimdet.compress.share import ShareConfig, share_weights, shared_layers
from slimdet.compress.sparsity import SparsityConfig, sparsify
from slimdet.errors import CheckpointError
from slimdet.export.archive import _decode_shared, _encode, _encode_shared, archive_bytes, read_archive, write_archive
from slimdet.models import create_model


def _model(sparsity: float | None = 0.7, bits: int | None = 4, **share):
    torch.manual_seed(0)
    model = create_model("yolo-test", num_classes=10, input_size=64).eval()
    if sparsity:
        sparsify(model, SparsityConfig(sparsity=sparsity))
    if bits:
        share_weights(model, ShareConfig(bits=bits, **share))
    return model


def _outputs(model):
    model.eval()
    with torch.no_grad():
        return model(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)))


def _assert_identical(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    for x, y in zip(_outputs(a), _outputs(b), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    ("sparsity", "bits", "share"),
    [(0.7, 4, {}), (0.95, 1, {}), (None, 8, {"include_output_layers": True}), (0.5, None, {})],
    ids=["70%-4bit", "95%-1bit", "dense-8bit-all-layers", "sparse-not-shared"],
)
def test_round_trip_is_bit_exact(tmp_path, sparsity, bits, share):
    model = _model(sparsity, bits, **share)
    result = write_archive(model, tmp_path / "m.sdz")
    loaded = read_archive(tmp_path / "m.sdz")
    _assert_identical(model, loaded)
    assert loaded.model_config == model.model_config and not loaded.training
    assert set(shared_layers(loaded)) == set(shared_layers(model))
    assert result.size_bytes == (tmp_path / "m.sdz").stat().st_size == result.stages.huffman_bytes
    assert [p.name for p in tmp_path.iterdir()] == ["m.sdz"]  # atomic write leaves no temporary file


def test_global_sparsity_with_all_zero_layers_round_trips(tmp_path):
    model = _model(0.7)  # 70% globally zeroes two whole head layers of this untrained model
    result = write_archive(model, tmp_path / "m.sdz")
    empty = [layer for layer in result.layers if layer.nonzeros == 0]
    assert empty and all(layer.index_bytes + layer.position_bytes <= 16 for layer in empty)
    _assert_identical(model, read_archive(tmp_path / "m.sdz"))


@pytest.mark.parametrize("density", [0.0005, 0.02, 0.3, 1.0])
def test_positions_with_long_gaps_use_escapes_and_decode_exactly(density):
    g = torch.Generator().manual_seed(1)
    index = torch.randint(0, 16, (64, 32, 3, 3), generator=g, dtype=torch.uint8)
    index[torch.rand(index.shape, generator=g) >= density] = 16
    index.view(-1)[-1] = 3  # a nonzero at the very end
    blob, info = _encode_shared("layer", torch.randn(16), index)
    entry = {"layer": "layer", "bits": 4, "dtype": "float32", "index_dtype": "uint8", "shape": list(index.shape)}
    _, decoded = _decode_shared(memoryview(blob), entry)
    assert torch.equal(decoded, index) and decoded.dtype == torch.uint8
    assert info.nonzeros == int((index != 16).sum()) and len(blob) == info.bytes
    gaps = np.diff(np.flatnonzero(index.flatten().numpy() != 16), prepend=-1) - 1
    if density < 0.01:
        assert gaps.max() >= 1 << info.gap_bits  # at least one gap needed escapes
    if density == 1.0:
        assert info.position_bytes <= 8  # no zeros: a single repeated gap symbol


def test_huffman_coding_beats_fixed_width_indices_and_bitmap_positions():
    model = _model(0.9, 4)
    data = archive_bytes(model)
    _, layers, raw, meta = _encode(model)
    coded = sum(layer.index_bytes + layer.position_bytes for layer in layers)
    fixed = sum((layer.nonzeros * 4 + 7) // 8 + (layer.numel + 7) // 8 for layer in layers)
    assert coded < 0.9 * fixed
    assert len(data) == 18 + meta + raw + sum(layer.bytes for layer in layers)


def test_bad_files_raise_checkpoint_errors_naming_the_file(tmp_path):
    path = tmp_path / "m.sdz"
    write_archive(_model(0.5, 2), path)
    data = path.read_bytes()
    with pytest.raises(CheckpointError, match="archive file not found"):
        read_archive(tmp_path / "missing.sdz")
    cases = {
        "flipped.sdz": (data[:500] + bytes([data[500] ^ 0x40]) + data[501:], "checksum mismatch"),
        "truncated.sdz": (data[: len(data) // 2], "checksum mismatch"),
        "magic.sdz": (b"PK\x03\x04" + data[4:], "expected a file starting with"),
        "empty.sdz": (b"", "expected a file starting with"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=f"{name}: not a readable slimdet archive: {message}"):
            read_archive(tmp_path / name)


def test_archive_of_an_unknown_model_names_the_model(tmp_path):
    model = _model(None, 2)
    model.model_config = {**model.model_config, "name": "yolo-xxl"}
    write_archive(model, tmp_path / "m.sdz")
    with pytest.raises(CheckpointError, match=r"m\.sdz: archive does not rebuild model 'yolo-xxl'"):
        read_archive(tmp_path / "m.sdz")


def _forge(data: bytes, edit) -> bytes:
    """The archive with its metadata edited and a valid checksum (what a hostile file could hold)."""
    _, version, _, meta_len = struct.unpack_from("<8sHII", data)
    meta = json.loads(zlib.decompress(data[18 : 18 + meta_len]))
    edit(meta)
    new_meta = zlib.compress(json.dumps(meta).encode())
    rest = new_meta + data[18 + meta_len :]
    return struct.pack("<8sHII", b"SLIMDARC", version, zlib.crc32(rest), len(new_meta)) + rest


def test_forged_metadata_is_refused_before_allocating(tmp_path):
    write_archive(_model(0.5, 2), tmp_path / "m.sdz")
    data = (tmp_path / "m.sdz").read_bytes()
    first_shared = lambda meta: next(e for e in meta["tensors"] if e["kind"] == "shared")  # noqa: E731
    edits = {
        "bits.sdz": (lambda meta: first_shared(meta).update(bits=40), "bits 40 not in"),
        "shape.sdz": (lambda meta: first_shared(meta).update(shape=[1 << 20, 1 << 20]), "implausibly large"),
        "dtype.sdz": (lambda meta: first_shared(meta).update(index_dtype="load"), "index dtype 'load'"),
        "kind.sdz": (lambda meta: meta["tensors"][0].update(kind="pickle"), "unknown tensor kind 'pickle'"),
    }
    for name, (edit, message) in edits.items():
        (tmp_path / name).write_bytes(_forge(data, edit))
        with pytest.raises(CheckpointError, match=f"{name}: not a readable slimdet archive: .*{message}"):
            read_archive(tmp_path / name)
