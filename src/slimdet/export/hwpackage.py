"""Hardware package: the golden model's integer layers as a directory a hardware team can check RTL against.

Layout (format ``slimdet-hw-package``, version 1; the full description is docs/hw-package.md)::

    manifest.json            format, version, arithmetic, inputs, outputs, tensors, constants, layers
    arrays/003_weight.npy    one .npy per integer array, named <layer index>_<role>.npy
    arrays/const_000.npy     quantized constant operands (e.g. the 0.5 of "x + 0.5")
    test_vectors/input_0.npy one float32 input image
    test_vectors/003.npy     every layer's integer output on that image (by layer index)

The package is written to a temporary directory beside ``out_dir`` and renamed into place, so a reader
sees a complete package or none. ``load_hw_package`` validates it (version, files, dtypes, shapes) and
can rebuild the golden model from it alone, so the package and the arithmetic it documents cannot
drift apart.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slimdet.errors import ExportError
from slimdet.export import golden_ops as ops
from slimdet.export.golden import GoldenModel, GraphOutput
from slimdet.export.golden_ops import FixedPoint, LayerSpec, QParams

FORMAT = "slimdet-hw-package"
VERSION = 1
MANIFEST = "manifest.json"
FIXED_POINT = "y = (x * M0 + 2^(30 + n)) >> (31 + n), x and the product in int64, >> arithmetic (floor)"

# expected dtype of each array role; None: the dtype of the layer's output tensor
_ROLE_DTYPES: dict[str, str | None] = {"weight": "int8", "weight_scale": "float32", "bias": "int32", "lut": None}


class HwPackageError(ExportError):
    """A hardware package is missing, incomplete or inconsistent; the message names the file and the field."""


@dataclass(frozen=True)
class HwPackage:
    """A loaded, validated hardware package."""

    path: Path
    manifest: dict[str, Any]
    layers: tuple[LayerSpec, ...]
    constants: dict[str, np.ndarray]  # quantized constant operands (integers), by tensor name
    test_input: dict[str, np.ndarray]  # graph input name -> float32 image (empty without test vectors)
    test_outputs: dict[str, np.ndarray]  # quantized tensor name -> integer output of the golden model

    def golden(self) -> GoldenModel:
        """The golden model rebuilt from the package alone."""
        m = self.manifest
        return GoldenModel(
            list(self.layers),
            inputs={i["name"]: tuple(i["shape"]) for i in m["inputs"]},
            outputs=[GraphOutput(o["name"], o["tensor"], bool(o["dequantize"])) for o in m["outputs"]],
            tensors={name: _qparams(t) for name, t in m["tensors"].items()},
            constants=self.constants,
        )

    def verify(self) -> int:
        """Rerun the rebuilt golden model on the test input; the largest LSB difference to the test vectors."""
        if not self.test_input:
            raise HwPackageError(f"{self.path / MANIFEST}: the package has no test vectors")
        got = self.golden().run(self.test_input, keep=True)
        return max(
            int(np.abs(got[n].astype(np.int64) - v.astype(np.int64)).max()) for n, v in self.test_outputs.items()
        )


def export_hw_package(
    golden_or_onnx: GoldenModel | str | Path,
    out_dir: str | Path,
    *,
    image: np.ndarray | None = None,
    seed: int = 0,
    test_vectors: bool = True,
) -> Path:
    """Write the hardware package of a golden model (or of a QDQ ONNX file) to ``out_dir``.

    Args:
        golden_or_onnx: a GoldenModel, or the path of a QDQ ONNX file to build one from.
        out_dir: the package directory; an existing package there is replaced atomically, any other
            non-empty directory is left alone (HwPackageError).
        image: the test-vector input (float, the graph input's shape); default a uniform [0, 1) image
            drawn with ``seed``.
        seed: seed of the default test image.
        test_vectors: write the test image and every layer's integer output.

    Returns:
        the package directory.
    """
    golden = golden_or_onnx if isinstance(golden_or_onnx, GoldenModel) else GoldenModel.from_onnx(golden_or_onnx)
    source = None if isinstance(golden_or_onnx, GoldenModel) else str(golden_or_onnx)
    out = Path(out_dir)
    _check_replaceable(out)
    (name, shape), *rest = golden.inputs.items()
    if rest:
        raise HwPackageError(f"{out}: hardware packages support one graph input, the model has {len(golden.inputs)}")
    if image is None:
        image = np.random.default_rng(seed).random(tuple(d if d > 0 else 1 for d in shape), dtype=np.float32)
    image = np.asarray(image, dtype=np.float32)
    values = golden.run(image, keep=True)  # also gives every tensor's actual shape

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a package is meant to be shared
        manifest = _manifest(golden, values, image, name, source)
        for k, (const, array) in enumerate(golden.constants.items()):
            manifest["constants"][const] = _save(tmp, f"arrays/const_{k:03d}.npy", array)
        for i, layer in enumerate(golden.layers()):
            entry = manifest["layers"][i]
            for role, array in _layer_arrays(layer).items():
                entry["arrays"][role] = _save(tmp, f"arrays/{i:03d}_{role}.npy", array)
            if test_vectors:
                manifest["test_vectors"]["outputs"][layer.output] = _save(
                    tmp, f"test_vectors/{i:03d}.npy", values[layer.output]
                )
        if test_vectors:
            manifest["test_vectors"]["inputs"][name] = _save(tmp, "test_vectors/input_0.npy", image)
        else:
            manifest["test_vectors"] = None
        _write(tmp / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _manifest(
    golden: GoldenModel, values: dict[str, np.ndarray], image: np.ndarray, name: str, source: str | None
) -> dict[str, Any]:
    tensors = {}
    for t, qp in golden.tensors.items():
        shape = image.shape if t == name else golden.constants[t].shape if t in golden.constants else values[t].shape
        tensors[t] = {"shape": list(shape), **qp.to_dict()}
    layers = []
    for i, layer in enumerate(golden.layers()):
        layers.append(
            {
                "index": i,
                "name": layer.name,
                "op": layer.op,
                "inputs": list(layer.inputs),
                "output": layer.output,
                "attrs": dict(layer.attrs),
                "weight_bits": layer.weight_bits,
                "requant": {role: fp.real.tolist() for role, fp in layer.requant.items()},  # informational
                "arrays": {},
            }
        )
    return {
        "format": FORMAT,
        "version": VERSION,
        "source": source,
        "fixed_point": {"formula": FIXED_POINT, "multiplier_dtype": "int32", "shift_dtype": "int8"},
        "inputs": [{"name": name, "shape": list(image.shape), "dtype": "float32"}],
        "outputs": [{"name": o.name, "tensor": o.tensor, "dequantize": o.dequantize} for o in golden.outputs],
        "tensors": tensors,
        "constants": {},
        "layers": layers,
        "test_vectors": {"inputs": {}, "outputs": {}},
    }


def _layer_arrays(layer: LayerSpec) -> dict[str, np.ndarray]:
    arrays = {"weight": layer.weight, "weight_scale": layer.weight_scale, "bias": layer.bias, "lut": layer.lut}
    out = {role: a for role, a in arrays.items() if a is not None}
    for role, fp in layer.requant.items():
        out[f"{role}_multiplier"] = fp.multiplier
        out[f"{role}_shift"] = fp.shift
    return out


def _save(root: Path, rel: str, array: np.ndarray) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.save(f, np.asarray(array, order="C"), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return rel


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _check_replaceable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise HwPackageError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        try:
            fmt = json.loads((out / MANIFEST).read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            fmt = None
        if fmt != FORMAT:
            raise HwPackageError(f"{out}: a non-empty directory that is not a {FORMAT}; refusing to replace it")


def _replace_dir(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / "pkg")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------- loading and validation


def load_hw_package(path: str | Path) -> HwPackage:
    """Load and validate a hardware package; HwPackageError names the file and the manifest field."""
    root = Path(path)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise HwPackageError(f"{mpath}: manifest not found (is {root} a {FORMAT}?)")
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HwPackageError(f"{mpath}: not valid JSON: {exc}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise HwPackageError(f"{mpath}: field 'format' is {got!r}, expected {FORMAT!r}")
    if m.get("version") != VERSION:
        raise HwPackageError(f"{mpath}: field 'version' is {m.get('version')!r}, this reader supports {VERSION}")
    for key, kind in (("inputs", list), ("outputs", list), ("tensors", dict), ("layers", list)):
        if not isinstance(m.get(key), kind):
            raise HwPackageError(f"{mpath}: field {key!r} is missing or not a {kind.__name__}")
    input_names = {i["name"] for i in m["inputs"]}
    tensors = {name: _qparams(t, f"{mpath}: tensors[{name!r}]") for name, t in m["tensors"].items()}
    layers = tuple(
        _layer(root, mpath, i, entry, tensors, m["tensors"], input_names) for i, entry in enumerate(m["layers"])
    )
    constants = {}
    for name, rel in (m.get("constants") or {}).items():
        if name not in tensors:
            raise HwPackageError(f"{mpath}: constants names tensor {name!r}, which is not in 'tensors'")
        constants[name] = _load(root, rel, tensors[name].dtype, f"constants[{name!r}]")
        if list(constants[name].shape) != list(m["tensors"][name].get("shape", [])):
            raise HwPackageError(f"{root / rel}: shape {constants[name].shape} differs from tensors[{name!r}].shape")
    produced = {layer.output for layer in layers}
    for k, o in enumerate(m["outputs"]):
        if o.get("tensor") not in produced:
            raise HwPackageError(f"{mpath}: outputs[{k}].tensor {o.get('tensor')!r} is made by no layer")
    test_input, test_outputs = {}, {}
    tv = m.get("test_vectors")
    if tv:
        for name, rel in tv.get("inputs", {}).items():
            test_input[name] = _load(root, rel, "float32", f"test_vectors.inputs[{name!r}]")
        for name, rel in tv.get("outputs", {}).items():
            if name not in tensors:
                raise HwPackageError(f"{mpath}: test_vectors.outputs names unknown tensor {name!r}")
            arr = _load(root, rel, tensors[name].dtype, f"test_vectors.outputs[{name!r}]")
            want = tuple(m["tensors"][name]["shape"])
            if arr.shape != want:
                raise HwPackageError(f"{root / rel}: shape {arr.shape}, expected {want} (tensors[{name!r}].shape)")
            test_outputs[name] = arr
    return HwPackage(root, m, layers, constants, test_input, test_outputs)


def _qparams(t: dict[str, Any], where: str = "tensor") -> QParams:
    try:
        qp = QParams(float(t["scale"]), int(t["zero_point"]), str(t["dtype"]))
        qp.bits  # noqa: B018 - validates the dtype name
    except (KeyError, TypeError, ValueError) as exc:
        raise HwPackageError(f"{where}: needs scale, zero_point and an integer dtype ({exc})") from None
    return qp


def _layer(
    root: Path, mpath: Path, i: int, e: dict[str, Any], tensors: dict[str, QParams], tinfo: dict, inputs: set[str]
) -> LayerSpec:
    where = f"{mpath}: layers[{i}]"
    for key in ("name", "op", "inputs", "output", "attrs", "arrays"):
        if key not in e:
            raise HwPackageError(f"{where}: field {key!r} is missing")
    if e["op"] not in ops.KERNELS:
        raise HwPackageError(f"{where}.op: unknown op {e['op']!r}; known: {', '.join(ops.KERNELS.names())}")
    for name in (*e["inputs"], e["output"]):
        if name not in tensors and name not in inputs:
            raise HwPackageError(f"{where}: tensor {name!r} is not in the manifest's 'tensors'")
    out_q = tensors[e["output"]]
    arrays = {}
    for role, rel in e["arrays"].items():
        want = _ROLE_DTYPES.get(role, "int32" if role.endswith("_multiplier") else "int8")
        arrays[role] = _load(root, rel, want or out_q.dtype, f"layers[{i}].arrays.{role}")
    for role in _required(e["op"], len(e["inputs"])):
        if role not in arrays:
            raise HwPackageError(f"{where}.arrays: {e['op']} needs array {role!r}")
    requant = {}
    for role in sorted({r.rsplit("_", 1)[0] for r in arrays if r.endswith(("_multiplier", "_shift"))}):
        m0, n = arrays.get(f"{role}_multiplier"), arrays.get(f"{role}_shift")
        if m0 is None or n is None or m0.shape != n.shape:
            raise HwPackageError(f"{where}.arrays: {role}_multiplier and {role}_shift must both exist, same shape")
        real = m0.astype(np.float64) * np.exp2(-(31.0 + n.astype(np.float64)))
        requant[role] = FixedPoint(m0, n, real)
    if "weight" in arrays and "bias" in arrays and arrays["bias"].shape != (arrays["weight"].shape[0],):
        raise HwPackageError(
            f"{where}.arrays.bias: shape {arrays['bias'].shape}, expected ({arrays['weight'].shape[0]},)"
        )

    def shape(name: str) -> tuple[int, ...]:
        return tuple(tinfo[name]["shape"]) if name in tinfo else ()

    return LayerSpec(
        name=e["name"],
        op=e["op"],
        inputs=tuple(e["inputs"]),
        output=e["output"],
        input_shapes=tuple(shape(n) for n in e["inputs"]),
        output_shape=shape(e["output"]),
        input_q=tuple(tensors.get(n) if n not in inputs else None for n in e["inputs"]),
        output_q=out_q,
        attrs=e["attrs"],
        weight=arrays.get("weight"),
        weight_scale=arrays.get("weight_scale"),
        bias=arrays.get("bias"),
        lut=arrays.get("lut"),
        requant=requant,
    )


def _required(op: str, n_inputs: int) -> list[str]:
    if op in ("Conv", "Gemm", "MatMul"):
        return ["weight", "bias", "out_multiplier", "out_shift"]
    if op in ops.UNARY:
        return ["lut"]
    if op == "Add":
        return [f"{r}_{k}" for r in ("in0", "in1", "out") for k in ("multiplier", "shift")]
    if op == "Concat":
        return [f"in{i}_{k}" for i in range(n_inputs) for k in ("multiplier", "shift")]
    if op in ("Mul", "GlobalAveragePool", "Requantize"):
        return ["out_multiplier", "out_shift"]
    return []


def _load(root: Path, rel: Any, dtype: str, field: str) -> np.ndarray:
    if not isinstance(rel, str) or rel.startswith("/") or ".." in Path(rel).parts:
        raise HwPackageError(f"{root / MANIFEST}: field {field} must be a relative file name, got {rel!r}")
    path = root / rel
    if not path.is_file():
        raise HwPackageError(f"{path}: file missing (manifest field {field})")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise HwPackageError(f"{path}: not a readable .npy file (manifest field {field}): {exc}") from None
    if arr.dtype != np.dtype(dtype):
        raise HwPackageError(f"{path}: dtype {arr.dtype}, expected {dtype} (manifest field {field})")
    return arr
