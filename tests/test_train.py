import copy
import json

import pytest
import torch

from slimdet.data import load_dataset
from slimdet.errors import CheckpointError
from slimdet.io import load_checkpoint
from slimdet.models import create_model, load_model
from slimdet.train import TrainConfig, _lr_factor, train
from tests._crashing import Crashing, Interrupt

CFG = TrainConfig(epochs=3, batch_size=4, lr=3e-3, warmup_epochs=0.5, max_steps_per_epoch=2, eval_every=1, threads=1)


@pytest.fixture(scope="module")
def data(tiny_digits):
    train_ds = load_dataset(tiny_digits, "train", input_size=64, augment=True, cache_images=True)
    val_ds = load_dataset(tiny_digits, "val", input_size=64)
    return train_ds, val_ds


def _model():
    torch.manual_seed(0)
    return create_model("yolo-test", num_classes=10, input_size=64)


def test_train_writes_checkpoints_history_and_changes_weights(data, tmp_path):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, *data, CFG, out_dir=tmp_path, progress=False)
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert all("val_map50" in h and "train_loss" in h for h in result.history)
    assert result.best_checkpoint is not None and result.best_checkpoint.is_file()
    assert (tmp_path / "history.json").is_file()
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert len(changed) > 10
    # the checkpoint is plain data: loads with weights_only=True and rebuilds the same model
    payload = torch.load(result.last_checkpoint, weights_only=True)
    assert payload["model"]["name"] == "yolo-test"
    rebuilt, _ = load_model(result.last_checkpoint)
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(rebuilt.eval()(x)[0], model.eval()(x)[0])


def test_resume_after_interruption_matches_an_uninterrupted_run(data, tmp_path):
    train_ds, val_ds = data
    full = _model()
    train(full, train_ds, val_ds, CFG, out_dir=tmp_path / "full", progress=False)

    crashed = _model()
    reads_per_epoch = CFG.max_steps_per_epoch * CFG.batch_size
    with pytest.raises(Interrupt):  # dies in the middle of the second epoch
        train(crashed, Crashing(train_ds, reads_per_epoch + 3), val_ds, CFG, out_dir=tmp_path / "cut", progress=False)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["train_state"]["epoch"] == 0

    resumed = _model()
    result = train(resumed, train_ds, val_ds, CFG, out_dir=tmp_path / "cut", resume=True, progress=False)
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_resume_refuses_a_checkpoint_of_another_model(data, tmp_path):
    train(_model(), *data, CFG.model_copy(update={"epochs": 1}), out_dir=tmp_path, progress=False)
    other = create_model("yolo-test", num_classes=3, input_size=64)
    with pytest.raises(CheckpointError, match="cannot resume"):
        train(other, *data, CFG, out_dir=tmp_path, resume=True, progress=False)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = [_lr_factor(s, 10, 100, 0.05) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:], strict=False))
    assert factors[-1] == pytest.approx(0.05, abs=1e-3)


def test_unknown_option_is_rejected():
    with pytest.raises(ValueError, match="epoch"):
        TrainConfig(epoch=3)


def test_loss_curve_logs_every_term_about_ten_times_per_epoch(data, tmp_path):
    cfg = CFG.model_copy(update={"epochs": 2, "max_steps_per_epoch": 3, "eval_every": 0})
    result = train(_model(), *data, cfg, out_dir=tmp_path, progress=False)
    assert [p["step"] for p in result.loss_curve] == [1, 2, 3, 4, 5, 6]  # 3 steps per epoch: one point per step
    assert all({"loss", "box", "cls", "dfl"} <= set(p) for p in result.loss_curve)
    assert result.loss_curve == json.loads((tmp_path / "loss_curve.json").read_text())


def _distiller(student):
    from slimdet.compress.distill import DistillConfig, Distiller

    torch.manual_seed(5)
    teacher = create_model("yolo-test", num_classes=10, input_size=64).eval()
    return Distiller(student, teacher, DistillConfig())


def test_distilled_training_logs_kd_terms_trains_adapters_and_resumes_exactly(data, tmp_path, monkeypatch):
    from slimdet.compress import PruneConfig, prune

    train_ds, val_ds = data

    def student():
        model = _model()
        prune(model, PruneConfig(ratio=0.5, importance="l1"), calib=[train_ds[0][0][None], [train_ds[0][1]]],
              progress=False)  # fmt: skip
        return model

    full = student()
    with _distiller(full) as d:
        adapters_before = {k: v.clone() for k, v in d.state_dict().items() if torch.is_tensor(v)}
        result = train(full, train_ds, val_ds, CFG, out_dir=tmp_path / "full", progress=False, distiller=d)
        adapters_after = {k: v for k, v in d.state_dict().items() if torch.is_tensor(v)}
    assert adapters_before and any(not torch.equal(adapters_before[k], adapters_after[k]) for k in adapters_before)
    assert all({"train_kd_cls", "train_kd_box", "train_kd_feat", "train_det"} <= set(h) for h in result.history)

    crashed = student()
    reads_per_epoch = CFG.max_steps_per_epoch * CFG.batch_size
    with _distiller(crashed) as d, pytest.raises(Interrupt):
        train(crashed, Crashing(train_ds, reads_per_epoch + 3), val_ds, CFG, out_dir=tmp_path / "cut",
              progress=False, distiller=d)  # fmt: skip
    resumed = student()
    with _distiller(resumed) as d:
        train(resumed, train_ds, val_ds, CFG, out_dir=tmp_path / "cut", resume=True, progress=False, distiller=d)
        for k, v in adapters_after.items():  # the adapters came back from last.pt and trained on
            torch.testing.assert_close(d.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    # a run that started without distillation cannot be resumed with it
    plain = student()
    train(plain, train_ds, val_ds, CFG.model_copy(update={"epochs": 1}), out_dir=tmp_path / "plain", progress=False)
    with _distiller(student()) as d, pytest.raises(CheckpointError, match="started without distillation"):
        train(student(), train_ds, val_ds, CFG, out_dir=tmp_path / "plain", resume=True, progress=False, distiller=d)


def test_reconstruction_runs_once_at_the_start_of_a_distilled_run_and_not_on_resume(data, tmp_path):
    from slimdet.compress import PruneConfig, prune
    from slimdet.compress.distill import DistillConfig, Distiller

    train_ds, val_ds = data
    teacher = _model()
    with torch.no_grad():  # distinct batch-norm parameters, as in a trained model, so pruned channels can be matched
        g = torch.Generator().manual_seed(1)
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for t in (m.weight, m.bias, m.running_mean, m.running_var):
                    t.copy_(t + 0.1 * torch.rand(t.shape, generator=g))
    teacher.eval()

    def student():
        model = copy.deepcopy(teacher).train().requires_grad_(True)  # the distiller froze the teacher's
        prune(model, PruneConfig(ratio=0.5, importance="l1"), calib=[train_ds[0][0][None], [train_ds[0][1]]],
              progress=False)  # fmt: skip
        return model

    pruned = {k: v.clone() for k, v in student().state_dict().items()}
    cfg = DistillConfig(reconstruct_batches=2)
    full = student()
    with Distiller(full, teacher, cfg) as d:
        train(full, train_ds, val_ds, CFG, out_dir=tmp_path / "full", progress=False, distiller=d)
        assert d.reconstruction and any(before > after for before, after in d.reconstruction.values())
    crashed = student()
    with Distiller(crashed, teacher, cfg) as d, pytest.raises(Interrupt):
        # the refit reads 2 batches, epoch 1 reads its own: the crash comes in epoch 2, after last.pt
        train(crashed, Crashing(train_ds, (2 + CFG.max_steps_per_epoch) * CFG.batch_size + 3), val_ds, CFG,
              out_dir=tmp_path / "cut", progress=False, distiller=d)  # fmt: skip
    resumed = student()
    with Distiller(resumed, teacher, cfg) as d:
        train(resumed, train_ds, val_ds, CFG, out_dir=tmp_path / "cut", resume=True, progress=False, distiller=d)
        assert d.reconstruction == {}  # the refit weights came from last.pt: refitting them again would differ
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    # without it (the same run otherwise) the weights end elsewhere: the refit changed the start
    off = student()
    with Distiller(off, teacher, cfg.model_copy(update={"reconstruct_batches": 0})) as d:
        train(off, train_ds, val_ds, CFG, out_dir=tmp_path / "off", progress=False, distiller=d)
    ends = zip(off.state_dict().values(), full.state_dict().values(), strict=True)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in ends)
    assert any(not torch.equal(pruned[k], v) for k, v in full.state_dict().items())
