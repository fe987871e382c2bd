import copy
import json

import onnx
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from slimdet.compress.sparse_storage import nm_groups
from slimdet.compress.sparsity import NOTE, SparsityConfig, make_permanent, masked_weight, nm_mask, sparsify
from slimdet.data import load_dataset
from slimdet.errors import ConfigError
from slimdet.export import export_onnx
from slimdet.io import save_checkpoint
from slimdet.models import create_model, load_model
from slimdet.train import TrainConfig, train


def _model():
    torch.manual_seed(0)
    return create_model("yolo-test", num_classes=10, input_size=64)


def _masked(model):
    return {name: m for name, m in model.named_modules() if hasattr(m, "weight_mask")}


def _outputs(model, seed=1):
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        return model(x)


def _assert_same_outputs(a, b):
    for x, y in zip(_outputs(a), _outputs(b), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)], ids=["2:4", "1:4", "4:8"])
def test_n_m_masks_keep_exactly_n_largest_of_every_m_along_the_input_dim(n, m):
    model = _model()
    before = {name: mod.weight.detach().clone() for name, mod in model.named_modules() if isinstance(mod, nn.Conv2d)}
    result = sparsify(model, SparsityConfig(mode="n_m", n=n, m=m))
    masked = _masked(model)
    assert len(masked) == len(result.layers) > 40
    for name, module in masked.items():
        mask = nm_groups(module.weight_mask, m)
        assert torch.equal((mask == 0).sum(dim=1), torch.full((mask.shape[0],), m - n)), name
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        magnitude = nm_groups(before[name].abs(), m)
        kept_min = torch.where(mask == 1, magnitude, torch.inf).min(dim=1).values
        dropped_max = torch.where(mask == 0, magnitude, -torch.inf).max(dim=1).values
        assert torch.all(kept_min >= dropped_max), name
        assert torch.all(masked_weight(module)[module.weight_mask == 0] == 0)
    assert result.sparsity == pytest.approx(1 - n / m)
    assert all(layer.storage.format == "n:m" for layer in result.layers)
    # the stem has 3 input channels: no whole group of m, so it stays dense and says why
    assert "not a multiple of m" in result.skipped["backbone.stem.0"]


def test_n_m_groups_run_along_input_channels_of_conv_and_linear():
    conv = torch.zeros(1, 4, 1, 2)
    conv[0, :, 0, 0] = torch.tensor([1.0, -4.0, 2.0, 3.0])  # one group: the 4 input channels at tap (0, 0)
    conv[0, :, 0, 1] = torch.tensor([9.0, 0.5, 0.1, -8.0])
    mask = nm_mask(conv, n=2, m=4)
    assert mask[0, :, 0, 0].tolist() == [0, 1, 0, 1] and mask[0, :, 0, 1].tolist() == [1, 0, 0, 1]
    linear = torch.tensor([[1.0, 2.0, 3.0, 4.0, -5.0, 0.0, 0.0, 1.0]])
    assert nm_mask(linear, n=2, m=4).tolist() == [[0, 0, 1, 1, 1, 0, 0, 1]]


@pytest.mark.parametrize("sparsity", [0.3, 0.7])
def test_global_unstructured_reaches_the_sparsity_over_all_layers(sparsity):
    model = _model()
    result = sparsify(model, SparsityConfig(sparsity=sparsity, scope="global"))
    zeros = sum(int((masked_weight(m) == 0).sum()) for m in _masked(model).values())
    total = sum(m.weight_orig.numel() for m in _masked(model).values())
    assert abs(zeros / total - sparsity) < 0.005
    assert result.sparsity == pytest.approx(zeros / total)
    per_layer = [layer.sparsity for layer in result.layers]
    assert max(per_layer) - min(per_layer) > 0.1  # one threshold, so layers differ


def test_per_layer_unstructured_reaches_the_sparsity_in_each_layer():
    model = _model()
    result = sparsify(model, SparsityConfig(sparsity=0.6, scope="layer"))
    for layer in result.layers:
        assert abs(layer.sparsity - 0.6) <= 1 / layer.numel, layer.name
    assert all(layer.storage.format == "bitmap" for layer in result.layers)


def test_output_layers_untouched_by_default_and_masked_on_request():
    model = _model()
    outputs = model.output_layers()
    before = {name: dict(model.named_modules())[name].weight.detach().clone() for name in outputs}
    result = sparsify(model, SparsityConfig(sparsity=0.9))
    modules = dict(model.named_modules())
    for name in outputs:
        assert not hasattr(modules[name], "weight_mask") and torch.equal(modules[name].weight, before[name])
        assert result.skipped[name].startswith("output layer")
    other = _model()
    sparsify(other, SparsityConfig(sparsity=0.9, include_output_layers=True))
    assert set(outputs) <= set(_masked(other))


def test_ignore_and_overrides_by_name_prefix_and_regex():
    model = _model()
    cfg = SparsityConfig(sparsity=0.5, scope="layer", ignore=("neck",), overrides={r"heads\.\d\.cls\..*": 0.8})
    result = sparsify(model, cfg)
    by_name = {layer.name: layer for layer in result.layers}
    assert not any(name.startswith("neck.") for name in by_name)
    assert all(result.skipped[name] == "ignored" for name in result.skipped if name.startswith("neck."))
    assert by_name["heads.0.cls.0.0"].sparsity == pytest.approx(0.8, abs=1e-2)
    assert by_name["heads.0.box.0.0"].sparsity == pytest.approx(0.5, abs=1e-2)
    # global scope: overridden layers on their own, one threshold over the rest
    result = sparsify(_model(), SparsityConfig(sparsity=0.4, overrides={r"heads\.\d\.cls\..*": 0.8}))
    cls = [layer for layer in result.layers if ".cls." in layer.name]
    rest = [layer for layer in result.layers if ".cls." not in layer.name]
    assert len(cls) == 6 and all(abs(layer.sparsity - 0.8) <= 1 / layer.numel for layer in cls)
    assert sum(layer.zeros for layer in rest) / sum(layer.numel for layer in rest) == pytest.approx(0.4, abs=1e-4)
    with pytest.raises(ConfigError, match="'nek' matches no Conv2d or Linear layer"):
        sparsify(_model(), SparsityConfig(ignore=("nek",)))


def test_zeros_survive_a_second_call_and_masks_combine():
    model = _model()
    sparsify(model, SparsityConfig(sparsity=0.5, scope="layer"))
    first = {name: m.weight_mask.clone() for name, m in _masked(model).items()}
    sparsify(model, SparsityConfig(mode="n_m"))
    for name, module in _masked(model).items():
        assert torch.all(module.weight_mask[first[name] == 0] == 0), name
    assert [t["kind"] for t in model.model_config["transforms"]] == ["sparsity", "sparsity"]


@pytest.mark.parametrize("ema", [False, True], ids=["no-ema", "ema"])
def test_training_keeps_the_zeros(tiny_digits, tmp_path, ema):
    model = _model()
    sparsify(model, SparsityConfig(mode="n_m"))
    masks = {name: m.weight_mask.clone() for name, m in _masked(model).items()}
    orig = {name: m.weight_orig.detach().clone() for name, m in _masked(model).items()}
    train_ds = load_dataset(tiny_digits, "train", input_size=64, augment=True, cache_images=True)
    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-2, max_steps_per_epoch=2, ema=ema, threads=1)
    result = train(model, train_ds, None, cfg, out_dir=tmp_path, progress=False)
    changed = 0
    for name, module in _masked(model).items():
        assert torch.equal(module.weight_mask, masks[name]), name  # still exactly 0/1, unchanged
        assert torch.all(masked_weight(module)[masks[name] == 0] == 0), name
        changed += not torch.equal(module.weight_orig, orig[name])
    assert changed > 20  # training did move the kept weights
    copy.deepcopy(model)  # no autograd graph left on the modules after the last training forward
    _outputs(model)  # a forward refreshes module.weight: the zeros are in what the layer uses
    assert all(torch.all(m.weight[masks[n] == 0] == 0) for n, m in _masked(model).items())
    rebuilt, _ = load_model(result.last_checkpoint)  # the training checkpoint replays the masks
    _assert_same_outputs(rebuilt, model)


@pytest.mark.parametrize("cfg", [SparsityConfig(mode="n_m"), SparsityConfig(sparsity=0.6)], ids=["2:4", "global"])
def test_save_then_load_model_gives_identical_outputs(tmp_path, cfg):
    model = _model()
    sparsify(model, cfg)
    path = save_checkpoint(tmp_path / "m.pt", model_config=model.model_config, state_dict=model.state_dict())
    rebuilt, _ = load_model(path)
    assert set(_masked(rebuilt)) == set(_masked(model))
    _assert_same_outputs(rebuilt, model)
    copy.deepcopy(rebuilt)  # no autograd graph left on the modules


def test_make_permanent_folds_masks_into_plain_weights_that_round_trip(tmp_path):
    model = _model()
    sparsify(model, SparsityConfig(mode="n_m"))
    masked = list(_masked(model))
    reference = _outputs(model)
    assert make_permanent(model) == masked
    assert not _masked(model) and not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())
    modules = dict(model.named_modules())
    assert all(((nm_groups(modules[n].weight, 4) == 0).sum(dim=1) >= 2).all() for n in masked)
    assert model.model_config["transforms"][0]["permanent"] is True
    assert all(torch.equal(a, b) for a, b in zip(_outputs(model), reference, strict=True))
    path = save_checkpoint(tmp_path / "m.pt", model_config=model.model_config, state_dict=model.state_dict())
    rebuilt, _ = load_model(path)
    _assert_same_outputs(rebuilt, model)
    assert make_permanent(model) == []


def test_masked_model_exports_to_onnx_with_the_zeros(tmp_path):
    model = _model()
    sparsify(model, SparsityConfig(mode="n_m"))
    result = export_onnx(model, tmp_path / "m.onnx", check=True, atol=1e-4)
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    proto = onnx.load(str(tmp_path / "m.onnx"))
    zeros = sum(int((onnx.numpy_helper.to_array(t) == 0).sum()) for t in proto.graph.initializer)
    masked_zeros = sum(int((m.weight_mask == 0).sum()) for m in _masked(model).values())
    assert zeros >= masked_zeros
    assert not any("mask" in t.name for t in proto.graph.initializer)  # folded into the weights


def test_result_reports_storage_and_the_honest_note():
    model = _model()
    result = sparsify(model, SparsityConfig(mode="n_m"))
    d = json.loads(json.dumps(result.to_dict()))
    assert d["note"] == NOTE and "do not run faster" in d["note"]
    assert d["sparse_bytes"] == sum(layer["sparse_bytes"] for layer in d["layers"]) < d["dense_bytes"]
    assert d["dense_bytes"] == sum(4 * m.weight_orig.numel() for m in _masked(model).values())
    params = sum(4 * p.numel() for p in _model().state_dict().values() if p.is_floating_point())
    assert params < d["model_dense_bytes"] < params + 1000  # + integer buffers (BN batch counters)
    assert d["model_sparse_bytes"] == d["model_dense_bytes"] - d["dense_bytes"] + d["sparse_bytes"]


def test_config_round_trips_through_json():
    cfg = SparsityConfig(mode="n_m", n=1, m=4, ignore=("neck", r"heads\.0\..*"), include_output_layers=True)
    assert SparsityConfig.model_validate_json(cfg.model_dump_json()) == cfg
    cfg = SparsityConfig(sparsity=0.25, scope="layer", overrides={"backbone": 0.1})
    assert SparsityConfig.model_validate(json.loads(cfg.model_dump_json())) == cfg


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"sparsity": 1.5}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"mode": "n_m", "n": 4, "m": 4}, "n must be < m"),
        ({"mode": "n_m", "n": 3, "m": 2}, "n must be < m"),
        ({"mode": "n_m", "overrides": {"neck": 0.5}}, "apply to mode 'unstructured' only"),
        ({"overrides": {"neck": 1.0}}, r"must be in \[0, 1\)"),
        ({"ignore": ["heads[0"]}, "nor a valid regular expression"),
        ({"mode": "2:4"}, "mode"),
        ({"sparsty": 0.5}, "sparsty"),
    ],
    ids=["sparsity>1", "sparsity<0", "n=m", "n>m", "nm-overrides", "override=1", "bad-regex", "mode", "typo"],
)
def test_invalid_configs_are_refused_with_a_clear_message(kw, match):
    with pytest.raises(ValidationError, match=match):
        SparsityConfig(**kw)


def test_nothing_left_to_sparsify_raises():
    with pytest.raises(ConfigError, match="no layer left"):
        sparsify(_model(), SparsityConfig(ignore=(".*",)))


def test_a_fresh_process_loads_sparse_and_pruned_checkpoints(tmp_path):
    """load_model alone (no compress import by the caller) must find every transform's replayer."""
    import subprocess
    import sys

    from slimdet.compress import PruneConfig, prune
    from slimdet.io import save_checkpoint

    torch.manual_seed(0)
    model = create_model("yolo-test", num_classes=3, input_size=64)
    prune(model, PruneConfig(importance="l1", ratio=0.25), progress=False)
    sparsify(model, SparsityConfig(mode="n_m", n=2, m=4))
    path = save_checkpoint(tmp_path / "m.pt", model_config=model.model_config, state_dict=model.state_dict())
    x = torch.rand(1, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    torch.save(model.eval()(x)[0], tmp_path / "y.pt")
    code = (
        "import sys, torch; from slimdet.models import load_model\n"
        "m, _ = load_model(sys.argv[1]); x = torch.load(sys.argv[2]); y = torch.load(sys.argv[3])\n"
        "assert 'slimdet.compress' in sys.modules\n"
        "print(torch.equal(m.eval()(x)[0], y))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"
