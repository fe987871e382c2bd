"""quantize(): calibrators and granularities, overrides, mixed precision, auto-keep, QAT, replay."""

import copy

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from slimdet.compress.quant import CALIBRATORS, QuantConfig, quantize, set_quant_mode
from slimdet.compress.quant.graph import QuantConv2d, quantizers
from slimdet.compress.quant.keep import tail_units
from slimdet.compress.quant.quantizers import Mode
from slimdet.data.dataset import collate
from slimdet.errors import ConfigError
from slimdet.io import save_checkpoint
from slimdet.models import load_model
from slimdet.models.base import Detector


@pytest.fixture(scope="module")
def calib(tiny_test_ds):
    images, targets = collate([tiny_test_ds[i] for i in range(len(tiny_test_ds))])
    return [(images[:3], targets[:3]), (images[3:], targets[3:])]


def _cfg(**kw) -> QuantConfig:
    """Without the runtime timing (it depends on this machine's load); tested on its own below."""
    return QuantConfig(runtime_aware=False, **kw)


def _x() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))


def _outputs(model: nn.Module) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return list(model(_x()))


def _rel_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b, strict=True))


CASES = [(c, "per_channel") for c in CALIBRATORS.names()] + [("minmax", "per_tensor")]


@pytest.mark.parametrize(("calibrator", "granularity"), CASES, ids=[f"{c}-{g}" for c, g in CASES])
def test_w8a8_is_close_to_float_for_every_calibrator_and_granularity(fitted_tiny, calib, calibrator, granularity):
    model = copy.deepcopy(fitted_tiny)
    ref = _outputs(model)
    cfg = _cfg(calibrator=calibrator, granularity=granularity, auto_keep=False, bias_correction=False)
    result = quantize(model, cfg, calib=calib, progress=False)
    convs = [n for n, m in fitted_tiny.named_modules() if isinstance(m, nn.Conv2d)]
    assert set(result.weight_bits) == set(convs) and all(b == 8 for b in result.weight_bits.values())
    assert all(isinstance(m, QuantConv2d) for n, m in model.named_modules() if n in result.weight_bits)
    assert result.folded_bn and all(isinstance(model.get_submodule(n), nn.Identity) for n in result.folded_bn)
    err = _rel_error(_outputs(model), ref)
    # KL (entropy) calibration clips the long tails of SiLU activations hard on this barely trained
    # model; the other calibrators stay within a few percent of the float outputs.
    assert 0 < err < (0.6 if calibrator == "entropy" else 0.08), err
    set_quant_mode(model, "off")  # the folded float model computes what the original did
    assert _rel_error(_outputs(model), ref) < 1e-4


def test_lower_bits_cost_accuracy_and_bytes(fitted_tiny, calib):
    ref = _outputs(fitted_tiny)
    errors, sizes = {}, {}
    for bits in (8, 4, 2):
        model = copy.deepcopy(fitted_tiny)
        r = quantize(model, _cfg(weight_bits=bits, auto_keep=False, adaround_iters=20), calib=calib,
                     progress=False)  # fmt: skip
        errors[bits], sizes[bits] = _rel_error(_outputs(model), ref), r.weight_bytes
    assert errors[8] < errors[4] < errors[2]
    assert sizes[4] == pytest.approx(sizes[8] / 2) and sizes[2] == pytest.approx(sizes[8] / 4)


def test_adaround_rounds_int8_weights_too_when_asked_and_never_worse_than_nearest(fitted_tiny, calib):
    kw = {"auto_keep": False, "bias_correction": False, "adaround_iters": 30}
    default = quantize(copy.deepcopy(fitted_tiny), _cfg(**kw), calib=calib, progress=False)
    assert "adaround" not in default.steps  # None: only grids below 8 bits, and W8 has none
    model = copy.deepcopy(fitted_tiny)
    r = quantize(model, _cfg(adaround=True, **kw), calib=calib, progress=False)
    errors = r.steps["adaround"]["output_mse"]
    assert r.steps["adaround"]["layers"] == len(errors) == len([b for b in r.weight_bits.values() if b == 8])
    assert all(e["adaround"] <= e["nearest"] for e in errors.values())
    improved = [n for n, e in errors.items() if e["adaround"] < e["nearest"]]  # the others: rounded to nearest
    assert improved and sum(e["adaround"] for e in errors.values()) < sum(e["nearest"] for e in errors.values())
    for name in improved:  # the learned rounding is written into the weights, on the int8 grid
        layer = model.get_submodule(name)
        q = layer.weight.detach() / layer.weight_quant.scale.detach().reshape(-1, 1, 1, 1)
        assert torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= 127 + 1e-3, name


def test_overrides_and_keep_float_by_regex(fitted_tiny, calib):
    model = copy.deepcopy(fitted_tiny)
    cfg = _cfg(overrides={r"backbone\..*": {"weight_bits": 4}}, keep_float=["heads.0.cls_pred"],
                      auto_keep=False, adaround=False)  # fmt: skip
    r = quantize(model, cfg, calib=calib, progress=False)
    assert {n: b for n, b in r.weight_bits.items() if n.startswith("backbone.")} and all(
        b == 4 for n, b in r.weight_bits.items() if n.startswith("backbone.")
    )
    assert r.weight_bits["heads.0.cls_pred"] == 32 and r.weight_bits["neck.down3.0"] == 8
    assert "heads.0.cls_pred" in r.kept_float


def test_pattern_that_matches_nothing_is_refused(fitted_tiny, calib):
    with pytest.raises(ConfigError, match="matches no layer"):
        quantize(copy.deepcopy(fitted_tiny), QuantConfig(keep_float=["heads.7.box"]), calib=calib, progress=False)
    with pytest.raises(ValidationError, match="binary"):
        QuantConfig(weight_bits=1)
    with pytest.raises(ValidationError, match="calibrator"):
        QuantConfig(calibrator="entropie")


def test_no_calibration_data_and_untraceable_models_fail_clearly(fitted_tiny):
    with pytest.raises(ConfigError, match="calibration"):
        quantize(copy.deepcopy(fitted_tiny), QuantConfig(), calib=[], progress=False)

    class Dynamic(Detector):
        def __init__(self) -> None:
            super().__init__(1, 32)
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x  # data-dependent control flow

    model = Dynamic()
    model.model_config = {"name": "dynamic"}
    with pytest.raises(ConfigError, match="not traceable"):
        quantize(model, QuantConfig(), calib=[(torch.rand(1, 3, 32, 32), [])], progress=False)


def test_mixed_precision_meets_the_weight_budget(fitted_tiny, calib):
    model = copy.deepcopy(fitted_tiny)
    r = quantize(model, _cfg(weight_bytes_ratio=0.5, candidate_bits=(2, 4, 8), adaround_iters=20),
                 calib=calib, progress=False)  # fmt: skip
    assert r.weight_bytes <= 0.5 * r.weight_bytes_int8 + 1e-6
    assert r.allocation is not None and r.allocation["status"]
    assert set(r.weight_bits.values()) <= {2, 4, 8, 32} and len(set(r.weight_bits.values())) > 1
    assert set(r.sensitivity) == {n for n, b in r.weight_bits.items() if b != 32}


def test_auto_keep_finds_a_broken_tail_tensor_by_measurement(fitted_tiny, calib):
    from slimdet.compress.quant.keep import auto_keep

    model = copy.deepcopy(fitted_tiny)
    quantize(model, _cfg(auto_keep=False, float_outputs=False), calib=calib, progress=False)
    points = _points(model)
    units = tail_units(model, points)
    assert {"heads.1/cat", "heads.1.box_pred", "heads.1.cls_pred"} <= set(units)
    assert not any(u.startswith("backbone") for u in units)  # only the tail is a candidate
    qs = quantizers(model)
    broken = next(k for k, q in qs.items() if q.label == "heads.0/cat")
    with torch.no_grad():
        qs[broken].scale.mul_(40)  # a grid far too coarse for the outputs of level 0
    kept = auto_keep(model, points, calib, progress=False)
    assert list(kept) == ["heads.0/cat"]
    assert "detection-loss increase" in kept["heads.0/cat"]
    assert qs[broken].mode == Mode.OFF


def test_raw_predictions_stay_float_by_default_so_that_scores_do_not_tie(fitted_tiny, calib):
    from slimdet.compress.quant.graph import output_keys

    scores = {}
    for float_outputs in (True, False):
        model = copy.deepcopy(fitted_tiny)
        r = quantize(model, _cfg(auto_keep=False, float_outputs=float_outputs), calib=calib, progress=False)
        qs = quantizers(model)
        off = {qs[k].label for k in output_keys(model) if qs[k].mode == Mode.OFF}
        if float_outputs:
            assert off == {f"heads.{i}{part}" for i in range(3) for part in ("/cat", ".box_pred", ".cls_pred")}
            assert set(r.kept_float) == off and all("float_outputs" in why for why in r.kept_float.values())
            assert all(q.mode == Mode.QUANT for k, q in qs.items() if k not in output_keys(model))
            assert r.weight_bits["heads.0.cls_pred"] == 8  # the prediction convs' weights stay integer
        else:
            assert not off and not r.kept_float
        model.eval()
        with torch.no_grad():
            level0 = model(calib[0][0])[0]
        scores[float_outputs] = level0[:, -model.num_classes:].flatten()
    # on an 8-bit grid the class logits take at most 256 values (so scores tie across images)
    assert scores[False].unique().numel() <= 256 < scores[True].unique().numel()


def test_auto_keep_leaves_a_tolerable_quantization_loss_alone(fitted_tiny, calib):
    from slimdet.compress.importance import calib_loss
    from slimdet.compress.quant.graph import float_mode
    from slimdet.compress.quant.keep import auto_keep

    model = copy.deepcopy(fitted_tiny)
    quantize(model, _cfg(auto_keep=False, float_outputs=False), calib=calib, progress=False)
    qs = quantizers(model)
    broken = next(k for k, q in qs.items() if q.label == "heads.0/cat")
    with torch.no_grad():
        qs[broken].scale.mul_(40)
    batches = list(calib)[:2]
    with float_mode(model):
        loss_float = calib_loss(model, batches)
    rel_increase = (calib_loss(model, batches) - loss_float) / loss_float
    assert rel_increase > 0
    # a tolerance above the measured increase: no float island is worth its run time
    assert auto_keep(model, _points(model), calib, tolerance=rel_increase * 1.01, progress=False) == {}
    assert qs[broken].mode == Mode.QUANT
    # below it, the broken tensor is still found
    assert list(auto_keep(model, _points(model), calib, tolerance=rel_increase / 4, progress=False)) == ["heads.0/cat"]


def test_auto_keep_still_weighs_the_weight_of_a_prediction_conv_whose_output_is_float(fitted_tiny, calib):
    from slimdet.compress.quant.keep import auto_keep

    model = copy.deepcopy(fitted_tiny)
    quantize(model, _cfg(auto_keep=False), calib=calib, progress=False)  # float_outputs: the output is float
    qs = quantizers(model)
    weight = next(q for q in qs.values() if q.label == "heads.0.box_pred" and q.kind == "weight")
    with torch.no_grad():
        weight.scale.mul_(400)  # a weight grid far too coarse (x40 barely moves this small layer's loss)
    kept = auto_keep(model, _points(model), calib, progress=False)
    assert list(kept) == ["heads.0.box_pred"] and weight.mode == Mode.OFF


def test_raw_predictions_are_never_clipped_even_before_their_concatenation(fitted_tiny, calib):
    from slimdet.compress.quant.graph import output_keys

    model = copy.deepcopy(fitted_tiny)
    quantize(model, _cfg(auto_keep=False, float_outputs=False, calibrator="percentile",
                         calibrator_options={"percentile": 90.0}), calib=calib, progress=False)  # fmt: skip
    qs = quantizers(model)
    labels = {qs[k].label for k in output_keys(model)}
    assert {"heads.0/cat", "heads.0.box_pred", "heads.0.cls_pred"} <= labels
    assert not any(label.startswith(("backbone", "neck")) for label in labels)
    float_model = copy.deepcopy(model)
    set_quant_mode(float_model, "off")
    seen = {}

    def extremes(key):
        def hook(module, inputs, output):
            seen[key] = (inputs[0].min(), inputs[0].max())

        return hook

    hooks = [q.register_forward_hook(extremes(k)) for k, q in quantizers(float_model).items()
             if k in output_keys(float_model)]  # fmt: skip
    float_model.eval()
    with torch.no_grad():
        float_model(calib[0][0])
    for h in hooks:
        h.remove()
    assert set(seen) == output_keys(model)
    for key, (lo, hi) in seen.items():  # minmax: the extremes are on the grid (within the zero point's rounding)
        q = qs[key]
        half_step = 0.5 * float(q.scale) + 1e-4
        assert float((q.qmin - q.zero_point) * q.scale) <= float(lo) + half_step
        assert float((q.qmax - q.zero_point) * q.scale) >= float(hi) - half_step


def _span(q):
    return float((q.qmin - q.zero_point) * q.scale), float((q.qmax - q.zero_point) * q.scale)


def test_concatenations_and_their_inputs_share_a_grid_that_clips_nothing_more(fitted_tiny, calib):
    from slimdet.compress.quant.graph import concatenations

    spans, models, results = {}, {}, {}
    for share in (False, True):
        model = copy.deepcopy(fitted_tiny)
        results[share] = quantize(model, _cfg(auto_keep=False, bias_correction=False, share_concat_grids=share),
                                  calib=calib, progress=False)  # fmt: skip
        qs = quantizers(model)
        spans[share] = {k: _span(q) for k, q in qs.items() if q.kind == "act"}
        models[share] = model
    assert "shared_concat_grids" not in results[False].steps
    shared = results[True].steps["shared_concat_grids"]
    assert shared, "yolo-test's C2f blocks concatenate quantized tensors"
    qs = quantizers(models[True])
    by_label = {q.label: k for k, q in qs.items() if q.kind == "act"}
    for cat, inputs in shared.items():
        cat_key = by_label[cat]
        assert cat_key in {c for c, _ in concatenations(models[True])}
        lo, hi = spans[True][cat_key]
        for label in inputs:
            q = qs[by_label[label]]
            assert float(q.scale) == float(qs[cat_key].scale) and int(q.zero_point) == int(qs[cat_key].zero_point)
            own_lo, own_hi = spans[False][by_label[label]]  # the range its own calibration chose
            half_step = 0.5 * float(q.scale) + 1e-6  # the zero point is rounded to an integer
            assert lo <= own_lo + half_step and hi >= own_hi - half_step  # covered: nothing clipped more
            assert (hi - lo) <= 2.0 * (own_hi - own_lo) * (1 + 1e-5)  # at most one bit coarser
    # tensors in no concatenation keep the grid their own calibration chose
    joined = {by_label[c] for c in shared} | {by_label[x] for xs in shared.values() for x in xs}
    for key, span in spans[False].items():
        if key not in joined and key in spans[True]:
            assert spans[True][key] == pytest.approx(span)


def test_an_input_far_narrower_than_its_concatenation_keeps_its_own_grid(fitted_tiny, calib):
    from slimdet.compress.quant.graph import concatenations
    from slimdet.compress.quant.quantize import share_concat_grids

    model = copy.deepcopy(fitted_tiny)
    quantize(model, _cfg(auto_keep=False, bias_correction=False, share_concat_grids=False), calib=calib,
             progress=False)  # fmt: skip
    qs = quantizers(model)
    cat_key, in_keys = next((c, ins) for c, ins in concatenations(model) if len(set(ins)) >= 2)
    narrow, other = list(dict.fromkeys(in_keys))[:2]
    lo, hi = _span(qs[other])
    qs[narrow].set_range(lo / 10, hi / 10)  # a tenth of its neighbour's range: sharing would cost 3+ bits
    qs[cat_key].set_range(lo, hi)
    before = _span(qs[narrow])
    shared = share_concat_grids(model)
    assert qs[narrow].label not in shared.get(qs[cat_key].label, [])
    assert _span(qs[narrow]) == before
    assert qs[other].label in shared[qs[cat_key].label] and _span(qs[other]) == _span(qs[cat_key])


def test_silu_tail_bound_holds_for_every_input_below_it():
    from slimdet.compress.quant.quantize import _silu_tail

    for tol in (1e-4, 0.003, 0.02, 0.3):
        t = _silu_tail(tol)
        x = -torch.logspace(0, 2, 2000, dtype=torch.float64)  # -1 .. -100
        below = x[x <= -t]
        assert float(torch.nn.functional.silu(below).abs().max()) <= tol
        tighter = float(torch.nn.functional.silu(torch.tensor(-t + 0.05)).abs())  # the bound is not loose
        assert t == pytest.approx(1.2785, abs=1e-3) or tighter > tol


def test_silu_inputs_are_clipped_where_silu_output_stops_mattering(fitted_tiny, calib):
    from slimdet.compress.quant.graph import silu_inputs
    from slimdet.compress.quant.quantize import clip_silu_inputs

    model = copy.deepcopy(fitted_tiny)
    result = quantize(model, _cfg(auto_keep=False, bias_correction=False, clip_silu_inputs=False), calib=calib,
                      progress=False)  # fmt: skip
    assert "clipped_silu_inputs" not in result.steps
    qs = quantizers(model)
    pairs = silu_inputs(model)
    assert len(pairs) == sum(isinstance(m, nn.SiLU) for m in fitted_tiny.modules())  # every SiLU of yolo-test
    (wide, wide_out), (narrow, _) = pairs[0], pairs[1]
    lo, hi = _span(qs[wide])
    qs[wide].set_range(-40.0, hi)  # a long negative tail, as a conv output often has
    qs[narrow].set_range(-1.0, hi)  # already above where SiLU's output stops mattering
    before = {k: _span(q) for k, q in qs.items() if q.kind != "weight"}
    clipped = clip_silu_inputs(model)
    assert qs[wide].label in clipped and qs[narrow].label not in clipped
    floor = clipped[qs[wide].label]
    new_lo, new_hi = _span(qs[wide])
    step = float(qs[wide].scale)
    assert -40.0 < floor < -3.0 and new_lo == pytest.approx(floor, abs=step) and new_hi == pytest.approx(hi, abs=step)
    # below the new low end SiLU's output is within a quarter of its own step of 0
    x = torch.linspace(-40.0, floor, 1000)
    assert float(torch.nn.functional.silu(x).abs().max()) <= 0.25 * float(qs[wide_out].scale) + 1e-7
    # nothing else moved: the tensors that feed something besides a SiLU, and the SiLU outputs
    assert all(_span(q) == before[k] for k, q in qs.items() if k in before and q.label not in clipped)


def _points(model):
    from slimdet.compress.quant.graph import Point

    out = []
    for key, q in quantizers(model).items():
        layer = q.label if q.kind == "weight" else None
        out.append(Point(key, q.label, q.kind, layer=layer))
    return out


def test_qat_trains_step_sizes_and_checkpoint_replays(fitted_tiny, calib, tmp_path):
    model = copy.deepcopy(fitted_tiny)
    quantize(model, _cfg(weight_bits=4, qat=True, adaround=False), calib=calib, progress=False)
    scales = [q.scale for q in quantizers(model).values() if q.scale.requires_grad]
    assert scales
    before = [s.detach().clone() for s in scales]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    loss, _ = model.compute_loss(*calib[0])
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, scales, strict=True))

    path = save_checkpoint(tmp_path / "q.pt", model_config=model.model_config, state_dict=model.state_dict())
    loaded, _ = load_model(path)
    for a, b in zip(_outputs(loaded), _outputs(model), strict=True):
        assert torch.equal(a, b)
    assert sum(q.scale.requires_grad for q in quantizers(loaded).values()) == len(scales)


def test_ema_copy_keeps_integer_zero_points(fitted_tiny, calib):
    from slimdet.train import _ema

    model = copy.deepcopy(fitted_tiny)
    quantize(model, _cfg(auto_keep=False), calib=calib, progress=False)
    ema = _ema(model, 0.999)
    for _ in range(3):
        ema.update_parameters(model)
    for (name, a), b in zip(model.state_dict().items(), ema.module.state_dict().values(), strict=True):
        if not a.is_floating_point():
            assert torch.equal(a, b), name


def test_runtime_aware_keeps_float_only_layers_measured_slower_in_int8(fitted_tiny, calib, monkeypatch):
    from slimdet.compress.quant import runtime

    def fake_latency(conv, shape, *, silu, runs=30):  # the stem (3 input channels) loses in int8
        return {"fp32": 1e-4, "int8": 3e-4 if shape[1] == 3 else 0.5e-4}

    monkeypatch.setattr(runtime, "layer_latency", fake_latency)
    model = copy.deepcopy(fitted_tiny)
    r = quantize(model, QuantConfig(auto_keep=False), calib=calib, progress=False)
    assert [n for n, b in r.weight_bits.items() if b == 32] == ["backbone.stem.0"]
    assert "int8 300 us vs fp32 100 us" in r.kept_float["backbone.stem.0"]
    modes = {q.label: q.mode for q in quantizers(model).values() if q.kind != "weight"}
    assert modes["input"] == modes["backbone.stem.0"] == modes["backbone.stem.2:sigmoid"] == Mode.OFF
    assert modes["backbone.stem.2"] == Mode.QUANT  # the SiLU output feeds int8 layers


def test_layer_latency_times_both_graphs_of_a_real_conv():
    from slimdet.compress.quant.runtime import layer_latency

    t = layer_latency(nn.Conv2d(8, 16, 3, padding=1), (1, 8, 16, 16), silu=True, runs=3)
    assert set(t) == {"fp32", "int8"} and all(v > 0 for v in t.values())


@pytest.mark.parametrize(("resource", "ratio"), [("energy", 0.85), ("latency", 0.97)])
def test_mixed_precision_under_a_modelled_hardware_budget(fitted_tiny, calib, resource, ratio):
    from slimdet.hw import layer_table, load_spec
    from slimdet.hw.cost import model_cost

    spec = load_spec("edge-npu")
    model = copy.deepcopy(fitted_tiny)
    budget = {f"{resource}_ratio": ratio}  # all-4-bit reaches ~0.95 of int8's latency on this tiny model
    r = quantize(model, _cfg(device="edge-npu", candidate_bits=(4, 8), adaround=False, auto_keep=False, **budget),
                 calib=calib, progress=False)  # fmt: skip
    key = "energy_pj" if resource == "energy" else "latency_s"
    usage, limit = r.allocation["usage"][key], r.allocation["budgets"][key]
    assert usage <= limit * (1 + 1e-6)
    assert set(r.weight_bits.values()) == {4, 8}  # the budget forces some 4-bit layers, not all
    # the whole model, re-measured by the cost model, is within the budget relative to uniform W8A8
    table = layer_table(model, model.example_inputs(1), postprocess=False)
    uniform = table.with_bits(weight_bits=8, act_bits=8)
    index = 0 if resource == "latency" else 1
    assert model_cost(table, spec)[index] <= ratio * model_cost(uniform, spec)[index] * (1 + 1e-6)


def test_hardware_budgets_need_a_device():
    with pytest.raises(ValueError, match="need device"):
        QuantConfig(energy_ratio=0.8)
    with pytest.raises(ValueError, match="unknown hardware preset"):
        QuantConfig(device="edge-npv", energy_ratio=0.8)
