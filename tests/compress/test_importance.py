"""Importance criteria: the registry, what each one ranks high, and Torch-Pruning compatibility."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

from slimdet.compress.importance import IMPORTANCE, make_importance
from slimdet.compress.prune_graph import PruneGraph
from slimdet.errors import ConfigError
from slimdet.models import create_model

TARGETS = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0]]), "labels": torch.tensor([1])}] * 2


def tiny_net(norm: nn.Module) -> nn.Sequential:
    """conv(3 -> 4) -> norm -> relu -> conv(4 -> 2), with equal weights except what a test sets."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), norm, nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        net[0].weight.fill_(0.1)
        net[3].weight.fill_(0.1)
    return net


def scores(net: nn.Module, name: str) -> list[float]:
    dg = tp.DependencyGraph().build_dependency(net, example_inputs=torch.rand(1, 3, 8, 8), verbose=False)
    group = dg.get_pruning_group(net[0], tp.prune_conv_out_channels, list(range(4)))
    return make_importance(name)(group).tolist()


def ranking(values: list[float]) -> list[int]:
    return sorted(range(len(values)), key=lambda i: values[i])


def test_registry_holds_the_six_criteria_and_suggests_close_names():
    assert IMPORTANCE.names() == ["bn_scale", "hessian", "l1", "l2", "random", "taylor"]
    with pytest.raises(ConfigError, match="did you mean 'hessian'"):
        make_importance("hesian")


def test_l1_and_l2_weigh_spread_and_peaked_filters_differently():
    net = tiny_net(nn.BatchNorm2d(4))
    with torch.no_grad():
        net[0].weight[0].zero_()
        net[0].weight[0, 0, 1, 1] = 4.0  # one large weight: L1 4, L2 16
        net[0].weight[1].fill_(0.4)  # 27 weights of 0.4: L1 10.8, L2 4.32
    l1, l2 = scores(net, "l1"), scores(net, "l2")
    assert l1[1] > l1[0] and l2[0] > l2[1]


def test_bn_scale_follows_batchnorm_and_groupnorm_gammas():
    for norm in (nn.BatchNorm2d(4), nn.GroupNorm(2, 4)):
        net = tiny_net(norm)
        with torch.no_grad():
            norm.weight.copy_(torch.tensor([0.5, -2.0, 0.1, 1.0]))
        assert ranking(scores(net, "bn_scale")) == [2, 0, 3, 1], type(norm).__name__


def test_bn_scale_falls_back_to_weight_magnitude_without_a_norm_layer():
    net = tiny_net(nn.Identity())
    with torch.no_grad():
        net[0].weight[2].mul_(5)
    assert ranking(scores(net, "bn_scale"))[-1] == 2


def test_random_is_seeded():
    net = tiny_net(nn.BatchNorm2d(4))
    dg = tp.DependencyGraph().build_dependency(net, example_inputs=torch.rand(1, 3, 8, 8), verbose=False)
    group = dg.get_pruning_group(net[0], tp.prune_conv_out_channels, list(range(4)))
    a, b, c = (make_importance("random", seed=s)(group) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", ["taylor", "hessian"])
def test_gradient_criteria_use_the_detector_loss_in_eval_mode(name):
    torch.manual_seed(0)
    model = create_model("yolo-test", num_classes=3, input_size=64).train()
    calib = [(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)), TARGETS)]
    criterion = make_importance(name)
    with pytest.raises(ConfigError, match="calibration"):
        criterion.prepare(model, None)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    graph = PruneGraph(model, model.example_inputs(1), protected=model.output_layers())
    criterion.prepare(model, calib)
    assert model.training  # mode restored ...
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())  # ... statistics untouched
    group = graph.by_name["backbone.stage3.0.0"]
    imp = graph.importance(group, criterion)
    l1 = graph.importance(group, make_importance("l1"))
    assert imp.shape == (group.units,) and torch.isfinite(imp).all() and (imp >= 0).all() and imp.sum() > 0
    assert not torch.equal(torch.argsort(imp), torch.argsort(l1))


@pytest.mark.parametrize("name", ["l1", "l2", "bn_scale", "random"])
def test_criteria_work_inside_torch_pruning_own_pruner(name):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3),
                        nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1))  # fmt: skip
    pruner = tp.pruner.MetaPruner(net, torch.rand(1, 3, 16, 16), importance=make_importance(name),
                                  pruning_ratio=0.5, ignored_layers=[net[6]])  # fmt: skip
    pruner.step()
    assert (net[0].out_channels, net[3].out_channels, net[6].out_channels) == (8, 8, 4)
    assert net(torch.rand(1, 3, 16, 16)).shape == (1, 4, 12, 12)
