"""The layer table: GEMM shapes, bits and sparsity, and the non-GEMM ops, of any registered model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimdet.hw.layers import FLOAT_BITS, GemmLayer, LayerTable, layer_table
from slimdet.models import create_model, list_models
from slimdet.profiling.macs import total_macs


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.act = nn.SiLU()
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.dw(self.conv(x)))
        y = torch.cat([y, y], 1)[:, :8].mean((2, 3))
        return self.fc(y) @ torch.ones(5, 4)


def test_gemm_shapes_by_hand():
    table = layer_table(_Tiny(), torch.rand(2, 3, 16, 16))
    conv, dw, fc, mm = table.gemm
    # conv: 8 x 8 outputs per image, batch 2 -> m = 128; k = 3 x 3 x 3; n = 8
    assert (conv.op, conv.m, conv.k, conv.n, conv.groups) == ("conv", 128, 27, 8, 1)
    geometry = (conv.in_chw, conv.kernel, conv.stride, conv.padding, conv.out_hw)
    assert geometry == ((3, 16, 16), (3, 3), (2, 2), (1, 1), (8, 8))
    assert conv.macs == 128 * 27 * 8 and conv.input_elements == 2 * 3 * 16 * 16
    # depthwise: 8 independent GEMMs of (128 x 9) @ (9 x 1)
    assert (dw.op, dw.m, dw.k, dw.n, dw.groups) == ("dwconv", 128, 9, 1, 8)
    assert dw.macs == 128 * 9 * 8 and dw.weight_elements == 72 and dw.out_channels == 8
    assert (fc.op, fc.m, fc.k, fc.n) == ("linear", 2, 8, 5)
    # an activation-by-activation matmul outside any layer
    assert (mm.op, mm.m, mm.k, mm.n) == ("matmul", 2, 5, 4)
    assert all(g.weight_bits == FLOAT_BITS and g.act_bits == FLOAT_BITS for g in table.gemm)
    kinds = {(e.op, e.elements) for e in table.ops}
    assert ("activation", 2 * 8 * 8 * 8) in kinds  # SiLU on the depthwise output
    assert ("concat", 2 * 16 * 8 * 8) in kinds
    assert not any(e.op == "copy" and "slice" in e.name for e in table.ops)  # views cost nothing


def test_arrays_match_the_rows():
    table = layer_table(_Tiny(), torch.rand(1, 3, 16, 16))
    arr = table.arrays
    assert arr["macs"].tolist() == [g.macs for g in table.gemm]
    assert arr["m"].dtype.kind == "i" and arr["weight_sparsity"].dtype.kind == "f"
    assert LayerTable(gemm=()).arrays["m"].shape == (0,)
    lower = table.with_bits(weight_bits={"conv": 4}, act_bits=8)
    assert [g.weight_bits for g in lower.gemm][:2] == [4, FLOAT_BITS] and {g.act_bits for g in lower.gemm} == {8}
    assert table.gemm[0].weight_bits == FLOAT_BITS  # the original is unchanged


@pytest.mark.parametrize("name", ["yolo-test", "yolo-n"])
def test_detector_table_counts_every_mac_and_the_postprocessing(name):
    model = create_model(name, num_classes=10, input_size=64)
    table = layer_table(model)
    assert table.macs == total_macs(model, model.example_inputs())
    ops = {e.op for e in table.ops}
    assert {"activation", "concat", "resize", "decode", "nms"} <= ops
    assert all(e.elements > 0 for e in table.ops)
    assert model.training  # the training flag is restored


@pytest.mark.parametrize("name", [n for n in list_models() if not n.startswith(("yolo", "fasterrcnn"))])
def test_torchvision_detectors_have_a_table(name):
    model = create_model(name, num_classes=3, input_size=96)
    table = layer_table(model)
    assert table.macs == pytest.approx(total_macs(model, model.example_inputs()), rel=1e-6)
    assert any(g.op == "dwconv" for g in table.gemm) == ("mobilenet" in name)


def test_pruned_sparse_and_quantized_models_are_read_as_they_are(fitted_tiny, tiny_test_ds):
    from slimdet.compress import prune
    from slimdet.compress.prune import PruneConfig
    from slimdet.compress.quant import QuantConfig, quantize
    from slimdet.data.dataset import collate

    dense = layer_table(fitted_tiny)
    pruned = copy.deepcopy(fitted_tiny)
    prune(pruned, PruneConfig(ratio=0.5), progress=False)
    smaller = layer_table(pruned)
    assert smaller.macs < dense.macs and sum(g.n for g in smaller.gemm) < sum(g.n for g in dense.gemm)

    sparse = copy.deepcopy(fitted_tiny)
    first = next(m for m in sparse.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        first.weight.view(-1)[::4] = 0  # a quarter of the weights
    assert layer_table(sparse).gemm[0].weight_sparsity == pytest.approx(0.25, abs=0.01)

    quant = copy.deepcopy(fitted_tiny)
    images, targets = collate([tiny_test_ds[i] for i in range(4)])
    cfg = QuantConfig(weight_bits=4, overrides={r"heads\.0\.cls_pred": {"weight_bits": 8}}, auto_keep=False,
                      runtime_aware=False, adaround=False, keep_float=[r"backbone\.stem\.0"])  # fmt: skip
    quantize(quant, cfg, calib=[(images, targets)], progress=False)
    table = layer_table(quant)
    bits = {g.name: (g.weight_bits, g.act_bits) for g in table.gemm}
    assert bits["heads.0.cls_pred"][0] == 8 and bits["backbone.stem.0"][0] == FLOAT_BITS
    assert sum(w == 4 for w, _ in bits.values()) >= len(bits) - 3
    assert any(a == 8 for _, a in bits.values())
    assert {e.bits for e in table.ops if e.op == "activation"} == {8}
    assert table.macs == dense.macs  # quantization keeps the shapes


def test_rows_are_json_ready():
    import json

    table = layer_table(_Tiny(), torch.rand(1, 3, 16, 16))
    rows = table.rows()
    assert len(rows) == len(table.gemm) + len(table.ops)
    json.dumps(rows)
    assert isinstance(table.gemm[0], GemmLayer)
