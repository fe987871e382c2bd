from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimdet.compress import metainit as mi
from slimdet.compress.metainit import (
    Background,
    MetaInitConfig,
    Task,
    TaskFamily,
    adapt,
    init_from,
    pretrain_union,
    run_metainit,
    steps_to_reach,
)
from slimdet.compress.metainit_tasks import PAD_VALUE, gray, zoom_out
from slimdet.data import load_dataset
from slimdet.errors import CheckpointError, ConfigError
from slimdet.io import load_checkpoint, save_checkpoint
from slimdet.models import create_model


def _cfg(tiny_digits: Path, **kw) -> MetaInitConfig:
    family = TaskFamily(dataset=str(tiny_digits), ways=2, held_out=(8, 9), scales=(0.5, 1.0))
    values = dict(model="yolo-test", input_size=64, family=family, meta_iters=4, inner_steps=2, batch_size=4,
                  checkpoint_every=2)  # fmt: skip
    return MetaInitConfig(**{**values, **kw})


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


def _float_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def test_short_reptile_run_moves_the_init_and_is_deterministic(tiny_digits, tmp_path):
    cfg = _cfg(tiny_digits)
    a = run_metainit(cfg, out_dir=tmp_path / "a", progress=False)
    b = run_metainit(cfg, out_dir=tmp_path / "b", progress=False)
    c = run_metainit(cfg.model_copy(update={"seed": 1}), out_dir=tmp_path / "c", progress=False)
    wa, wb, wc = _weights(a.checkpoint), _weights(b.checkpoint), _weights(c.checkpoint)
    torch.manual_seed(cfg.seed)
    start = create_model("yolo-test", num_classes=2, input_size=64).state_dict()
    keys = _float_keys(wa)
    assert set(wa) == set(start) and all(wa[k].shape == start[k].shape for k in wa)
    moved = [k for k in keys if not torch.equal(wa[k], start[k])]
    assert len(moved) > 0.9 * len(keys)  # Reptile moved (nearly) every weight and statistic
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # same seed: bit-identical
    assert sum(not torch.equal(wa[k], wc[k]) for k in keys) > 0.9 * len(keys)  # other seed: other weights
    payload = load_checkpoint(a.checkpoint)
    assert payload["model"] == {"name": "yolo-test", "num_classes": 2, "input_size": 64}
    assert payload["metainit"]["kind"] == "reptile" and payload["metainit"]["gradient_steps"] == 4 * 2
    assert payload["metainit"]["meta_classes"] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert [h["iteration"] for h in a.history] == [0, 1, 2, 3]


def test_eps_is_annealed_linearly_to_zero(tiny_digits, tmp_path):
    cfg = _cfg(tiny_digits, meta_lr=0.8)
    assert [cfg.epsilon(i) for i in range(4)] == pytest.approx([0.8, 0.6, 0.4, 0.2])
    result = run_metainit(cfg, out_dir=tmp_path, progress=False)
    assert [h["eps"] for h in result.history] == pytest.approx([0.8, 0.6, 0.4, 0.2])


@pytest.mark.parametrize("meta_lr", [1.0, 0.5], ids=["eps1", "eps0.5"])
def test_reptile_step_interpolates_towards_the_adapted_weights(tiny_digits, tmp_path, meta_lr):
    # one outer iteration; with the union's Adam betas the union run is exactly the inner loop W
    cfg = _cfg(tiny_digits, meta_iters=1, meta_lr=meta_lr, inner_beta1=0.9)
    phi = _weights(run_metainit(cfg, out_dir=tmp_path / "reptile", progress=False).checkpoint)
    w = _weights(pretrain_union(cfg, out_dir=tmp_path / "union", progress=False).checkpoint)
    torch.manual_seed(cfg.seed)
    phi0 = create_model("yolo-test", num_classes=2, input_size=64).state_dict()
    for k in phi:
        if phi[k].is_floating_point():
            torch.testing.assert_close(phi[k], phi0[k] + meta_lr * (w[k] - phi0[k]), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(phi[k], w[k])  # counters are copied from the adapted model
    assert sum(not torch.equal(phi[k], phi0[k]) for k in _float_keys(phi)) > 0.9 * len(_float_keys(phi))


@pytest.mark.parametrize("kind", ["reptile", "union"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_digits, tmp_path, monkeypatch, kind):
    cfg = _cfg(tiny_digits, inner_steps=1)
    run = run_metainit if kind == "reptile" else pretrain_union
    full = run(cfg, out_dir=tmp_path / "full", progress=False)

    calls = {"n": 0}
    real_step = mi.train_step

    def interrupting_step(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 4:  # iteration 3 of 4; last.pt holds iterations 0-1
            raise KeyboardInterrupt
        return real_step(*args, **kw)

    monkeypatch.setattr(mi, "train_step", interrupting_step)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, out_dir=tmp_path / "cut", progress=False)
    monkeypatch.setattr(mi, "train_step", real_step)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["metainit_state"]["iteration"] == 2
    assert not (tmp_path / "cut" / "metainit.pt").exists()
    resumed = run(cfg.model_copy(update={"threads": 1}), out_dir=tmp_path / "cut", resume=True, progress=False)

    a, b = _weights(full.checkpoint), _weights(resumed.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def test_resume_refuses_other_settings_or_kind(tiny_digits, tmp_path):
    cfg = _cfg(tiny_digits, meta_iters=2)
    run_metainit(cfg, out_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"last.pt: cannot resume: .*inner_lr: 0.001 -> 0.01"):
        run_metainit(cfg.model_copy(update={"inner_lr": 1e-2}), out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match=r"cannot resume a union run from the state of a reptile run"):
        pretrain_union(cfg, out_dir=tmp_path, resume=True, progress=False)


def test_task_keeps_only_its_classes_remapped_in_order(tiny_digits):
    pool = TaskFamily(dataset=str(tiny_digits), ways=2, held_out=(8, 9)).load("train", input_size=64)
    base = pool.base
    task = Task(classes=(6, 0))
    ds = pool.dataset(task)
    expected = [i for i, r in enumerate(base.records) if {0, 6} & set(r.labels.tolist())]
    assert ds.indices == expected and 0 < len(ds) < len(base)
    for j, i in enumerate(ds.indices):
        _, target = ds[j]
        rec = base.records[i]
        keep = [k for k, lab in enumerate(rec.labels.tolist()) if lab in (6, 0)]
        assert target["labels"].tolist() == [{6: 0, 0: 1}[int(rec.labels[k])] for k in keep]
        torch.testing.assert_close(target["boxes"], base[i][1]["boxes"][keep])  # other digits left unlabelled
    assert ds.class_names == ["6", "0"] and ds.cat_ids == [1, 2]
    gt = ds.coco_gt
    assert len(gt["images"]) == len(ds) and {a["category_id"] for a in gt["annotations"]} == {1, 2}
    assert len(gt["annotations"]) == sum(len(ds[j][1]["labels"]) for j in range(len(ds)))


def test_meta_training_images_hide_the_held_out_objects(tiny_digits):
    family = TaskFamily(dataset=str(tiny_digits), ways=2, held_out=(8, 9))
    pool = family.load("train", input_size=64)
    i = next(i for i, r in enumerate(pool.base.records) if {6, 8} <= set(r.labels.tolist()))
    j = pool.images_of((6,)).index(i)
    shown, hidden = pool.dataset(Task((6, 1))), pool.dataset(Task((6, 1)), erase=family.erased_classes)
    assert family.erased_classes == (8, 9) and family.model_copy(update={"erase_held_out": False}).erased_classes == ()
    (a, ta), (b, tb) = shown[j], hidden[j]
    assert torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])
    x1, y1, x2, y2 = pool.base[i][1]["boxes"][pool.base[i][1]["labels"] == 8][0].round().int().tolist()
    assert torch.all(b[:, y1:y2, x1:x2] == PAD_VALUE / 255) and not torch.all(a[:, y1:y2, x1:x2] == PAD_VALUE / 255)
    changed = (a != b).any(0)
    changed[max(0, y1 - 2) : y2 + 2, max(0, x1 - 2) : x2 + 2] = False
    assert not changed.any()  # nothing outside the held-out box (and its margin) was touched


def test_sampled_tasks_use_meta_classes_in_random_order(tiny_digits):
    import numpy as np

    pool = TaskFamily(dataset=str(tiny_digits), ways=3, held_out=(7, 8, 9)).load("train", input_size=64)
    rng = np.random.default_rng(0)
    tasks = [pool.sample(rng) for _ in range(200)]
    assert all(set(t.classes) <= set(range(7)) and len(set(t.classes)) == 3 for t in tasks)
    assert len({t.classes for t in tasks}) > 60  # orders differ, not only the sets
    assert {t.scale for t in tasks} == {0.6, 0.8, 1.0} and {t.background for t in tasks} == set(Background)


def test_zoom_out_shrinks_image_and_boxes_about_the_centre():
    image = torch.rand(3, 64, 64)
    boxes = torch.tensor([[0.0, 0.0, 64.0, 64.0], [10.0, 20.0, 30.0, 50.0]])
    out, moved = zoom_out(image, boxes, 0.5)
    torch.testing.assert_close(moved, boxes * 0.5 + 16)
    assert out.shape == image.shape
    assert torch.all(out[:, :16] == PAD_VALUE / 255) and torch.all(out[:, :, 48:] == PAD_VALUE / 255)
    torch.testing.assert_close(out[:, 16:48, 16:48].mean(), image.mean(), atol=0.02, rtol=0)
    same, kept = zoom_out(image, boxes, 1.0)
    assert same is image and kept is boxes
    g = gray(image)
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    torch.testing.assert_close(g[0], 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])


def test_task_dataset_applies_scale_and_gray(tiny_digits):
    pool = TaskFamily(dataset=str(tiny_digits), ways=2, held_out=(8, 9)).load("train", input_size=64)
    plain = pool.dataset(Task((6, 0)))
    small = pool.dataset(Task((6, 0), scale=0.5, background=Background.GRAY))
    image, target = small[0]
    _, plain_target = plain[0]
    torch.testing.assert_close(target["boxes"], plain_target["boxes"] * 0.5 + 16)
    assert torch.equal(image[0], image[2]) and target["letterbox"] == (1.0, 0.0, 0.0)
    assert small.coco_gt["annotations"][0]["bbox"][2] == pytest.approx(plain.coco_gt["annotations"][0]["bbox"][2] / 2)


def test_family_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"TaskFamily.held_out: class ids \[3\] are also in meta_classes"):
        TaskFamily(held_out=(3, 9), meta_classes=(0, 1, 2, 3))
    with pytest.raises(ConfigError, match=r"TaskFamily.ways: 4 classes per task but meta_classes has only 3"):
        TaskFamily(ways=4, meta_classes=(0, 1, 2))
    with pytest.raises(ConfigError, match=r"TaskFamily.held_out: expected distinct class ids >= 0, got \[-1\]"):
        TaskFamily(held_out=(-1,))
    with pytest.raises(ConfigError, match=r"TaskFamily.scales: expected zoom-out factors in \(0, 1\], got 1.5"):
        TaskFamily(scales=(1.5,))
    with pytest.raises(ConfigError, match=r"TaskFamily.held_out: class ids \[12\] are not classes of digits-det "
                       r"\(expected ids 0..9\)"):  # fmt: skip
        TaskFamily(held_out=(7, 12)).resolve_meta_classes(10, source="digits-det")
    with pytest.raises(ConfigError, match=r"TaskFamily.ways: 3 classes per task but only 2 meta-training classes"):
        TaskFamily(held_out=tuple(range(8))).resolve_meta_classes(10)
    assert TaskFamily().resolve_meta_classes(10) == (0, 1, 2, 3, 4, 5, 6)


def test_run_refuses_a_model_without_class_rows(tiny_digits, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown model 'yolo-x'"):
        run_metainit(_cfg(tiny_digits, model="yolo-x"), out_dir=tmp_path, progress=False)


def _fake_metainit(path: Path, *, name="yolo-test", ways=3, input_size=64) -> tuple[Path, dict]:
    torch.manual_seed(3)
    model = create_model(name, num_classes=ways, input_size=input_size)
    state = {k: v + torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_checkpoint(path, model_config=model.model_config, state_dict=state, metainit={"kind": "reptile"})
    return path, state


def test_init_from_copies_tensors_and_sets_class_rows_to_the_mean(tmp_path):
    path, meta = _fake_metainit(tmp_path / "m.pt", ways=3)
    model = create_model("yolo-test", num_classes=5, input_size=64)
    result = init_from(model, path)
    own = model.state_dict()
    rows = {f"heads.{i}.cls_pred.{p}" for i in range(3) for p in ("weight", "bias")}
    for k, v in own.items():
        if k in rows:
            assert v.shape[0] == 5 and meta[k].shape[0] == 3
            torch.testing.assert_close(v, meta[k].mean(0, keepdim=True).expand_as(v))
        else:
            assert torch.equal(v, meta[k])
    assert result.mean_rows == ("heads.0.cls_pred", "heads.1.cls_pred", "heads.2.cls_pred")
    assert (result.ways, result.num_classes, result.copied) == (3, 5, len(own) - 6)


def test_init_from_refuses_other_architecture_and_plain_checkpoints(tmp_path):
    path, _ = _fake_metainit(tmp_path / "m.pt", input_size=64)
    with pytest.raises(CheckpointError, match=r"m.pt: metainit checkpoint made for another architecture: "
                       r"input_size: 64 in the checkpoint, 96 in the model"):  # fmt: skip
        init_from(create_model("yolo-test", num_classes=3, input_size=96), path)
    with pytest.raises(CheckpointError, match=r"name: 'yolo-test' in the checkpoint, 'yolo-n' in the model"):
        init_from(create_model("yolo-n", num_classes=3, input_size=64), path)
    model = create_model("yolo-test", num_classes=3, input_size=64)
    plain = save_checkpoint(tmp_path / "plain.pt", model_config=model.model_config, state_dict=model.state_dict())
    with pytest.raises(CheckpointError, match=r"plain.pt: not a metainit checkpoint \(no 'metainit' record\)"):
        init_from(model, plain)


def test_adapt_records_map_curve_and_trains(tiny_digits, tmp_path):
    pool = TaskFamily(dataset=str(tiny_digits), ways=2, held_out=(8, 9)).load("train", input_size=64)
    task = pool.dataset(Task((6, 0)))
    torch.manual_seed(0)
    model = create_model("yolo-test", num_classes=2, input_size=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    curve = adapt(model, task, steps=5, eval_every=2, lr=1e-2, batch_size=4, eval_ds=task)
    assert [s for s, _ in curve] == [0, 2, 4, 5]
    assert all(0.0 <= m <= 1.0 for _, m in curve)
    assert not torch.equal(model.state_dict()["heads.0.cls_pred.weight"], before["heads.0.cls_pred.weight"])
    assert steps_to_reach([(0, 0.1), (25, 0.4), (50, 0.6)], 0.5) == 50
    assert steps_to_reach([(0, 0.1), (25, 0.4)], 0.5) is None
    assert steps_to_reach([(0, 0.7)], 0.5) == 0


def test_task_dataset_is_scored_by_evaluate(tiny_digits, tmp_path):
    from slimdet.evaluate import evaluate

    val = TaskFamily(dataset=str(tiny_digits), ways=2, held_out=(8, 9)).load("val", input_size=64)
    task = val.dataset(Task((0, 3)))
    model = create_model("yolo-test", num_classes=2, input_size=64)
    result = evaluate(model, task, progress=False)
    holding = [r for r in load_dataset(tiny_digits, "val").records if {0, 3} & set(r.labels.tolist())]
    assert result.num_images == len(task) == len(holding) and 0 < len(holding) < 6
    assert set(result.per_class_ap) <= {"0", "3"}
