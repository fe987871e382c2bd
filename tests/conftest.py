"""Shared fixtures: a tiny digits-det built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimdet.data.builtin import DigitsDetConfig, build_digits_det

TINY = DigitsDetConfig(
    image_size=64,
    num_images={"train": 16, "val": 6, "test": 6},
    min_digits=1,
    max_digits=3,
    min_digit_px=16,
    max_digit_px=32,
    seed=7,
)


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the data.yaml of a 64x64, 16/6/6-image digits-det."""
    return build_digits_det(TINY, cache_dir=tmp_path_factory.mktemp("digits"), progress=False)


@pytest.fixture(scope="session")
def tiny_test_ds(tiny_digits: Path):
    from slimdet.data import load_dataset

    return load_dataset(tiny_digits, "test", input_size=64)


@pytest.fixture(scope="session")
def fitted_tiny(tiny_test_ds):
    """yolo-test fitted for a few steps on the tiny test images, so that its mAP is far from 0 and from 1.

    Shared and read-only: tests that change a model deep-copy it first.
    """
    from slimdet.data.dataset import collate
    from slimdet.models import create_model

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("yolo-test", num_classes=10, input_size=64)
    images, targets = collate([tiny_test_ds[i] for i in range(len(tiny_test_ds))])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    model.train()
    for _ in range(25):
        loss, _ = model.compute_loss(images, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(before)
    return model.eval()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests run single-threaded: faster on a shared 2-core machine, and deterministic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
