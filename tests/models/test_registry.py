"""Every registered detector, native or torchvision, on (a tiny) digits-det: train, evaluate, profile."""

import math

import pytest
import torch

from slimdet.data import load_dataset
from slimdet.evaluate import evaluate
from slimdet.models import create_model, list_models, load_model
from slimdet.profile import profile
from slimdet.train import TrainConfig, train


def _input_size(name: str) -> int:
    # the torchvision backbones need a few stride-32 cells; the native models run on the 64 px images
    return 64 if name.startswith("yolo-") else 128


@pytest.mark.parametrize("name", list_models())
def test_trains_one_step_evaluates_and_profiles_on_digits_det(name, tiny_digits, tmp_path):
    size = _input_size(name)
    train_ds = load_dataset(tiny_digits, "train", input_size=size, augment=True)
    val_ds = load_dataset(tiny_digits, "val", input_size=size)
    torch.manual_seed(0)
    model = create_model(name, num_classes=train_ds.num_classes, input_size=size)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    cfg = TrainConfig(epochs=1, batch_size=2, max_steps_per_epoch=1, ema=False, threads=1)
    result = train(model, train_ds, val_ds, cfg, out_dir=tmp_path, progress=False)

    record = result.history[0]
    assert math.isfinite(record["train_loss"]) and 0.0 <= record["val_map50"] <= 1.0
    assert any(not torch.equal(v, before[k]) for k, v in model.named_parameters())
    reloaded, _ = load_model(result.last_checkpoint)
    assert type(reloaded) is type(model)

    metrics = evaluate(model, val_ds, batch_size=3, progress=False)
    assert metrics.num_images == len(val_ds) and 0.0 <= metrics.map <= metrics.map50 <= 1.0
    present = {val_ds.class_names[val_ds.cat_ids.index(a["category_id"])] for a in val_ds.coco_gt["annotations"]}
    assert set(metrics.per_class_ap) == present

    prof = profile(model, batch_sizes=(1,), runs=2, warmup=1, onnx=False, progress=False)
    assert prof.params == sum(p.numel() for p in model.parameters())
    assert prof.macs > 0 and prof.latency_for("torch-eager", 1).median_s > 0
