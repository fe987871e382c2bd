import copy
import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from slimdet.compress.lowrank import LowRank, LowRankConfig, decompose, factorize
from slimdet.compress.lowrank_factors import FACTORIZERS, Geometry
from slimdet.compress.lowrank_plan import KEPT, hull_steps
from slimdet.compress.sparsity import SparsityConfig, sparsify
from slimdet.errors import CheckpointError, ConfigError
from slimdet.io import save_checkpoint
from slimdet.models import create_model, load_model
from slimdet.models.base import Detector
from slimdet.models.registry import model_from_config
from slimdet.pipeline import run_recipe
from slimdet.profiling.macs import total_macs


def _rel(got, want):
    return float((got - want).norm() / want.norm())


def _yolo():
    torch.manual_seed(0)
    return create_model("yolo-test", num_classes=10, input_size=64).eval()


def _outputs(model, seed=1):
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        return model(x)


def _with_spectrum(shape, singular_values, seed=0):
    """A weight of ``shape`` whose ``C_out x rest`` matrix has exactly the given singular values."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape[0], int(np.prod(shape[1:]))
    u = torch.linalg.qr(torch.randn(rows, rows, generator=g))[0][:, : len(singular_values)]
    v = torch.linalg.qr(torch.randn(cols, cols, generator=g))[0][:, : len(singular_values)]
    return (u * torch.tensor(singular_values) @ v.T).reshape(shape)


class Net(Detector):
    """A small detector whose layers each test picks; ``head`` is its output layer."""

    def __init__(self, body: nn.Module, head: nn.Module, input_size: int = 16) -> None:
        super().__init__(num_classes=2, input_size=input_size)
        self.body, self.head = body, head

    def forward(self, images):
        return self.head(self.body(images))

    def output_layers(self):
        return ["head"]


# ---------------------------------------------------------------------------------- exact at full rank

FULL_RANK_CASES = {
    "svd-linear": (lambda: nn.Linear(20, 7), "svd", (7,), (3, 20)),
    "svd-1x1-stride-pad": (lambda: nn.Conv2d(12, 10, 1, stride=2, padding=1), "svd", (10,), (2, 12, 9, 9)),
    "svd-3x3": (lambda: nn.Conv2d(6, 10, 3, padding=1), "svd", (10,), (2, 6, 9, 9)),
    "tucker2-3x3-dilated": (lambda: nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2), "tucker2", (8, 12),
                            (2, 8, 13, 13)),
    "tucker2-5x3-reflect": (lambda: nn.Conv2d(6, 5, (5, 3), padding=(2, 1), padding_mode="reflect", bias=False),
                            "tucker2", (6, 5), (2, 6, 11, 11)),
    "dw-3x3-m=k^2": (lambda: nn.Conv2d(6, 16, 3, stride=2, padding=1), "dw_separable", (9,), (2, 6, 11, 11)),
    "dw-3x3-cout<k^2": (lambda: nn.Conv2d(5, 4, 3, padding=1, bias=False), "dw_separable", (9,), (2, 5, 8, 8)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(FULL_RANK_CASES), ids=list(FULL_RANK_CASES))
@pytest.mark.parametrize("hooi_iters", [0, 2], ids=["hosvd", "hooi2"])
def test_full_rank_factorisation_reproduces_the_layer(case, hooi_iters):
    make, method, ranks, x_shape = FULL_RANK_CASES[case]
    torch.manual_seed(0)
    layer = make()
    chain = factorize(layer, method, ranks, hooi_iters=hooi_iters)
    x = torch.randn(*x_shape)
    with torch.no_grad():
        assert _rel(chain(x), layer(x)) <= 1e-5
    assert _rel(chain.dense_weight(), layer.weight.detach()) <= 1e-5
    assert isinstance(chain, LowRank) and chain.method == method and chain.ranks == ranks
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in chain)  # plain layers, ready for prune/quantize
    if isinstance(layer, nn.Conv2d):
        assert (chain.in_channels, chain.out_channels) == (layer.in_channels, layer.out_channels)


def test_truncated_svd_error_is_the_discarded_energy():
    s = [8.0, 4.0, 2.0, 1.0, 0.5]
    layer = nn.Conv2d(4, 6, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(_with_spectrum((6, 4, 3, 3), s))
    for r in range(1, 6):
        want = (sum(v**2 for v in s[r:]) / sum(v**2 for v in s)) ** 0.5  # Eckart-Young
        got = _rel(factorize(layer, "svd", (r,)).dense_weight(), layer.weight.detach())
        assert got == pytest.approx(want, abs=1e-6)
        table = FACTORIZERS.get("svd")(layer)
        assert table.err2(np.array([[r]]))[0] == pytest.approx(want**2, rel=1e-5)  # float32 weight
    table = FACTORIZERS.get("svd")(layer)
    assert table.energy_ranks(0.99, 1) == (4,)  # (64 + 16 + 4) / 85.25 = 0.985 < 0.99 <= 85 / 85.25
    assert table.energy_ranks(0.98, 1) == (3,)
    assert table.energy_ranks(0.98, 2) == (4,)  # rounded up to a multiple of 2
    assert table.energy_ranks(0.5, 4) == (4,) and table.energy_ranks(1.0, 4) == (6,)  # capped at the full rank


def test_tucker2_table_matches_the_hosvd_and_hooi_only_lowers_the_error():
    torch.manual_seed(0)
    layer = nn.Conv2d(10, 12, 3)
    table = FACTORIZERS.get("tucker2")(layer)
    w = layer.weight.detach()
    for ranks in [(3, 4), (5, 2), (10, 6)]:
        hosvd = _rel(factorize(layer, "tucker2", ranks, hooi_iters=0).dense_weight(), w)
        assert table.err2(np.array([ranks]))[0] == pytest.approx(hosvd**2, rel=1e-4)
        hooi = _rel(factorize(layer, "tucker2", ranks, hooi_iters=5).dense_weight(), w)
        assert hooi <= hosvd + 1e-7


def test_dw_separable_keeps_the_leading_terms_of_every_input_channel():
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 8, 3)
    table = FACTORIZERS.get("dw_separable")(layer)
    errors = [_rel(factorize(layer, "dw_separable", (m,)).dense_weight(), layer.weight.detach()) for m in range(1, 10)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-6
    assert [e**2 for e in errors] == pytest.approx(table.err2(np.arange(1, 10)[:, None]).tolist(), abs=1e-6)
    chain = factorize(layer, "dw_separable", (2,))
    assert chain[0].groups == 4 and chain[0].out_channels == 8 and chain[1].kernel_size == (1, 1)


# ---------------------------------------------------------------------------------- decompose


def test_macs_budget_is_met_and_measured_on_the_rebuilt_model():
    model = _yolo()
    before = total_macs(model, model.example_inputs(1))
    result = decompose(model, LowRankConfig(macs_reduction=0.3))
    after = total_macs(model, model.example_inputs(1))
    assert (result.macs_before, result.macs_after) == (before, after)
    assert result.macs_reduction >= 0.3 and after <= 0.7 * before
    assert result.macs_reduction < 0.36  # the last layer touched takes the least error that still meets it
    modules = dict(model.named_modules())
    for layer in result.layers:
        assert layer.macs_after < layer.macs_before
        assert isinstance(modules[layer.name], LowRank) and modules[layer.name].ranks == layer.ranks
        assert 0 < layer.weight_error < 1
    assert sum(la.macs_before - la.macs_after for la in result.layers) == before - after
    # output layers stay as they are; the layers left out say why
    for name in model.output_layers():
        assert type(modules[name]) is nn.Conv2d and "output layer" in result.skipped[name]
    assert KEPT in result.skipped.values()
    assert model.model_config["transforms"][-1]["kind"] == "lowrank"


def test_budget_goes_to_the_layer_that_is_cheap_to_cut():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1))  # fmt: skip
    model = Net(body, nn.Conv2d(16, 2, 1))
    with torch.no_grad():  # body.2 is nearly rank 2 in both modes; body.4 is full rank
        u = torch.linalg.qr(torch.randn(16, 16))[0][:, :2]
        low_rank = torch.einsum("oa,abhw,ib->oihw", u, torch.randn(2, 2, 3, 3), u)
        body[2].weight.copy_(low_rank + 1e-4 * torch.randn(16, 16, 3, 3))
    result = decompose(model, LowRankConfig(macs_reduction=0.2))
    assert [la.name for la in result.layers] == ["body.2"]
    assert result.layers[0].weight_error < 1e-3  # the budget is met at ranks far above 2 with no loss
    assert result.skipped["body.4"] == KEPT


def test_energy_picks_per_layer_ranks_and_skips_layers_whose_macs_would_not_drop():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 32, 1), nn.Conv2d(32, 32, 1))
    model = Net(body, nn.Linear(16, 2))
    with torch.no_grad():
        body[2].weight.copy_(_with_spectrum((32, 32, 1, 1), [10.0, 5.0, 1.0, 0.1]))
    result = decompose(model, LowRankConfig(energy=0.99))
    layers = {la.name: la for la in result.layers}
    assert layers["body.2"].method == "svd" and layers["body.2"].ranks == (2,)  # (100 + 25) / 126.01 >= 0.99
    assert "not fewer MACs" in result.skipped["body.0"]  # 3 input channels: nothing to gain
    assert "output layer" in result.skipped["head"]


def test_overrides_fix_method_and_ranks_and_ignore_leaves_layers_alone():
    model = _yolo()
    cfg = LowRankConfig(
        macs_reduction=0.2, ignore=("neck",),
        overrides={r"backbone\.stage4\.0\.0": {"method": "dw_separable", "ranks": [2]},
                   "heads.0.box.0.0": {"ranks": [4, 4]}, "heads.1.box.0.0": {"method": "svd", "energy": 0.5}},
    )  # fmt: skip
    result = decompose(model, cfg)
    layers = {la.name: la for la in result.layers}
    assert (layers["backbone.stage4.0.0"].method, layers["backbone.stage4.0.0"].ranks) == ("dw_separable", (2,))
    assert (layers["heads.0.box.0.0"].method, layers["heads.0.box.0.0"].ranks) == ("tucker2", (4, 4))
    assert layers["heads.1.box.0.0"].method == "svd"
    assert not any(name.startswith("neck.") for name in layers)
    neck = [n for n, m in model.named_modules() if n.startswith("neck.") and type(m) is nn.Conv2d]
    assert neck and all(result.skipped[n] == "ignored" for n in neck)
    assert result.macs_reduction >= 0.2


def test_calibration_measures_layer_and_model_output_errors():
    torch.manual_seed(0)
    model = Net(nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU()), nn.Conv2d(16, 2, 1))
    layer, x = copy.deepcopy(model.body[0]), torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        reference = model(x)
    # 1x1 conv 3 -> 16 at rank 2: 2 (3 + 16) = 38 < 48 MACs per pixel
    result = decompose(model, LowRankConfig(energy=0.5, overrides={"body.0": {"ranks": [2]}}),
                       calib=[(x[:2], None), x[2:]])  # fmt: skip
    (la,) = result.layers
    with torch.no_grad():
        assert la.output_error == pytest.approx(_rel(model.body[0](x), layer(x)), rel=1e-4)
        assert result.output_error == pytest.approx(_rel(model(x), reference), rel=1e-4)
    assert 0 < la.output_error < 1 and la.weight_error == pytest.approx(
        _rel(model.body[0].dense_weight(), layer.weight.detach()), rel=1e-5)  # fmt: skip
    assert (la.macs_before, la.macs_after) == (16 * 16 * 48, 16 * 16 * 38)
    assert decompose(_yolo(), LowRankConfig(energy=0.9)).layers[0].output_error is None  # no calib, no output error


def test_checkpoint_round_trip_rebuilds_the_factorised_model(tmp_path):
    model = _yolo()
    overrides = {"backbone.stage3.0.0": {"method": "dw_separable", "ranks": [3]}}
    decompose(model, LowRankConfig(macs_reduction=0.3, overrides=overrides))
    model = copy.deepcopy(model)  # the chains survive deepcopy (the EMA of training needs it)
    path = save_checkpoint(tmp_path / "lr.pt", model_config=model.model_config, state_dict=model.state_dict())
    loaded, _ = load_model(path)
    for a, b in zip(_outputs(loaded), _outputs(model), strict=True):
        assert torch.equal(a, b)
    chains = {n: (m.method, m.ranks) for n, m in loaded.named_modules() if isinstance(m, LowRank)}
    assert chains == {n: (m.method, m.ranks) for n, m in model.named_modules() if isinstance(m, LowRank)}
    assert any(method == "dw_separable" for method, _ in chains.values())
    json.dumps(loaded.model_config)  # the record is plain data


def test_factorised_model_trains_and_a_second_decompose_leaves_chains_alone():
    model = _yolo().train()
    decompose(model, LowRankConfig(macs_reduction=0.2))
    loss = sum(t.square().mean() for t in model(torch.rand(2, 3, 64, 64)))
    loss.backward()
    chains = [m for m in model.modules() if isinstance(m, LowRank)]
    assert chains and all(layer.weight.grad is not None for c in chains for layer in c)
    inside = {f"{n}.{i}" for n, m in model.named_modules() if isinstance(m, LowRank) for i in range(len(m))}
    again = decompose(model, LowRankConfig(macs_reduction=0.1))
    assert all(again.skipped[n] == "part of a factorised chain" for n in inside)
    assert [e["kind"] for e in model.model_config["transforms"]] == ["lowrank", "lowrank"]
    rebuilt = model_from_config(model.model_config)
    rebuilt.load_state_dict(model.state_dict())  # both records replay in order, strictly matching


class SubclassedConv(nn.Conv2d):
    """Stands for layers other transforms own (a quantized conv subclasses Conv2d)."""


def test_a_model_without_factorisable_layers_is_left_unchanged():
    body = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.ReLU(), SubclassedConv(3, 8, 3, padding=1))
    model = Net(body, nn.Conv2d(8, 2, 1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="no layer left to factorise") as info:
        decompose(model, LowRankConfig(energy=0.5))
    assert "grouped conv (groups=3)" in str(info.value)
    assert "SubclassedConv: only plain Conv2d and Linear layers" in str(info.value)
    assert model.model_config == {} and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, LowRank) for m in model.modules())


def test_masked_layers_are_skipped_and_output_layers_can_be_included():
    model = _yolo()
    sparsify(model, SparsityConfig(sparsity=0.5, ignore=("neck", "heads")))
    result = decompose(model, LowRankConfig(energy=0.9, include_output_layers=True))
    assert all(s.startswith("sparsity mask") for n, s in result.skipped.items() if n.startswith("backbone."))
    assert {la.name.split(".")[0] for la in result.layers} == {"neck", "heads"}
    assert any(la.name.endswith("_pred") for la in result.layers)  # include_output_layers


# ---------------------------------------------------------------------------------- errors and config


def test_config_requires_exactly_one_target_and_valid_patterns():
    with pytest.raises(ValidationError, match="exactly one of energy"):
        LowRankConfig()
    with pytest.raises(ValidationError, match="exactly one of energy"):
        LowRankConfig(energy=0.9, macs_reduction=0.3)
    with pytest.raises(ValidationError, match="valid regular expression"):
        LowRankConfig(energy=0.9, ignore=("backbone[",))
    with pytest.raises(ValidationError, match="energy or ranks, not both"):
        LowRankConfig(energy=0.9, overrides={"x": {"energy": 0.5, "ranks": [2]}})
    with pytest.raises(ValidationError):
        LowRankConfig(method="cp", energy=0.9)
    cfg = LowRankConfig(macs_reduction=0.3, overrides={"heads": {"method": "svd"}})
    assert LowRankConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_pattern_rank_and_budget_errors_name_what_is_wrong():
    with pytest.raises(ConfigError, match=r"ignore pattern 'neck\.td5' matches no .*did you mean"):
        decompose(_yolo(), LowRankConfig(energy=0.9, ignore=("neck.td5",)))
    with pytest.raises(ConfigError, match=r"override for layer 'heads.0.box.0.0': method tucker2 .* takes 2 rank"):
        decompose(_yolo(), LowRankConfig(energy=0.9, overrides={"heads.0.box.0.0": {"ranks": [4]}}))
    with pytest.raises(ConfigError, match="cannot be met: .* removes at most"):
        decompose(_yolo(), LowRankConfig(macs_reduction=0.99))
    with pytest.raises(ConfigError, match="tucker2 decomposes kxk convs"):
        factorize(nn.Linear(4, 4), "tucker2", (2, 2))
    with pytest.raises(ConfigError, match="unknown low-rank method 'cp'"):
        factorize(nn.Linear(4, 4), "cp", (2,))
    with pytest.raises(ConfigError, match=r"takes 1 rank\(s\), each from 1 up to \[4\], got \[5\]"):
        factorize(nn.Linear(4, 6), "svd", (5,))


def test_replay_of_a_record_for_another_model_fails_loudly():
    model = _yolo()
    decompose(model, LowRankConfig(energy=0.9))
    config = copy.deepcopy(model.model_config)
    config["transforms"][-1]["layers"]["heads.0.missing"] = {"method": "svd", "ranks": [2]}
    with pytest.raises(CheckpointError, match="'heads.0.missing'"):
        model_from_config(config)


def test_hull_steps_follow_the_lower_convex_hull():
    saved = np.array([1.0, 2.0, 3.0, 4.0, 2.5, 1.5])
    err = np.array([0.05, 0.15, 0.5, 0.6, 0.4, 0.3])  # (3, .5) and (2.5, .4) lie above the hull, (1.5, .3) is dominated
    steps = hull_steps(saved, err)
    assert [i for i, _ in steps] == [0, 1, 3]
    assert [s for _, s in steps] == pytest.approx([0.05, 0.1, 0.225])


def test_geometry_prices_strided_tucker2_on_the_input_pixels():
    layer = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    table = FACTORIZERS.get("tucker2")(layer)
    geo = Geometry(in_pixels=16 * 16, out_pixels=8 * 8)
    chain = factorize(layer, "tucker2", (4, 6))
    want = total_macs(chain, torch.rand(1, 8, 16, 16))
    assert int(table.macs(np.array([[4, 6]]), geo)[0]) == want


# ---------------------------------------------------------------------------------- recipe step


def test_lowrank_step_then_finetune_and_checkpoints_round_trip(tiny_digits, tmp_path):
    finetune = {"epochs": 1, "batch_size": 4, "max_steps_per_epoch": 2, "val_split": None, "threads": 1}
    steps = [{"lowrank": {"macs_reduction": 0.25, "calib_images": 4}}, {"finetune": finetune}]
    recipe = {"model": "yolo-test", "dataset": str(tiny_digits), "input_size": 64, "steps": steps}
    result = run_recipe(recipe, out_dir=tmp_path / "run", progress=False)
    rec = json.loads((tmp_path / "run" / "steps" / "00_lowrank" / "record.json").read_text())
    assert rec["metrics"]["macs_reduction"] >= 0.25 and rec["metrics"]["output_error"] is not None
    assert rec["record"]["layers"] and all(la["output_error"] is not None for la in rec["record"]["layers"])
    assert "| layer | method |" in (tmp_path / "run" / "steps" / "00_lowrank" / "lowrank.md").read_text()
    model, _ = load_model(tmp_path / "run" / "steps" / "01_finetune" / "model.pt")
    for a, b in zip(_outputs(model), _outputs(result.model), strict=True):
        assert torch.equal(a, b)
    assert sum(isinstance(m, LowRank) for m in model.modules()) == len(rec["record"]["layers"])
