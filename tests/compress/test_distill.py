"""Detection distillation: loss terms, adapters, compressed and quantized students, the training loop."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError

from slimdet.compress import PruneConfig, QuantConfig, prune, quantize
from slimdet.compress.distill import (
    DistillConfig,
    Distiller,
    _Taps,
    box_distill_loss,
    cls_distill_loss,
    feature_loss,
    foreground_masks,
)
from slimdet.errors import ConfigError
from slimdet.models import create_model

SIZE = 64
TARGETS = [
    {"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0]]), "labels": torch.tensor([1])},
    {"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0], [2.0, 2.0, 20.0, 30.0]]), "labels": torch.tensor([0, 2])},
]


def images(seed: int = 3) -> torch.Tensor:
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def teacher(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("yolo-test", num_classes=3, input_size=SIZE)
    # a few steps so that scores and box distributions are not at their initial values
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss, _ = model.compute_loss(images(), TARGETS)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_student_identical_to_teacher_has_zero_distillation_loss():
    t = teacher()
    student = copy.deepcopy(t).eval()  # eval: batch-norm as in the teacher, so the outputs are identical
    with Distiller(student, t, DistillConfig()) as d:
        loss, parts = d(student, images(), TARGETS)
        assert len(d.adapters) == 0
    assert parts["kd_cls"] < 1e-6 and parts["kd_box"] < 1e-6 and parts["kd_feat"] < 1e-10
    assert parts["det"] > 0.1  # the detection loss is still there ...
    assert loss.item() == pytest.approx(parts["det"], rel=1e-5)  # ... and is all of the loss


def test_distillation_terms_are_positive_and_pull_a_different_student():
    t = teacher()
    torch.manual_seed(1)
    student = create_model("yolo-test", num_classes=3, input_size=SIZE).train()
    with Distiller(student, t, DistillConfig(det=0.0)) as d:
        _, first = d(student, images(), TARGETS)
        assert min(first["kd_cls"], first["kd_box"], first["kd_feat"]) > 1e-4
        opt = torch.optim.Adam(list(student.parameters()) + list(d.parameters()), lr=5e-3)
        for _ in range(15):
            loss, _ = d(student, images(), TARGETS)
            opt.zero_grad()
            loss.backward()
            opt.step()
        student.eval()
        _, last = d(student, images(), TARGETS)
    kd_first = first["kd_cls"] + first["kd_box"] + first["kd_feat"]
    assert last["kd_cls"] + last["kd_box"] + last["kd_feat"] < 0.5 * kd_first


def test_adapters_only_where_channels_differ_and_they_train():
    t = teacher()
    student = copy.deepcopy(t)
    prune(student, PruneConfig(ratio=0.5, importance="l1"), calib=[(images(), TARGETS)], progress=False)
    s_feats = [student.get_submodule(n).weight.shape[1] for n in student.feature_layers()]
    t_feats = [t.get_submodule(n).weight.shape[1] for n in t.feature_layers()]
    differ = {str(i) for i, (a, b) in enumerate(zip(s_feats, t_feats, strict=True)) if a != b}
    assert differ  # pruning narrowed at least one neck output
    student.train()
    with Distiller(student, t, DistillConfig()) as d:
        assert set(d.adapters.keys()) == differ
        for key, conv in d.adapters.items():
            assert (conv.in_channels, conv.out_channels) == (s_feats[int(key)], t_feats[int(key)])
        loss, parts = d(student, images(), TARGETS)
        loss.backward()
        assert all(conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0 for conv in d.adapters.values())
    assert parts["kd_feat"] > 0
    # the adapters start the same whatever used the random generator before
    torch.manual_seed(123)
    torch.rand(7)
    with Distiller(student, t, DistillConfig()) as again:
        assert all(torch.equal(v, again.state_dict()[k]) for k, v in d.state_dict().items() if torch.is_tensor(v))
    with Distiller(student, t, DistillConfig(seed=1)) as other:
        assert not all(torch.equal(v, other.state_dict()[k]) for k, v in d.state_dict().items() if torch.is_tensor(v))
    # no feature term: no adapters either
    with Distiller(student, t, DistillConfig(feat=0.0)) as d:
        assert len(d.adapters) == 0


def test_fitted_adapters_are_the_least_squares_map_and_beat_the_random_start():
    t = teacher()
    student = copy.deepcopy(t)
    prune(student, PruneConfig(ratio=0.5, importance="l1"), calib=[(images(), TARGETS)], progress=False)
    batches = [(images(seed), TARGETS) for seed in (11, 12, 13)]

    def residuals(d: Distiller) -> dict[str, float]:  # ||A(s) - t||^2 / ||t - mean t||^2, measured directly
        mapped: dict[str, list[torch.Tensor]] = {k: [] for k in d.adapters}
        target: dict[str, list[torch.Tensor]] = {k: [] for k in d.adapters}
        with torch.no_grad():
            for x, _ in batches:
                with d._teacher_taps.capture(True):
                    t(x)
                with d._student_taps.capture(True):
                    student(x)
                for key, adapter in d.adapters.items():
                    mapped[key].append(adapter(d._student_taps.features[int(key)]).double())
                    target[key].append(d._teacher_taps.features[int(key)].double())
        out = {}
        for key in d.adapters:
            a, b = torch.cat(mapped[key]), torch.cat(target[key])
            out[key] = float((a - b).pow(2).sum() / (b - b.mean((0, 2, 3), keepdim=True)).pow(2).sum())
        return out

    student.train()
    with Distiller(student, t, DistillConfig()) as d:
        student.eval()
        random_start = residuals(d)
        student.train()
        reported = d.fit_adapters(student, batches)
        assert student.training  # its mode is given back
        student.eval()
        fitted = residuals(d)
    assert set(reported) == set(d.adapters.keys()) and reported
    for key in reported:
        assert reported[key] == pytest.approx(fitted[key], rel=1e-3, abs=1e-6)
        assert fitted[key] < random_start[key]
        assert fitted[key] < 1.0  # better than predicting the teacher's mean feature


def test_layer_imitation_matches_pruned_channels_and_survives_a_resume():
    from slimdet.compress.distill import matched_channels

    t = teacher()
    student = copy.deepcopy(t)
    prune(student, PruneConfig(ratio=0.5, importance="l1"), calib=[(images(), TARGETS)], progress=False)
    found = matched_channels(student, t)
    bns = {n: m for n, m in student.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert set(found) == set(bns)  # every batch norm of a pruned copy is a channel subset of the teacher's
    narrowed = [n for n, idx in found.items() if len(idx) < t.get_submodule(n).num_features]
    assert narrowed
    for name, index in found.items():
        assert torch.equal(bns[name].weight, t.get_submodule(name).weight[index])
        assert torch.equal(bns[name].running_var, t.get_submodule(name).running_var[index])
    assert matched_channels(student, teacher(seed=5)) == {}  # an unrelated teacher matches nothing

    same = copy.deepcopy(t).eval()
    with Distiller(same, t, DistillConfig(layers=1.0)) as d:
        _, parts = d(same, images(), TARGETS)
    assert parts["kd_layers"] < 1e-8  # the teacher's own copy imitates it exactly

    student.train()
    with Distiller(student, t, DistillConfig(layers=1.0)) as d:
        loss, parts = d(student, images(), TARGETS)
        assert parts["kd_layers"] > 1e-3
        loss.backward()
        saved = copy.deepcopy(d.state_dict())
    with torch.no_grad():  # training moves the student's batch norms: a new map would find nothing ...
        for m in bns.values():
            m.weight.mul_(1.1)
    with Distiller(student, t, DistillConfig(layers=1.0)) as resumed:
        assert resumed.layer_map == {}
        resumed.load_state_dict(saved)  # ... so a resumed run takes the map it started with
        assert {n: i.tolist() for n, i in resumed.layer_map.items()} == {n: i.tolist() for n, i in found.items()}
        _, parts = resumed(student, images(), TARGETS)
        assert parts["kd_layers"] > 0
    with Distiller(student, t, DistillConfig()) as off:
        _, parts = off(student, images(), TARGETS)
        assert off.layer_map == {} and "kd_layers" not in parts


def test_quantized_student_distills_and_its_step_sizes_get_gradients():
    t = teacher()
    student = copy.deepcopy(t)
    quantize(student, QuantConfig(qat=True, auto_keep=False, runtime_aware=False), calib=[(images(), TARGETS)])
    student.train()
    with Distiller(student, t, DistillConfig()) as d:
        loss, parts = d(student, images(), TARGETS)
        loss.backward()
    assert torch.isfinite(loss) and parts["kd_feat"] > 0  # fake quantization makes the student differ a little
    grads = [p.grad for n, p in student.named_parameters() if "quant" in n and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_hooks_are_removed_on_close():
    t = teacher()
    student = copy.deepcopy(t)
    names = student.feature_layers()
    with Distiller(student, t, DistillConfig()):
        assert all(len(student.get_submodule(n)._forward_pre_hooks) == 1 for n in names)
    assert all(len(student.get_submodule(n)._forward_pre_hooks) == 0 for n in names)
    assert all(len(t.get_submodule(n)._forward_pre_hooks) == 0 for n in names)


def test_cls_loss_is_binary_kl_times_t_squared():
    s, t_ = torch.tensor([[[0.5, -1.0]]]), torch.tensor([[[2.0, -3.0]]])
    temp = 2.0
    p, q = torch.sigmoid(t_ / temp), torch.sigmoid(s / temp)
    kl = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).sum()
    expected = kl * temp * temp / torch.sigmoid(t_).amax(-1).sum().clamp(min=1.0)
    assert cls_distill_loss(s, t_, temp).item() == pytest.approx(expected.item(), rel=1e-5)
    assert cls_distill_loss(t_, t_, temp).item() == pytest.approx(0.0, abs=1e-7)


def test_box_loss_weights_anchors_and_is_zero_without_weight():
    g = torch.Generator().manual_seed(0)
    s, t_ = torch.randn(1, 3, 4, 8, generator=g), torch.randn(1, 3, 4, 8, generator=g)
    only_first = box_distill_loss(s, t_, torch.tensor([[1.0, 0.0, 0.0]]), 1.0)
    kl0 = (t_[0, 0].softmax(-1) * (t_[0, 0].log_softmax(-1) - s[0, 0].log_softmax(-1))).sum(-1).mean()
    assert only_first.item() == pytest.approx(kl0.item(), rel=1e-5)
    assert box_distill_loss(s, t_, torch.zeros(1, 3), 1.0).item() == 0.0


def test_feature_loss_splits_weight_between_objects_and_background():
    fg = torch.zeros(1, 2, 2, dtype=torch.bool)
    fg[0, 0, 0] = True
    t_ = torch.zeros(1, 1, 2, 2)
    s_fg = t_.clone()
    s_fg[0, 0, 0, 0] = 1.0  # error only on the one object cell
    s_bg = t_.clone()
    s_bg[0, 0, 1, 1] = 1.0  # error on one of three background cells
    assert feature_loss(s_fg, t_, fg, fg_share=0.7).item() == pytest.approx(0.7)
    assert feature_loss(s_bg, t_, fg, fg_share=0.7).item() == pytest.approx(0.3 / 3)
    with pytest.raises(ConfigError, match="differ"):
        feature_loss(torch.zeros(1, 2, 2, 2), t_, fg, fg_share=0.5)


def test_foreground_masks_mark_cells_inside_boxes():
    points = torch.tensor([[4.0, 4.0], [12.0, 4.0], [4.0, 12.0], [12.0, 12.0], [8.0, 8.0]])  # a 2x2 level, a 1x1 level
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([0])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]  # fmt: skip
    m2, m1 = foreground_masks(targets, points, [(2, 2), (1, 1)], device=torch.device("cpu"))
    assert m2[0].tolist() == [[True, False], [False, False]] and m1[0].tolist() == [[True]]
    assert not m2[1].any() and not m1[1].any()


def test_mismatched_teacher_and_unsupported_models_are_refused():
    t = teacher()
    other = create_model("yolo-test", num_classes=5, input_size=SIZE)
    with pytest.raises(ConfigError, match="num_classes is 3 but the student's is 5"):
        Distiller(other, t, DistillConfig())
    ssd = create_model("ssdlite320_mobilenet_v3_large", num_classes=3, input_size=SIZE)
    with pytest.raises(ConfigError, match="supports the yolo"):
        Distiller(ssd, t, DistillConfig())
    with pytest.raises(ValidationError):
        DistillConfig(temperature=0)
    with pytest.raises(ValidationError):
        DistillConfig(kd_weight=1.0)


def test_decomposed_student_is_tapped_at_its_first_factor_and_needs_no_adapter():
    from slimdet.compress import LowRankConfig, decompose

    t = teacher()
    student = copy.deepcopy(t)
    result = decompose(student, LowRankConfig(macs_reduction=0.3))
    factorised = {layer.name for layer in result.layers}
    assert "heads.0.box.0.0" in factorised
    # the factorised conv became a sequence: its first factor reads the neck feature
    assert student.feature_layers()[0] == "heads.0.box.0.0.0"
    student.train()
    with Distiller(student, t, DistillConfig()) as d:
        assert len(d.adapters) == 0  # decomposition keeps every layer's input and output width
        loss, parts = d(student, images(), TARGETS)
        loss.backward()
    assert torch.isfinite(loss) and parts["kd_feat"] > 0
    first = student.get_submodule("heads.0.box.0.0.0").weight
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_teacher_assignment_uses_the_teachers_predictions_for_the_detection_targets():
    t = teacher()
    torch.manual_seed(1)
    student = create_model("yolo-test", num_classes=3, input_size=SIZE).eval()
    x = images()
    raw = student(x)
    own, _ = student.loss(raw, TARGETS)
    box, cls, points, strides = student.split_raw(raw)
    from slimdet.models.yolo_loss import decode_distances, pad_targets

    def assigned(scores: torch.Tensor, box_logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        gt = pad_targets(TARGETS, device=scores.device)
        return student.criterion.assign(scores, decode_distances(box_logits, points, strides), points, *gt)

    # targets assigned on the student's own predictions: the plain detection loss
    same, _ = student.loss(raw, TARGETS, assigned=assigned(cls.sigmoid(), box))
    assert same.item() == pytest.approx(own.item(), rel=1e-6)
    t_box, t_cls, _, _ = t.split_raw(t(x))
    by_teacher, _ = student.loss(raw, TARGETS, assigned=assigned(t_cls.sigmoid(), t_box))
    with Distiller(student, t, DistillConfig(assign="teacher", cls=0, box=0, feat=0, layers=0)) as d:
        loss, parts = d(student, x, TARGETS)
    assert parts["det"] == pytest.approx(by_teacher.item(), rel=1e-6)
    # the teacher's assignment differs from the student's (float noise would be ~1e-7)
    assert abs(by_teacher.item() - own.item()) > 1e-4 * own.item()
    with pytest.raises(ValidationError):
        DistillConfig(assign="nobody")


def test_reconstruction_refits_pruned_convs_to_the_teachers_outputs():
    t = teacher()
    student = copy.deepcopy(t)
    prune(student, PruneConfig(ratio=0.5, importance="l1"), calib=[(images(), TARGETS)], progress=False)
    batches = [(images(seed), TARGETS) for seed in (11, 12, 13)]

    def residuals(d: Distiller) -> dict[str, float]:
        """Measured after the fact at the batch norms' inputs (the convs' outputs z) in eval mode: the fitted shift
        c went into the running mean (teacher's mean - student's), so the error is ||z + c - z_t[kept]||^2,
        relative to the teacher's variance."""
        names = list(d.reconstruction)
        s_taps, t_taps = (_Taps(m, names) for m in (student, t))
        err = dict.fromkeys(names, 0.0)
        sq, tot, n = (dict.fromkeys(names, 0.0) for _ in range(3))
        with torch.no_grad():
            for x, _ in batches:
                with s_taps.capture(True), t_taps.capture(True):
                    student(x), t(x)
                for i, name in enumerate(names):
                    index = d.layer_map[name]
                    shift = t.get_submodule(name).running_mean[index] - student.get_submodule(name).running_mean
                    zt = t_taps.features[i][:, index].double()
                    e = s_taps.features[i].double() + shift.double()[None, :, None, None] - zt
                    err[name] += float(e.pow(2).sum())
                    sq[name] += zt.pow(2).sum(dim=(0, 2, 3))
                    tot[name] += zt.sum(dim=(0, 2, 3))
                    n[name] += zt.shape[0] * zt.shape[2] * zt.shape[3]
        s_taps.close()
        t_taps.close()
        return {k: err[k] / float((sq[k] - tot[k].pow(2) / n[k]).sum()) for k in names}

    student.eval()
    with Distiller(student, t, DistillConfig(reconstruct_batches=3)) as d:
        d.prepare(student, iter(batches))
        assert set(d.reconstruction) == set(d.layer_map)  # every layer of yolo-test is conv -> batch norm
        measured = residuals(d)
    narrowed_inputs = [k for k, (before, after) in d.reconstruction.items() if before > 1e-6]
    assert narrowed_inputs
    for name, (before, after) in d.reconstruction.items():
        assert after <= before
        assert measured[name] == pytest.approx(after, rel=1e-3, abs=1e-6)  # the merge computes what was fitted
    assert sum(a for _, a in d.reconstruction.values()) < 0.8 * sum(b for b, _ in d.reconstruction.values())

    same = copy.deepcopy(t).train()  # nothing to reconstruct in the teacher's own copy: its state stays as it is
    with Distiller(same, t, DistillConfig(reconstruct_batches=3)) as d:
        d.prepare(same, iter(batches))
        assert max(b for b, _ in d.reconstruction.values()) < 1e-10
    assert all(torch.equal(v, t.state_dict()[k]) for k, v in same.state_dict().items())
