import copy

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from slimdet.compress.share import (
    ShareConfig,
    is_shared,
    kmeans_1d,
    share_weights,
    shared_layers,
    shared_weight,
    stage_bytes,
)
from slimdet.compress.sparsity import SparsityConfig, sparsify
from slimdet.data import load_dataset
from slimdet.errors import ConfigError
from slimdet.io import save_checkpoint
from slimdet.models import create_model, load_model
from slimdet.models.base import Detector
from slimdet.train import TrainConfig, train


class ConvLinear(Detector):
    """A conv, then a linear output layer: the two layer types sharing handles."""

    def __init__(self) -> None:
        super().__init__(num_classes=3, input_size=8)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 3)

    def forward(self, images):
        return self.fc(torch.relu(self.conv(images)).flatten(1))

    def output_layers(self):
        return ["fc"]


def _yolo(sparsity: float | None = 0.6, scope: str = "global"):
    torch.manual_seed(0)
    model = create_model("yolo-test", num_classes=10, input_size=64).eval()
    if sparsity:
        sparsify(model, SparsityConfig(sparsity=sparsity, scope=scope))
    return model


def _outputs(model, seed=1):
    x = torch.rand(2, 3, model.input_size, model.input_size, generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, tuple) else (out,)


def _state_bytes(model):
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_kmeans_recovers_separated_clusters_and_assigns_every_value_to_its_nearest_centroid():
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([-3.0, -1.0, 0.5, 2.0])
    values = (means.repeat_interleave(500) + 0.05 * torch.randn(2000, generator=g))[torch.randperm(2000, generator=g)]
    for init in ("linear", "quantile"):
        centroids, assign = kmeans_1d(values, 4, init=init)
        assert torch.all(centroids[1:] > centroids[:-1])
        for c in range(4):
            assert centroids[c] == pytest.approx(values[assign == c].mean().item(), abs=1e-5)
        assert torch.allclose(centroids, means, atol=0.01)
        nearest = (values[:, None] - centroids).abs().argmin(dim=1)
        assert torch.equal(assign, nearest)


def test_linear_init_spends_centroids_on_the_few_large_weights():
    # Han et al. 3.2: density-based (quantile) initialisation puts its centroids where the weights are
    # dense and leaves the rare large ones poorly represented, though its total squared error is lower
    values = torch.cat([torch.linspace(-0.1, 0.1, 2000), torch.linspace(0.5, 1.0, 20)])
    large = values > 0.4
    err = {}
    for init in ("linear", "quantile"):
        centroids, assign = kmeans_1d(values, 4, init=init)
        err[init] = (centroids[assign] - values).abs()
    assert err["linear"][large].max() < 0.6 * err["quantile"][large].max()
    assert err["linear"].square().sum() > err["quantile"].square().sum()


def test_sharing_keeps_zeros_and_uses_at_most_2_to_the_bits_values_per_layer():
    model = _yolo()
    before = {n: m.weight_orig.detach() * m.weight_mask for n, m in model.named_modules() if hasattr(m, "weight_mask")}
    zeros = {n: w == 0 for n, w in before.items()}
    result = share_weights(model, ShareConfig(bits=3))
    layers = shared_layers(model)
    assert set(layers) == set(zeros) == {layer.name for layer in result.layers}  # the sparsified ones
    assert result.made_permanent and not any(hasattr(m, "weight_mask") for m in model.modules())
    for name, module in layers.items():
        w = module.weight
        assert torch.equal(w, shared_weight(module))
        assert torch.equal(w == 0, zeros[name]), name  # pruned zeros stay, no nonzero snapped to 0 here
        values = w[w != 0].unique()
        assert len(values) <= 8 and set(values.tolist()) <= set(module.weight_centroids.tolist())
        assert module.weight_index.dtype == torch.uint8 and module.weight_index.max() <= 8
        err = float((w - before[name]).norm() / before[name].norm())
        assert next(la.rel_error for la in result.layers if la.name == name) == pytest.approx(err, rel=1e-4)
    assert 0 < result.rel_error < 0.2
    kinds = [(t["kind"], t.get("permanent")) for t in model.model_config["transforms"]]
    assert kinds == [("sparsity", True), ("share", None)]


def test_output_layers_ignored_and_overridden_layers():
    model = _yolo(sparsity=None)
    outputs = model.output_layers()
    kept = {n: dict(model.named_modules())[n].weight for n in outputs + ["neck.down3.0"]}
    result = share_weights(model, ShareConfig(bits=4, ignore=("neck.down3",), overrides={r"heads\.\d\.cls\..*": 2}))
    modules = dict(model.named_modules())
    for name, weight in kept.items():  # not touched: the very same Parameter
        assert not is_shared(modules[name]) and modules[name].weight is weight
    assert result.skipped["neck.down3.0"] == "ignored"
    assert result.skipped["heads.0.cls_pred"].startswith("output layer")
    bits = {layer.name: layer.bits for layer in result.layers}
    assert bits["heads.1.cls.0.0"] == 2 and modules["heads.1.cls.0.0"].weight_centroids.numel() == 4
    assert bits["heads.1.box.0.0"] == 4
    other = _yolo(sparsity=None)
    share_weights(other, ShareConfig(include_output_layers=True, bits=8))
    assert set(outputs) <= set(shared_layers(other))
    assert dict(other.named_modules())[outputs[0]].weight_index.dtype == torch.int16  # 256 centroids + zero


def test_bad_patterns_bits_and_nothing_left_raise():
    with pytest.raises(ConfigError, match=r"'nek' matches no Conv2d or Linear layer \(did you mean 'neck'\?\)"):
        share_weights(_yolo(None), ShareConfig(ignore=("nek",)))
    with pytest.raises(ValidationError, match="bits must be in"):
        ShareConfig(overrides={"neck": 9})
    with pytest.raises(ValidationError):
        ShareConfig(bits=0)
    model = _yolo(None)
    share_weights(model, ShareConfig())
    with pytest.raises(ConfigError, match="no layer left to share"):
        share_weights(model, ShareConfig())  # all shared already or output layers


def test_a_failed_call_leaves_the_model_unchanged():
    masked = _yolo(0.5)
    before = {k: v.clone() for k, v in masked.state_dict().items()}
    config = copy.deepcopy(masked.model_config)
    with pytest.raises(ConfigError, match="'heads.9' matches no"):
        share_weights(masked, ShareConfig(overrides={"heads.9": 2}))
    torch.manual_seed(0)
    plain = ConvLinear()  # its only layers: one ignored, one output layer
    weights = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(ConfigError, match="no layer left to share"):
        share_weights(plain, ShareConfig(ignore=("conv",)))
    for model, state in ((masked, before), (plain, weights)):
        after = model.state_dict()
        assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
        assert not shared_layers(model)
    assert masked.model_config == config  # the masks were not made permanent


def test_transforms_after_sharing_are_refused_by_name():
    from slimdet.compress import LowRankConfig, PruneConfig, QuantConfig, decompose, prune, quantize
    from slimdet.compress.graph import GraphConfig, optimize_graph

    model = _yolo(0.5)
    share_weights(model, ShareConfig(bits=3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {
        "sparsify": lambda: sparsify(model, SparsityConfig(sparsity=0.7)),
        "prune": lambda: prune(model, PruneConfig(ratio=0.3)),
        "quantize": lambda: quantize(model, QuantConfig(), calib=[(model.example_inputs(2), None)], progress=False),
        "lowrank": lambda: decompose(model, LowRankConfig(energy=0.9)),
        "graph": lambda: optimize_graph(model, GraphConfig()),
    }
    for verb, call in calls.items():
        with pytest.raises(ConfigError, match=rf"^{verb}: .*'share', which must be the last transform"):
            call()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_centroid_gradient_is_the_sum_of_its_weights_gradients():
    torch.manual_seed(0)
    model = ConvLinear()
    share_weights(model, ShareConfig(bits=2))
    conv = model.conv
    x = torch.rand(4, 3, 8, 8)
    model.train()
    model(x).square().sum().backward()
    dense = nn.Conv2d(3, 8, 3, padding=1)  # same weights as a plain leaf tensor
    dense.weight = nn.Parameter(shared_weight(conv).detach().clone())
    dense.bias = nn.Parameter(conv.bias.detach().clone())
    model.fc.zero_grad()
    model.fc(torch.relu(dense(x)).flatten(1)).square().sum().backward()
    expected = torch.zeros(5).index_add_(0, conv.weight_index.long().flatten(), dense.weight.grad.flatten())[:4]
    assert torch.allclose(conv.weight_centroids.grad, expected, rtol=1e-5, atol=1e-6)
    assert conv.weight_centroids.grad.abs().min() > 0


def test_fine_tuning_moves_centroids_only_and_keeps_the_zeros(tiny_digits, tmp_path):
    model = _yolo(0.7, scope="layer")  # globally, 70% zeroes whole layers of this untrained model
    share_weights(model, ShareConfig(bits=3))
    layers = shared_layers(model)
    index = {n: m.weight_index.clone() for n, m in layers.items()}
    centroids = {n: m.weight_centroids.detach().clone() for n, m in layers.items()}
    train_ds = load_dataset(tiny_digits, "train", input_size=64, augment=True, cache_images=True)
    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-2, max_steps_per_epoch=2, ema=True, threads=1)
    train(model, train_ds, None, cfg, out_dir=tmp_path, progress=False)  # EMA deep-copies the model
    _outputs(model)
    moved = 0
    for name, module in layers.items():
        assert torch.equal(module.weight_index, index[name]), name
        assert torch.all(module.weight[index[name] == 8] == 0), name
        assert len(module.weight[module.weight != 0].unique()) <= 8
        moved += not torch.equal(module.weight_centroids, centroids[name])
    assert moved == len(layers)


def test_checkpoint_and_deepcopy_round_trip_give_identical_outputs(tmp_path):
    model = _yolo()
    share_weights(model, ShareConfig(bits=5))
    state = model.state_dict()
    assert not any(k.endswith(".weight") and k.rsplit(".", 1)[0] in shared_layers(model) for k in state)
    path = save_checkpoint(tmp_path / "m.pt", model_config=model.model_config, state_dict=state)
    loaded, _ = load_model(path)
    assert set(shared_layers(loaded)) == set(shared_layers(model))
    for a, b in zip(_outputs(model), _outputs(loaded), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(_outputs(model), _outputs(copy.deepcopy(model)), strict=True):
        assert torch.equal(a, b)


def test_bytes_per_stage_follow_han_et_al():
    model = _yolo(0.8)
    masks = sum(m.weight_mask.numel() * 4 for m in model.modules() if hasattr(m, "weight_mask"))
    dense = _state_bytes(model) - masks  # the FP32 state dict of the plain model
    result = share_weights(model, ShareConfig(bits=4))
    stages = result.stages
    assert stages.dense_bytes == dense
    assert stages.dense_bytes > stages.pruned_bytes > stages.shared_bytes
    assert stages == stage_bytes(model, huffman_bytes=stages.huffman_bytes)
    # one layer by hand: 4-bit indices of the nonzeros + bitmap/CSR positions + 16 fp32 centroids
    layer = next(la for la in result.layers if la.name == "neck.down3.0")
    nnz, numel = layer.nonzeros, layer.numel
    assert layer.stages.dense_bytes == 4 * numel
    assert layer.stages.shared_bytes <= (nnz * 4 + 7) // 8 + (numel + 7) // 8 + 16 * 4
    assert layer.stages.pruned_bytes <= 4 * nnz + (numel + 7) // 8
    assert set(stages.ratios()) == {"pruned", "shared", "huffman"}
