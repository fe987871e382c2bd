from __future__ import annotations

import numpy as np
import pytest
import torch

from slimdet.data import Augment, DetectionDataset, RecordSet, collate, load_dataset, make_loader, unletterbox
from slimdet.errors import DatasetError


@pytest.fixture
def ds(coco_dataset) -> DetectionDataset:
    return load_dataset(coco_dataset(), "train", input_size=64)


def test_item_follows_the_contract(ds):
    assert len(ds) == 3 and ds.input_size == 64 and ds.num_classes == 2
    assert ds.class_names == ["square", "bar"] and ds.cat_ids == [1, 2] and ds.image_ids == [1, 2, 3]
    assert ds.source.endswith("train.json")
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert set(target) == {"boxes", "labels", "image_id", "orig_size", "letterbox"}
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["image_id"] == 1 and target["orig_size"] == (48, 64)
    assert target["letterbox"] == (1.0, 0.0, 8.0)
    np.testing.assert_allclose(target["boxes"].numpy(), [[4, 14, 24, 24], [30, 28, 46, 52]])
    # the boxes sit on the white rectangles in the network input
    x1, y1, x2, y2 = target["boxes"][1].int().tolist()
    assert (image[:, y1:y2, x1:x2] == 1.0).all() and image[:, y1 - 1, x1 - 1].max() < 0.5


def test_targets_map_back_to_coco_gt(ds):
    for i in range(len(ds)):
        _, target = ds[i]
        anns = [a for a in ds.coco_gt["annotations"] if a["image_id"] == target["image_id"]]
        orig = unletterbox(target["boxes"], target["letterbox"])
        xywh = [[x1, y1, x2 - x1, y2 - y1] for x1, y1, x2, y2 in orig.tolist()]
        np.testing.assert_allclose(np.reshape(xywh, (-1, 4)), np.reshape([a["bbox"] for a in anns], (-1, 4)), atol=1e-4)
        assert [ds.cat_ids[int(lab)] for lab in target["labels"]] == [a["category_id"] for a in anns]


def test_collate_stacks_images_and_keeps_targets(ds):
    images, targets = collate([ds[0], ds[1], ds[2]])
    assert images.shape == (3, 3, 64, 64) and [t["image_id"] for t in targets] == [1, 2, 3]
    assert [t["boxes"].shape for t in targets] == [(2, 4), (1, 4), (0, 4)]


def test_loader_shuffles_reproducibly_from_seed(ds):
    def order(seed: int) -> list[int]:
        return [t["image_id"] for _, ts in make_loader(ds, batch_size=2, shuffle=True, seed=seed) for t in ts]

    orders = {tuple(order(s)) for s in range(8)}
    assert order(3) == order(3) and len(orders) > 1 and all(sorted(o) == [1, 2, 3] for o in orders)
    batches = list(make_loader(ds, batch_size=2, shuffle=False, drop_last=True))
    assert len(batches) == 1 and batches[0][0].shape == (2, 3, 64, 64)


def test_augmentation_follows_torch_seed(coco_dataset):
    ds = load_dataset(coco_dataset(), "train", input_size=64, augment=True)
    assert ds.augment == Augment()
    torch.manual_seed(0)
    a = ds[0]
    torch.manual_seed(0)
    b = ds[0]
    c = ds[0]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    assert not torch.equal(a[0], c[0])


def test_cached_images_equal_uncached(coco_dataset):
    yaml_path = coco_dataset()
    plain = load_dataset(yaml_path, "train", input_size=48)
    cached = load_dataset(yaml_path, "train", input_size=48, cache_images=True)
    for i in range(len(plain)):
        assert torch.equal(plain[i][0], cached[i][0])
        assert torch.equal(plain[i][1]["boxes"], cached[i][1]["boxes"])
    (yaml_path.parent / "images/train/a.png").unlink()  # the cache no longer needs the file
    assert torch.equal(plain[1][0], cached[1][0]) and cached[0][0].shape == (3, 48, 48)
    with pytest.raises(DatasetError, match=r"train.json: image id 1: cannot read .*a.png"):
        plain[0]


def test_no_images_left_is_an_error(coco_dataset):
    def edit(d):
        for img in d["images"]:
            img["width"] += 1

    with pytest.raises(DatasetError, match=r"train.json: no images \(skipped: \{'size_mismatch': 3\}\)"):
        load_dataset(coco_dataset(edit), "train", skip_invalid=True)


def test_dataset_from_records_directly(ds):
    rs = RecordSet(ds.records[:1], ds.class_names, ds.cat_ids, "memory")
    small = DetectionDataset(rs, input_size=32)
    assert len(small) == 1 and small[0][0].shape == (3, 32, 32) and small[0][1]["letterbox"][0] == 0.5
