import os

import pytest
import torch

from slimdet.errors import CheckpointError
from slimdet.io import atomic_write, load_checkpoint, save_checkpoint
from slimdet.models import create_model, load_model


def _save(path, name="yolo-test", num_classes=3):
    model = create_model(name, num_classes=num_classes, input_size=64)
    return save_checkpoint(path, model_config=model.model_config, state_dict=model.state_dict(), epoch=4), model


def test_round_trip_rebuilds_the_same_model(tmp_path):
    path, model = _save(tmp_path / "m.pt")
    rebuilt, payload = load_model(path)
    assert payload["epoch"] == 4 and payload["model"] == {"name": "yolo-test", "num_classes": 3, "input_size": 64}
    x = torch.rand(1, 3, 64, 64)
    for a, b in zip(model.eval()(x), rebuilt.eval()(x), strict=True):
        assert torch.equal(a, b)
    assert torch.load(path, weights_only=True)["format"] == "slimdet-checkpoint"


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    junk = tmp_path / "notes.pt"
    junk.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pt: not a loadable slimdet checkpoint"):
        load_checkpoint(junk)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="plain.pt: not a slimdet checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(CheckpointError, match="missing.pt: checkpoint file not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path, _ = _save(tmp_path / "m.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="m.pt: not a loadable slimdet checkpoint"):
        load_checkpoint(path)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_malicious_pickle_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": "slimdet-checkpoint", "model": {}, "state_dict": {}, "x": _Payload()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_checkpoint_for_another_architecture_names_the_mismatch(tmp_path):
    path, _ = _save(tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["model"] = {"name": "yolo-n", "num_classes": 3, "input_size": 64}
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="does not match model 'yolo-n'"):
        load_model(path)


def test_atomic_write_leaves_the_old_file_and_no_temp_file_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def fail(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_recorded_transforms_are_replayed_when_loading(tmp_path, monkeypatch):
    from torch import nn

    from slimdet.models.registry import REPLAYERS, record_transform

    def replay(model, entry):
        model.extra = nn.Linear(entry["n"], 1)  # a structural change the state dict depends on
        return model

    monkeypatch.setitem(REPLAYERS._items, "test-grow", replay)
    model = create_model("yolo-test", num_classes=3, input_size=64)
    model = replay(model, {"n": 5})
    record_transform(model, {"kind": "test-grow", "n": 5})
    path = save_checkpoint(tmp_path / "m.pt", model_config=model.model_config, state_dict=model.state_dict())
    rebuilt, _ = load_model(path)
    assert rebuilt.extra.in_features == 5 and torch.equal(rebuilt.extra.weight, model.extra.weight)
    assert rebuilt.model_config["transforms"] == [{"kind": "test-grow", "n": 5}]
