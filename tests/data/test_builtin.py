import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from slimdet.data import load_dataset
from slimdet.data.builtin import DigitsDetConfig, build_digits_det, digit_pools
from tests.conftest import TINY


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    a = build_digits_det(TINY, cache_dir=tmp_path / "a", progress=False).parent
    b = build_digits_det(TINY, cache_dir=tmp_path / "b", progress=False).parent
    bytes_a = _all_bytes(a)
    assert len(bytes_a) == 16 + 6 + 6 + 3 + 2  # images, 3 annotation files, meta.json, data.yaml
    assert bytes_a == _all_bytes(b)
    c = build_digits_det(replace(TINY, seed=8), cache_dir=tmp_path / "c", progress=False).parent
    assert _all_bytes(c)["images/train/000001.png"] != bytes_a["images/train/000001.png"]


def test_pools_of_default_config_are_disjoint_and_cover_all_digits():
    pools = digit_pools(DigitsDetConfig())
    sets = {k: set(v.tolist()) for k, v in pools.items()}
    assert not sets["test"] & (sets["train"] | sets["val"])
    assert not sets["train"] & sets["val"]
    assert sum(len(s) for s in sets.values()) == 1797
    assert len(sets["train"]) == round(0.7 * 1797)


def test_no_test_scene_uses_a_train_or_val_digit(tiny_digits):
    root = tiny_digits.parent
    used = {}
    for split in ("train", "val", "test"):
        coco = json.loads((root / "annotations" / f"{split}.json").read_text())
        used[split] = {a["source_digit"] for a in coco["annotations"]}
        assert used[split], split
    assert not used["test"] & (used["train"] | used["val"])
    pools = json.loads((root / "meta.json").read_text())["digit_pools"]
    for split in used:
        assert used[split] <= set(pools[split])


def test_boxes_are_ink_extent_inside_image_and_sizes_in_range(tiny_digits):
    ds = load_dataset(tiny_digits, "train", input_size=64)
    counts = []
    for i in range(len(ds)):
        image, target = ds[i]
        boxes = target["boxes"]
        counts.append(len(boxes))
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 64).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) > 0).all()
        # ink extent: a box never exceeds the largest digit sprite
        assert (boxes[:, 3] - boxes[:, 1]).max() <= TINY.max_digit_px
        # the image is not flat under the box (there is ink)
        x0, y0, x1, y1 = boxes[0].round().int().tolist()
        assert image[:, y0:y1, x0:x1].std() > 0.02
    assert min(counts) >= TINY.min_digits and max(counts) <= TINY.max_digits
    assert set(np.unique(np.concatenate([ds[i][1]["labels"].numpy() for i in range(len(ds))]))) <= set(range(10))


def test_built_in_name_resolves_through_the_registry(tiny_digits, tmp_path, monkeypatch):
    import slimdet.data.builtin as builtin

    calls = []
    monkeypatch.setattr(builtin, "build_digits_det", lambda cache_dir=None: calls.append(cache_dir) or tiny_digits)
    ds = load_dataset("digits-det", "val", input_size=64, cache_dir=tmp_path)
    assert len(ds) == 6 and ds.class_names == [str(d) for d in range(10)]
    assert calls == [tmp_path]


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="min_digits"):
        DigitsDetConfig(min_digits=3, max_digits=2)
