"""QDQ export of a quantized detector: integer weights, ONNX Runtime's int8 kernels, the consistency
check, and the integer-only reference against the simulation."""

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from slimdet.compress.quant import QuantConfig, quantize
from slimdet.compress.quant.consistency import QuantConsistencyError, check_consistency
from slimdet.data.dataset import collate
from slimdet.errors import ExportError
from slimdet.export.golden import GoldenModel, compare_layers
from slimdet.export.hwpackage import export_hw_package, load_hw_package
from slimdet.export.qdq import export_qdq


def _quantize_all_integer(fitted_tiny, tiny_test_ds, **options):
    images, targets = collate([tiny_test_ds[i] for i in range(len(tiny_test_ds))])
    model = copy.deepcopy(fitted_tiny)
    cfg = QuantConfig(overrides={r"neck\..*": {"weight_bits": 4}}, auto_keep=False, adaround=False, runtime_aware=False,
                      float_outputs=False, **options)  # every tensor integer: int8 kernels only, golden model runs it
    result = quantize(model, cfg, calib=[(images, targets)], progress=False)
    return model.eval(), result


@pytest.fixture(scope="module")
def quantized_and_result(fitted_tiny, tiny_test_ds):
    return _quantize_all_integer(fitted_tiny, tiny_test_ds)


@pytest.fixture(scope="module")
def quantized(quantized_and_result):
    return quantized_and_result[0]


@pytest.fixture(scope="module")
def qdq_file(quantized, tmp_path_factory):
    path = tmp_path_factory.mktemp("qdq") / "int8.onnx"
    result = export_qdq(quantized, path)
    return path, result


def test_weights_are_stored_as_integers_and_ort_runs_int8_kernels(quantized, qdq_file, tmp_path):
    path, result = qdq_file
    convs = sum(1 for m in quantized.modules() if isinstance(m, torch.nn.Conv2d))
    assert result.int8_weights == convs and result.int32_biases == convs
    proto = onnx.load(str(path))
    ints = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert len(ints) == convs
    neck = sum(1 for n, m in quantized.named_modules() if n.startswith("neck.") and isinstance(m, torch.nn.Conv2d))
    narrow = [i for i in ints if np.abs(numpy_helper.to_array(i)).max() <= 7]
    assert len(narrow) == neck  # the 4-bit layers' codes sit inside the int8 container
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert {"QLinearConv", "QLinearSigmoid", "QLinearMul", "QLinearConcat"} <= ops
    assert "Conv" not in ops  # every conv runs in int8
    assert result.max_diff_steps is not None and result.max_diff_steps < 8  # runtime vs simulation, in output steps


def _concat_inputs_on_the_concat_grid(path):
    """(concatenation inputs written with their concatenation's exact scale and zero point, all such inputs)."""
    graph = onnx.load(str(path)).graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"})
    producer = {o: n for n in graph.node for o in n.output}
    users = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)

    def qparams(node):
        return float(consts[node.input[1]]), int(consts[node.input[2]])

    same = total = 0
    for cat in (n for n in graph.node if n.op_type == "Concat"):
        q = [u for u in users.get(cat.output[0], []) if u.op_type == "QuantizeLinear"]
        if not q:
            continue
        ins = [producer[i] for i in cat.input if producer[i].op_type == "DequantizeLinear"]
        total += len(ins)
        same += sum(qparams(d) == qparams(q[0]) for d in ins)
    return same, total


def test_shared_concatenation_grids_reach_the_file_so_the_runtime_copies(quantized_and_result, qdq_file, fitted_tiny,
                                                                         tiny_test_ds, tmp_path):
    """The inputs that share their concatenation's grid (share_concat_grids, the default) are written with
    its exact scale and zero point, so ONNX Runtime's QLinearConcat copies them instead of requantizing
    through a lookup table; with share_concat_grids=False none is. How many inputs join depends on the
    calibrated ranges (here 30 to 35 of 42, by CPU), so the file is checked against the quantizer's record."""
    joined = sum(len(inputs) for inputs in quantized_and_result[1].steps["shared_concat_grids"].values())
    same, total = _concat_inputs_on_the_concat_grid(qdq_file[0])
    assert total and joined >= total // 2, (joined, total)  # yolo-test's C2f concatenations mostly share
    assert same >= joined, (same, joined)  # an input used twice by one concatenation counts twice in the file
    apart, _ = _quantize_all_integer(fitted_tiny, tiny_test_ds, share_concat_grids=False)
    export_qdq(apart, tmp_path / "apart.onnx")
    assert _concat_inputs_on_the_concat_grid(tmp_path / "apart.onnx")[0] == 0


def test_float_model_cannot_be_exported_as_qdq(fitted_tiny, tmp_path):
    with pytest.raises(ExportError, match="not quantized"):
        export_qdq(fitted_tiny, tmp_path / "x.onnx")


def test_consistency_check_passes_and_fails_on_a_broken_file(quantized, qdq_file, tiny_test_ds, tmp_path):
    path, _ = qdq_file
    ok = check_consistency(quantized, path, tiny_test_ds, progress=False)
    assert ok.gap_points <= 0.5 and ok.map50_simulated > 0.05
    proto = onnx.load(str(path))
    for init in proto.graph.initializer:  # flip the class predictions of every level: a wrong deployment
        if "cls_pred" in init.name and init.data_type == onnx.TensorProto.INT8:
            init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    with pytest.raises(QuantConsistencyError, match="gap of"):
        check_consistency(quantized, broken, tiny_test_ds, progress=False)


def test_integer_reference_matches_the_simulation_within_one_lsb(quantized, qdq_file, tiny_test_ds, tmp_path):
    path, _ = qdq_file
    images = np.stack([tiny_test_ds[i][0].numpy() for i in range(2)]).astype(np.float32)
    golden = GoldenModel.from_onnx(path)
    match = compare_layers(golden, path, images[:1])
    assert match.max_lsb <= 1, match.to_text(5)
    assert len(match.layers) > 100
    # the golden model's outputs agree with the PyTorch simulation
    with torch.no_grad():
        sim = quantized(torch.from_numpy(images[:1]))
    got = golden.run(images[:1])
    for name, ref in zip(sorted(got), sim, strict=True):
        step = float(ref.max() - ref.min()) / 255
        assert np.abs(got[name] - ref.numpy()).max() <= 4 * step
    pkg = load_hw_package(export_hw_package(golden, tmp_path / "hw"))
    assert pkg.verify() == 0


def test_profile_times_the_int8_file_not_the_simulation(quantized):
    from slimdet.profile import ORT, profile

    result = profile(quantized, batch_sizes=(1,), runs=2, warmup=0, progress=False)
    assert {s.runtime for s in result.latency} == {ORT} and result.onnx_size_bytes > 0


@pytest.mark.parametrize("name", ["ssdlite320_mobilenet_v3_large", "fcos_mobilenet_v3_fpn", "yolo-n"])
def test_registered_detectors_quantize_and_run_in_onnxruntime(name, tmp_path):
    from slimdet.models import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes=3, input_size=64).eval()
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0]]), "labels": torch.tensor([1])}] * 2
    cfg = QuantConfig(auto_keep=False, runtime_aware=False, bias_correction=False)
    result = quantize(model, cfg, calib=[(torch.rand(2, 3, 64, 64), targets)], progress=False)
    exported = export_qdq(model, tmp_path / f"{name}.onnx")
    assert exported.int8_weights == len(result.weight_bits) > 20
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = [r.numpy() for r in model(x)]
    got = ort.InferenceSession(exported.path, providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})
    for g, r in zip(got, ref, strict=True):
        assert np.abs(g - r).max() <= 0.05 * max(float(r.max() - r.min()), 1e-3)


def test_two_stage_detector_is_refused_clearly():
    from slimdet.errors import ConfigError
    from slimdet.models import create_model

    model = create_model("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3, input_size=64).eval()
    with pytest.raises(ConfigError, match="not traceable by torch.fx"):
        quantize(model, QuantConfig(), calib=[(torch.rand(1, 3, 64, 64), [])], progress=False)
