from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from slimdet.data import load_dataset
from slimdet.errors import DatasetError


def _error(yaml_path) -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset(yaml_path, "train", input_size=64)
    return str(info.value)


def test_yolo_and_coco_give_equal_records(coco_dataset, yolo_dataset):
    coco = load_dataset(coco_dataset(), "train", input_size=64)
    yolo = load_dataset(yolo_dataset(), "train", input_size=64)
    assert yolo.class_names == coco.class_names and yolo.cat_ids == coco.cat_ids == [1, 2]
    assert yolo.image_ids == coco.image_ids == [1, 2, 3]
    for a, b in zip(coco.records, yolo.records, strict=True):
        assert (a.path.name, a.width, a.height) == (b.path.name, b.width, b.height)
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-4)
        np.testing.assert_array_equal(a.labels, b.labels)
    for x, y in zip(coco.coco_gt["annotations"], yolo.coco_gt["annotations"], strict=True):
        assert x["category_id"] == y["category_id"] and x["image_id"] == y["image_id"]
        np.testing.assert_allclose(x["bbox"], y["bbox"], atol=1e-4)
    for i in range(len(coco)):
        (im_a, t_a), (im_b, t_b) = coco[i], yolo[i]
        assert torch.equal(im_a, im_b) and t_a["letterbox"] == t_b["letterbox"]


def test_wrong_column_count_names_file_and_line(yolo_dataset):
    msg = _error(yolo_dataset(extra_lines=("0 0.5 0.5 0.1",)))
    assert "labels/train" in msg and "a.txt line 3" in msg and "expected 5 columns" in msg


def test_non_numeric_value(yolo_dataset):
    msg = _error(yolo_dataset(extra_lines=("0 0.5 half 0.1 0.1",)))
    assert "a.txt line 3" in msg and "expected 5 numbers" in msg and "'0 0.5 half 0.1 0.1'" in msg


@pytest.mark.parametrize("cls", ["2", "-1", "0.5"])
def test_class_id_out_of_range(yolo_dataset, cls):
    msg = _error(yolo_dataset(extra_lines=(f"{cls} 0.5 0.5 0.1 0.1",)))
    assert "a.txt line 3" in msg and f"class id {cls} is not an integer in 0..1" in msg


def test_box_outside_image(yolo_dataset):
    msg = _error(yolo_dataset(extra_lines=("0 0.95 0.5 0.2 0.2",)))  # right edge at 1.05 * 64 px
    assert "a.txt line 3" in msg and "outside the 64x48 image" in msg


def test_zero_size_box(yolo_dataset):
    msg = _error(yolo_dataset(extra_lines=("1 0.5 0.5 0 0.2",)))
    assert "a.txt line 3" in msg and "zero or negative width/height" in msg


def test_corrupt_image(yolo_dataset):
    yaml_path = yolo_dataset()
    (yaml_path.parent / "images/train/c.png").write_bytes(b"garbage")
    msg = _error(yaml_path)
    assert "labels/train" in msg and "image c.png" in msg and "cannot read image" in msg


def test_blank_lines_are_ignored_and_missing_label_file_means_no_objects(yolo_dataset):
    ds = load_dataset(yolo_dataset(extra_lines=("", "   ")), "train", input_size=64)
    assert [len(r.labels) for r in ds.records] == [2, 1, 0]


def test_skip_invalid_drops_bad_lines_and_images(yolo_dataset, caplog):
    yaml_path = yolo_dataset(extra_lines=("7 0.5 0.5 0.1 0.1", "0 x 0.5 0.1 0.1", "0 0.5"))
    (yaml_path.parent / "images/train/b.png").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(yaml_path, "train", input_size=64, skip_invalid=True)
    assert ds.skipped == {"bad_line": 2, "class_out_of_range": 1, "corrupt_image": 1}
    assert ds.image_ids == [1, 3] and ds.records[0].labels.tolist() == [0, 1]
    assert "skipped 4 invalid record(s)" in caplog.text
