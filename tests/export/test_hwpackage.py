"""Hardware package: written atomically, loads back to the same arrays, rebuilds the same golden model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from torch import nn

from slimdet.export import export_onnx
from slimdet.export.golden import GoldenModel
from slimdet.export.hwpackage import FORMAT, HwPackageError, export_hw_package, load_hw_package


class SmallNet(nn.Module):
    input_size = 16

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, stride=2, padding=1)

    def forward(self, x):
        x = F.silu(self.a(x))
        y = F.silu(self.b(x))
        return torch.cat([F.max_pool2d(x, 2), y + y.sigmoid() + 0.25], 1)  # 0.25: a quantized constant


class _Reader(CalibrationDataReader):
    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.it = iter([{"images": rng.random((1, 3, 16, 16), dtype=np.float32)} for _ in range(3)])

    def get_next(self):
        return next(self.it, None)


@pytest.fixture(scope="module")
def qdq(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("hw")
    torch.manual_seed(0)
    export_onnx(SmallNet().eval(), tmp / "fp32.onnx")
    quantize_static(
        str(tmp / "fp32.onnx"),
        str(tmp / "int8.onnx"),
        _Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return tmp / "int8.onnx"


def test_round_trip(qdq, tmp_path):
    golden = GoldenModel.from_onnx(qdq)
    out = export_hw_package(golden, tmp_path / "pkg")
    assert out == tmp_path / "pkg" and sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]  # no temp dirs left
    pkg = load_hw_package(out)
    m = pkg.manifest
    assert m["format"] == FORMAT and m["version"] == 1
    assert [e["op"] for e in m["layers"]] == [layer.op for layer in golden.layers()]
    assert m["tensors"][m["outputs"][0]["tensor"]]["shape"] == [1, 12, 8, 8]

    for written, loaded in zip(golden.layers(), pkg.layers, strict=True):
        assert (loaded.name, loaded.op, loaded.inputs, loaded.output) == (
            written.name,
            written.op,
            written.inputs,
            written.output,
        )
        assert loaded.output_q == written.output_q and loaded.input_q == written.input_q
        assert dict(loaded.attrs) == dict(written.attrs)
        for field in ("weight", "bias", "lut"):
            a, b = getattr(written, field), getattr(loaded, field)
            assert (a is None) == (b is None) and (a is None or (a.dtype == b.dtype and np.array_equal(a, b)))
        assert set(loaded.requant) == set(written.requant)
        for role, fp in written.requant.items():
            assert loaded.requant[role].multiplier.dtype == np.int32 and loaded.requant[role].shift.dtype == np.int8
            np.testing.assert_array_equal(loaded.requant[role].multiplier, fp.multiplier)
            np.testing.assert_array_equal(loaded.requant[role].shift, fp.shift)

    conv = next(e for e in m["layers"] if e["op"] == "Conv")
    assert set(conv["arrays"]) == {"weight", "weight_scale", "bias", "out_multiplier", "out_shift"}
    assert np.load(out / conv["arrays"]["weight"]).dtype == np.int8

    # The test vectors are the golden model's outputs, and the package alone reproduces them bit-exactly.
    assert len(pkg.test_outputs) == len(golden.layers())
    (const,) = golden.constants
    assert np.array_equal(pkg.constants[const], golden.constants[const]) and pkg.constants[const].dtype == np.uint8
    assert pkg.verify() == 0
    x = np.random.default_rng(5).random((1, 3, 16, 16), dtype=np.float32)
    want, got = golden.run(x, keep=True), pkg.golden().run(x, keep=True)
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)


def test_replaces_a_package_but_not_other_directories(qdq, tmp_path):
    first = export_hw_package(qdq, tmp_path / "pkg", seed=1)
    before = np.load(first / "test_vectors/input_0.npy")
    export_hw_package(qdq, tmp_path / "pkg", seed=2, test_vectors=True)
    assert not np.array_equal(before, np.load(first / "test_vectors/input_0.npy"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
    assert json.loads((first / "manifest.json").read_text())["source"] == str(qdq)

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(HwPackageError, match="not a slimdet-hw-package; refusing"):
        export_hw_package(qdq, other)
    assert (other / "keep.txt").read_text() == "mine"


def _corrupt(pkg: Path, edit) -> None:
    path = pkg / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_corrupted_packages_give_clear_errors(qdq, tmp_path):
    pkg = export_hw_package(qdq, tmp_path / "pkg")
    manifest = json.loads((pkg / "manifest.json").read_text())
    conv = next(i for i, e in enumerate(manifest["layers"]) if e["op"] == "Conv")
    weight = pkg / manifest["layers"][conv]["arrays"]["weight"]

    weight.unlink()
    with pytest.raises(
        HwPackageError, match=rf"{weight.name}: file missing \(manifest field layers\[{conv}\]\.arrays\.weight\)"
    ):
        load_hw_package(pkg)

    np.save(weight, np.zeros((6, 3, 3, 3), np.int16))
    with pytest.raises(HwPackageError, match=rf"{weight.name}: dtype int16, expected int8"):
        load_hw_package(pkg)
    np.save(weight, np.zeros((6, 3, 3, 3), np.int8))
    assert load_hw_package(pkg).verify() > 0  # loads again, and the test vectors catch the zeroed weights

    _corrupt(pkg, lambda m: m.update(version=2))
    with pytest.raises(HwPackageError, match=r"manifest.json: field 'version' is 2, this reader supports 1"):
        load_hw_package(pkg)

    _corrupt(pkg, lambda m: m.update(version=1, format="something-else"))
    with pytest.raises(HwPackageError, match=r"field 'format' is 'something-else'"):
        load_hw_package(pkg)

    _corrupt(pkg, lambda m: (m.update(format=FORMAT), m["layers"][conv]["arrays"].pop("bias")))
    with pytest.raises(HwPackageError, match=rf"layers\[{conv}\]\.arrays: Conv needs array 'bias'"):
        load_hw_package(pkg)

    (pkg / "manifest.json").write_text("{not json")
    with pytest.raises(HwPackageError, match="manifest.json: not valid JSON"):
        load_hw_package(pkg)
    (pkg / "manifest.json").unlink()
    with pytest.raises(HwPackageError, match="manifest.json: manifest not found"):
        load_hw_package(pkg)
