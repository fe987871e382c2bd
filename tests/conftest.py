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


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests run single-threaded: faster on a shared 2-core machine, and deterministic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
