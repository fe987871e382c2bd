"""Graph passes: each pass on a model built to hold its pattern (and one without it), every registered
model, and the installed graph through deepcopy, load_model, ONNX export, pruning and quantization."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from slimdet.compress.graph import GraphCheckError, GraphConfig, installed_graph, optimize_graph, rel_error
from slimdet.compress.graph_fuse import ConvAct2d
from slimdet.compress.graph_passes import GRAPH_PASSES
from slimdet.compress.graph_trace import Folded, ZeroBranch
from slimdet.errors import CheckpointError, ConfigError
from slimdet.io import save_checkpoint
from slimdet.models import create_model, list_models, load_model


def _x(batch: int = 2, size: int = 16, channels: int = 3) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(1))


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm statistics far from the identity, so that folding them changes the weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.3)
    return model.eval()


def _optimize(model: nn.Module, passes: list[str], x: torch.Tensor):
    model = _randomize_bn(model)
    with torch.no_grad():
        ref = model(x)
    result = optimize_graph(model, GraphConfig(passes=passes), example=x)
    with torch.no_grad():
        out = model(x)
    assert rel_error(out, ref) <= 1e-5
    return result


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _calls(model: nn.Module) -> list[str]:
    """The computing nodes of the installed graph: module paths, function and method names."""
    nodes = [n for n in installed_graph(model).graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    return [n.target if isinstance(n.target, str) else n.target.__name__ for n in nodes]


def _unchanged(result) -> None:
    (report,) = result.passes
    assert report.changes == ()
    assert (report.nodes_before, report.params_before) == (report.nodes_after, report.params_after)


# ----------------------------------------------------------------------------------------------
# one pass, one pattern


class ConvBNAct(nn.Module):
    def __init__(self, bn: bool = True, act: bool = True, c_in: int = 3, c_out: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out) if bn else nn.Identity()
        self.act = nn.SiLU(inplace=True) if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


def test_fold_bn_folds_the_batchnorm_into_the_conv():
    model = ConvBNAct()
    result = _optimize(model, ["fold_bn"], _x())
    (report,) = result.passes
    assert report.changes == ("bn -> conv",)
    assert (report.nodes_before, report.nodes_after) == (3, 2)
    assert (report.params_before, report.params_after) == (8 * 27 + 16, 8 * 27 + 8)  # BN's 2C out, a C bias in
    assert isinstance(model.bn, Folded) and model.conv.bias is not None
    assert 0 < result.max_rel_error <= 1e-5


def test_fold_bn_folds_linear_batchnorm1d_on_2d_inputs():
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU())
    x = torch.rand(4, 6, generator=torch.Generator().manual_seed(0))
    result = _optimize(model, ["fold_bn"], x)
    assert result.passes[0].changes == ("1 -> 0",) and isinstance(model[1], Folded)


def test_fold_bn_leaves_models_without_the_pattern_alone():
    class Shared(nn.Module):  # the conv's output is read twice: folding would change the other reader
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    for model in (ConvBNAct(bn=False), Shared()):
        result = _optimize(model, ["fold_bn"], _x())
        _unchanged(result)
        assert not any(isinstance(m, Folded) for m in model.modules())


def test_fuse_conv_act_makes_one_call_of_conv_bn_activation():
    model = ConvBNAct()
    result = _optimize(model, ["fuse_conv_act"], _x())
    (report,) = result.passes
    assert (report.nodes_before, report.nodes_after) == (3, 1)
    assert isinstance(model.conv, ConvAct2d) and isinstance(model.conv.act, nn.SiLU)
    assert isinstance(model.bn, Folded) and isinstance(model.act, Folded)
    assert "conv.act" not in dict(model.named_modules()) and set(model.state_dict()) == {"conv.weight", "conv.bias"}


def test_fuse_conv_act_leaves_a_conv_without_activation_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2))
    _unchanged(_optimize(model, ["fuse_conv_act"], _x()))
    assert type(model[0]) is nn.Conv2d


def test_fuse_conv_act_fuses_a_shared_relu_and_keeps_it_for_the_other_calls():
    class Block(nn.Module):  # one ReLU module called three times, as in torchvision's ResNet
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.relu(self.relu(self.conv2(self.relu(self.conv1(x)))) + x)

    model = Block()
    result = _optimize(model, ["fuse_conv_act"], _x())
    assert isinstance(model.conv1, ConvAct2d) and isinstance(model.conv2, ConvAct2d)
    assert isinstance(model.relu, nn.ReLU)  # still called after the residual add
    assert result.passes[0].nodes_after == result.passes[0].nodes_before - 2
    with torch.no_grad():  # the model's own forward, which still calls the ReLU after each conv, agrees
        assert torch.equal(type(model).forward(model, _x()), model(_x()))


class Dead(nn.Module):
    def __init__(self, dead: bool) -> None:
        super().__init__()
        self.dead = dead
        self.conv = nn.Conv2d(3, 4, 1)
        self.unused = nn.Conv2d(3, 5, 1)

    def forward(self, x):
        y = self.conv(x)
        z = self.unused(x) * 2  # never reaches the output when dead
        return y if self.dead else torch.cat([y, z], 1)


def test_dead_code_removes_nodes_that_never_reach_an_output_and_their_modules():
    model = Dead(dead=True)
    result = _optimize(model, ["dead_code"], _x())
    (report,) = result.passes
    assert (report.nodes_before, report.nodes_after) == (3, 1)
    assert report.params_before - report.params_after == 3 * 5 + 5
    assert isinstance(model.unused, Folded) and "unused.weight" not in model.state_dict()


def test_dead_code_leaves_live_nodes_and_in_place_writes_alone():
    class InPlace(nn.Module):  # the add_ has no user, but it writes into the tensor returned
        def forward(self, x):
            y = x * 2
            y.add_(1)
            return y

    live = Dead(dead=False)
    report = _optimize(live, ["dead_code"], _x()).passes[0]
    assert report.changes == () and (report.nodes_before, report.nodes_after) == (4, 4)
    assert _calls(live) == ["conv", "unused", "mul", "cat"] and isinstance(live.unused, nn.Conv2d)
    in_place = InPlace()
    report = _optimize(in_place, ["dead_code"], _x()).passes[0]
    assert report.changes == () and (report.nodes_before, report.nodes_after) == (2, 2)
    assert _calls(in_place) == ["mul", "add_"]  # the add_ has no user but is kept


class Identities(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.id, self.drop = nn.Identity(), nn.Dropout(0.5)

    def forward(self, x):
        y = self.drop(self.id(self.conv(x)))
        y = F.dropout(y, 0.1, training=self.training)
        n, c, h, w = y.shape
        y = y.view(n, c, h, w).reshape(y.shape).permute(0, 1, 2, 3).contiguous().transpose(1, 1)
        y = y.expand(n, c, h, w) + 1
        flat = y.flatten(1)
        return flat.flatten(1).view(n, 2, -1)  # the first flatten and the view are real, the second flatten not


def test_identity_removes_identities_dropout_and_no_op_reshapes():
    model = Identities()
    result = _optimize(model, ["identity"], _x())
    changes = " ".join(result.passes[0].changes)
    for what in ("call of id", "call of drop", "dropout", "view to the same shape", "reshape to the same shape",
                 "identity permutation", "contiguous", "transpose of a dimension with itself",
                 "expand to the same shape", "flatten to the same shape"):  # fmt: skip
        assert what in changes, what
    assert len(result.passes[0].changes) == 10
    ops = [n.target for n in installed_graph(model).graph.nodes if n.op == "call_method"]
    assert ops.count("flatten") == 1 and ops.count("view") == 1  # the reshapes that do something stay


def test_identity_keeps_reshapes_that_are_no_ops_only_at_one_batch_size():
    class BatchOne(nn.Module):
        def forward(self, x):
            return x.reshape(1, -1, x.shape[2], x.shape[3]) * 2  # the identity at batch 1 only

    model = BatchOne()
    _unchanged(_optimize(model, ["identity"], _x(batch=1)))
    with torch.no_grad():
        assert model(_x(batch=3)).shape == (1, 9, 16, 16)


class Constants(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.linspace(-1, 1, 3).view(1, 3, 1, 1))
        self.offset = nn.Parameter(torch.arange(3.0))  # (torch.fx computes what a buffer gives at trace time)

    def forward(self, x):
        return x * self.log_scale.exp() + (self.offset.sum() * 2 + 1)


def test_const_fold_computes_what_depends_only_on_weights_once():
    model = Constants()
    result = _optimize(model, ["const_fold"], _x())
    (report,) = result.passes
    assert len(report.changes) == 2 and report.nodes_after == report.nodes_before - 4  # 2 gets + 4 ops -> 2 gets
    consts = {n: b for n, b in model.named_buffers() if n.startswith("_graph_const_")}
    assert sorted(float(b.sum()) for b in consts.values()) == pytest.approx(sorted([7.0, float(torch.linspace(
        -1, 1, 3).exp().sum())]))  # fmt: skip


def test_const_fold_leaves_input_dependent_nodes_alone():
    model = ConvBNAct(bn=False)
    weight = model.conv.weight.detach().clone()
    report = _optimize(model, ["const_fold"], _x()).passes[0]
    assert report.changes == () and (report.nodes_before, report.nodes_after) == (3, 3)
    assert _calls(model) == ["conv", "bn", "act"] and torch.equal(model.conv.weight, weight)
    assert not [n for n, _ in model.named_buffers() if n.startswith("_graph_const_")]


def test_cse_merges_duplicated_computations():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x).sigmoid() + self.conv(x).sigmoid() + torch.tanh(x).sum() + torch.tanh(x).sum()

    model = Twice()
    result = _optimize(model, ["cse"], _x())
    assert result.passes[0].nodes_before - result.passes[0].nodes_after == 4
    assert sum(n.op == "call_module" for n in installed_graph(model).graph.nodes) == 1


def test_cse_does_not_merge_tensors_written_in_place():
    class Written(nn.Module):
        def forward(self, x):
            a, b = x * 2, x * 2
            a.add_(1)  # a and b hold different values from here on
            return a + b

    model = Written()
    _unchanged(_optimize(model, ["cse"], _x()))
    with torch.no_grad():
        assert torch.allclose(model(_x()), _x() * 4 + 1)


class RepBlock(nn.Module):
    """RepVGG training-time block: 3x3 conv-BN + 1x1 conv-BN (+ identity BN when shapes allow), summed."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, groups: int = 1, identity: bool = True) -> None:
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, groups=groups, bias=False),
                                   nn.BatchNorm2d(c_out))  # fmt: skip
        self.one = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, 0, groups=groups, bias=False),
                                 nn.BatchNorm2d(c_out))  # fmt: skip
        self.id = nn.BatchNorm2d(c_in) if identity else None
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.dense(x) + self.one(x)
        return self.act(y + self.id(x) if self.id is not None else y)


CASES = {"3x3+1x1+id": (4, 4, 1, 1, True), "stride2-3x3+1x1": (4, 6, 2, 1, False), "groups2": (4, 4, 1, 2, True)}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_rep_branches_merges_parallel_branches_into_one_conv(case):
    model = RepBlock(*CASES[case])
    result = _optimize(model, ["rep_branches"], _x(channels=4))
    (report,) = result.passes
    merged = model.dense[0]
    assert len(report.changes) == 1 and merged.bias is not None and merged.kernel_size == (3, 3)
    assert isinstance(model.dense[1], Folded) and all(isinstance(m, ZeroBranch) for m in model.one)
    assert (model.id is None) or isinstance(model.id, ZeroBranch)
    assert report.params_after == merged.weight.numel() + merged.bias.numel()
    calls = [n for n in installed_graph(model).graph.nodes if n.op in ("call_module", "call_function")]
    assert [n.target for n in calls] == ["dense.0", "act"]
    with torch.no_grad():  # the model's own forward (zero branches) agrees with the merged graph
        assert rel_error(type(model).forward(model, _x(channels=4)), model(_x(channels=4))) < 1e-6


def test_rep_branches_leaves_a_bare_residual_and_mismatched_strides_alone():
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x) + x  # the model's forward would still add x: not merged

    class Strides(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 1, 1)

        def forward(self, x):
            return self.a(x) + self.b(x)[:, :, ::2, ::2]

    for model, calls in ((Residual(), ["conv", "add"]), (Strides(), ["a", "b", "getitem", "add"])):
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        report = _optimize(model, ["rep_branches"], _x(channels=4)).passes[0]
        assert report.changes == () and report.nodes_before == report.nodes_after == len(calls)
        assert _calls(model) == calls  # the add is still there, no conv was replaced
        assert model.state_dict().keys() == weights.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


# ----------------------------------------------------------------------------------------------
# every registered model; config and checks


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_keeps_its_outputs(name):
    model = _randomize_bn(create_model(name, num_classes=3, input_size=64))
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
    result = optimize_graph(model, example=x)
    assert result.max_rel_error <= 1e-5 and all(p.max_rel_error <= 1e-5 for p in result.passes)
    assert result.nodes_after < result.nodes_before and result.params_after < result.params_before
    with torch.no_grad():
        assert rel_error(model(x), ref) <= 1e-5
    if name.startswith("fasterrcnn"):  # data-dependent second stage: its traceable parts get the passes
        assert "" not in result.scopes and "net.backbone" in result.scopes
    else:
        assert result.scopes == ("",) and installed_graph(model) is not None


def test_config_rejects_unknown_and_repeated_passes():
    with pytest.raises(ValidationError, match="did you mean 'fold_bn'"):
        GraphConfig(passes=["fold_nb"])
    with pytest.raises(ValidationError, match="more than once"):
        GraphConfig(passes=["cse", "cse"])
    assert GraphConfig().passes == ["identity", "dead_code", "const_fold", "cse", "fold_bn", "rep_branches",
                                    "fuse_conv_act"]  # fmt: skip


def test_a_pass_that_changes_the_outputs_raises_and_leaves_the_model_untouched(fitted_tiny):
    @GRAPH_PASSES.register("t-break")
    def breaks(ctx):
        with torch.no_grad():
            next(ctx.root.parameters()).mul_(1.01)
        return ["scaled a weight"]

    model = copy.deepcopy(fitted_tiny)
    x = _x(size=64)
    try:
        with pytest.raises(GraphCheckError, match="'t-break' changed the outputs"):
            optimize_graph(model, GraphConfig(passes=["fold_bn", "t-break"]), example=x)
    finally:
        GRAPH_PASSES._items.pop("t-break")
    assert installed_graph(model) is None and "transforms" not in model.model_config
    with torch.no_grad():
        assert rel_error(model(x), fitted_tiny(x)) == 0


# ----------------------------------------------------------------------------------------------
# the installed graph afterwards


@pytest.fixture(scope="module")
def optimized(fitted_tiny):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run outside the one-thread fixture of conftest
    try:
        model = copy.deepcopy(fitted_tiny)
        return model, optimize_graph(model)
    finally:
        torch.set_num_threads(before)


def test_yolo_test_is_folded_and_fused_everywhere(optimized):
    model, result = optimized
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, ConvAct2d) for m in convs) == len(convs) - 6  # all but the 6 prediction convs
    assert result.nodes_after < result.nodes_before / 2
    assert result.to_text().count("\n") == len(result.passes) + 1


def test_deepcopy_and_load_model_give_the_same_outputs(optimized, tmp_path):
    model, result = optimized
    x = _x(size=64)
    with torch.no_grad():
        ref = model(x)
        twin = copy.deepcopy(model)
        assert installed_graph(twin).root is twin and torch.equal(twin(x)[0], ref[0])
    assert model.model_config["transforms"] == [result.record]
    json.dumps(result.record)
    path = save_checkpoint(tmp_path / "g.pt", model_config=model.model_config, state_dict=model.state_dict())
    loaded, _ = load_model(path)
    loaded.eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(loaded(x), ref, strict=True))
    assert isinstance(loaded.backbone.stem[0], ConvAct2d)


def test_load_model_refuses_a_record_that_does_not_fit(optimized, tmp_path):
    model, _ = optimized
    bad = copy.deepcopy(model.model_config)
    bad["transforms"][0]["fused"] = bad["transforms"][0]["fused"][1:]
    path = save_checkpoint(tmp_path / "bad.pt", model_config=bad, state_dict=model.state_dict())
    with pytest.raises(CheckpointError, match="graph record does not fit model 'yolo-test'.*fused"):
        load_model(path)


def test_onnx_export_of_the_installed_graph(optimized, tmp_path):
    from slimdet.export.onnx import export_onnx

    model, _ = optimized
    result = export_onnx(model, tmp_path / "g.onnx", dynamic_batch=True)
    assert result.max_abs_diff < 1e-4 and "BatchNormalization" not in result.op_counts


def test_pruning_after_the_graph_passes_retraces_and_round_trips(optimized, tmp_path):
    from slimdet.compress.prune import PruneConfig, prune

    model = copy.deepcopy(optimized[0])
    result = prune(model, PruneConfig(ratio=0.3), progress=False)
    assert result.params_after < result.params_before
    x = _x(size=64)
    with torch.no_grad():  # the re-traced graph computes what the pruned module tree computes
        out = model(x)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(out, type(model).forward(model, x), strict=True))
    assert [t["kind"] for t in model.model_config["transforms"]] == ["graph", "prune"]
    path = save_checkpoint(tmp_path / "p.pt", model_config=model.model_config, state_dict=model.state_dict())
    loaded, _ = load_model(path)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(loaded.eval()(x), out, strict=True))


def test_quantizing_after_the_graph_passes_matches_quantizing_the_plain_model(optimized, fitted_tiny, tiny_test_ds):
    from slimdet.compress.quant import QuantConfig, quantize
    from slimdet.compress.quant.graph import QuantConv2d, quantizers
    from slimdet.data.dataset import collate

    images, targets = collate([tiny_test_ds[i] for i in range(4)])
    cfg = QuantConfig(runtime_aware=False, auto_keep=False, bias_correction=False)
    graph_model, plain = copy.deepcopy(optimized[0]), copy.deepcopy(fitted_tiny)
    quantize(graph_model, cfg, calib=[(images, targets)], progress=False)
    quantize(plain, cfg, calib=[(images, targets)], progress=False)
    assert sorted(quantizers(graph_model)) == sorted(quantizers(plain))
    assert not any(isinstance(m, ConvAct2d) for m in graph_model.modules())
    assert sum(isinstance(m, QuantConv2d) for m in graph_model.modules()) == len(
        [m for m in fitted_tiny.modules() if isinstance(m, nn.Conv2d)])  # fmt: skip
    with torch.no_grad():
        assert rel_error(graph_model(images), plain(images)) < 1e-4


def test_an_installed_graph_follows_a_dtype_change():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.register_buffer("scale", torch.full((1, 3, 1, 1), 2.0))

        def forward(self, x):
            return torch.relu(self.conv(x)) * self.scale + self.scale.sum()  # torch.fx computes the sum when tracing

    model = Scaled().eval()
    optimize_graph(model, example=_x())
    model.double()  # replaces the buffers the graph reads: it is traced again
    with torch.no_grad():
        out = model(_x().double())
        assert out.dtype == torch.float64 and torch.equal(out, type(model).forward(model, _x().double()))
    assert sorted(n for n, _ in model.named_buffers()) == ["_tensor_constant0", "scale"]
    assert set(model.state_dict()) == {"conv.weight", "conv.bias", "scale"}


def test_graph_step_in_a_recipe(tiny_digits, tmp_path):
    from slimdet.pipeline import run_recipe

    recipe = {"model": "yolo-test", "dataset": str(tiny_digits), "input_size": 64,
              "steps": [{"graph": {"check_images": 2}}]}  # fmt: skip
    result = run_recipe(recipe, out_dir=tmp_path / "run", progress=False)
    rec = json.loads((tmp_path / "run" / "steps" / "00_graph" / "record.json").read_text())
    metrics = rec["metrics"]
    assert metrics["nodes_after"] < metrics["nodes_before"] and metrics["max_rel_error"] <= 1e-5
    assert metrics["changes"]["fold_bn"] == 53 and metrics["scopes"] == [""]
    loaded, _ = load_model(tmp_path / "run" / "steps" / "00_graph" / "model.pt")
    x = _x(size=64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(loaded.eval()(x), result.model.eval()(x), strict=True))


def test_a_quantized_model_is_refused(fitted_tiny, tiny_test_ds):
    from slimdet.compress.quant import QuantConfig, quantize
    from slimdet.data.dataset import collate

    model = copy.deepcopy(fitted_tiny)
    images, targets = collate([tiny_test_ds[i] for i in range(2)])
    quantize(model, QuantConfig(runtime_aware=False, auto_keep=False), calib=[(images, targets)], progress=False)
    with pytest.raises(ConfigError, match="before quantizing"):
        optimize_graph(model)
