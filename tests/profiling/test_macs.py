import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from slimdet.profiling.macs import layer_table


def _only(model: nn.Module, x: torch.Tensor):
    rows = layer_table(model, x)
    assert len(rows) == 1
    return rows[0]


def test_conv_macs_exact():
    row = _only(nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.rand(1, 3, 160, 160))
    assert row.macs == 80 * 80 * 16 * 3 * 9
    assert row.output_shape == (1, 16, 80, 80)
    assert row.params == 16 * 3 * 9 + 16


def test_depthwise_conv_macs_exact():
    row = _only(nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.rand(1, 16, 40, 40))
    assert row.macs == 40 * 40 * 16 * 1 * 9


def test_grouped_dilated_conv_macs_exact():
    row = _only(nn.Conv2d(16, 32, 3, padding=2, dilation=2, groups=4, bias=False), torch.rand(1, 16, 20, 20))
    assert row.output_shape == (1, 32, 20, 20)
    assert row.macs == 20 * 20 * 32 * (16 // 4) * 9


def test_linear_macs_exact_with_leading_dims():
    row = _only(nn.Linear(64, 10), torch.rand(2, 5, 64))
    assert row.macs == 2 * 5 * 64 * 10


def test_conv_transpose_macs_exact():
    # stride = kernel = 2: every output element receives exactly in_ch = 8 products.
    row = _only(nn.ConvTranspose2d(8, 4, 2, stride=2), torch.rand(1, 8, 10, 10))
    assert row.output_shape == (1, 4, 20, 20)
    assert row.macs == 8 * 10 * 10 * 4 * 2 * 2 == 20 * 20 * 4 * 8


def test_norms_and_activations_are_listed_with_zero_macs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU())
    rows = layer_table(model, torch.rand(1, 3, 16, 16))
    assert [r.type for r in rows] == ["Conv2d", "BatchNorm2d", "SiLU"]
    assert [r.name for r in rows] == ["0", "1", "2"]
    assert rows[1].macs == rows[2].macs == 0
    assert rows[1].output_elements == rows[2].output_elements == 8 * 16 * 16
    assert rows[1].params == 16 and all(r.counted for r in rows)


def test_params_sum_and_reused_module_counted_per_call():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            x = self.conv(self.conv(x))
            return self.head(x.mean((2, 3)))

    model = Twice()
    rows = layer_table(model, torch.rand(1, 4, 8, 8))
    assert [r.name for r in rows] == ["conv", "conv#2", "head"]
    assert sum(r.params for r in rows) == sum(p.numel() for p in model.parameters())
    assert rows[0].macs == rows[1].macs == 8 * 8 * 4 * 4 * 9


def test_leaf_with_weights_but_no_formula_is_flagged_uncounted():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3, 1, 1))

        def forward(self, x):
            return x * self.w

    rows = layer_table(nn.Sequential(Scale()), torch.rand(1, 3, 4, 4))
    assert rows[0].counted is False and rows[0].macs == 0 and rows[0].params == 3


@pytest.mark.parametrize("batch", [1, 3])
def test_total_agrees_with_torch_flop_counter(batch):
    # Independent check: torch.utils.flop_counter counts 2 FLOPs per MAC for convs and matmuls.
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.Conv2d(8, 16, 1), nn.ConvTranspose2d(16, 8, 2, stride=2), nn.Flatten(), nn.Linear(8 * 32 * 32, 5),
    ).eval()
    x = torch.rand(batch, 3, 32, 32)
    macs = sum(r.macs for r in layer_table(model, x))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert 2 * macs == counter.get_total_flops()


def test_yolo_test_total_agrees_with_torch_flop_counter():
    from slimdet.models import create_model

    model = create_model("yolo-test", num_classes=3).eval()
    x = model.example_inputs(1)
    rows = layer_table(model, x)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert all(r.counted for r in rows)
    assert 2 * sum(r.macs for r in rows) == counter.get_total_flops() > 0


def test_total_macs_counts_in_eval_mode_without_moving_batch_norm_statistics():
    from slimdet.profiling.macs import total_macs

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.BatchNorm2d(16)).train()
    before = model[1].running_mean.clone()
    assert total_macs(model, torch.rand(1, 3, 160, 160)) == 80 * 80 * 16 * 3 * 9
    assert torch.equal(model[1].running_mean, before) and model[1].num_batches_tracked.item() == 0
    assert model.training
