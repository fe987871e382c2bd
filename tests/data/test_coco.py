from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from slimdet.data import load_dataset, read_coco
from slimdet.errors import DatasetError


def _load(yaml_path: Path, **kw):
    return load_dataset(yaml_path, "train", input_size=64, **kw)


def _error(yaml_path: Path) -> str:
    with pytest.raises(DatasetError) as info:
        _load(yaml_path)
    return str(info.value)


def test_reads_records_with_labels_from_sorted_category_ids(coco_dataset):
    yaml_path = coco_dataset()
    rs = read_coco(yaml_path.parent / "images/train", yaml_path.parent / "annotations/train.json")
    assert rs.class_names == ["square", "bar"] and rs.cat_ids == [1, 2]
    assert [r.image_id for r in rs.records] == [1, 2, 3]
    a = rs.records[0]
    assert (a.path.name, a.width, a.height) == ("a.png", 64, 48)
    np.testing.assert_array_equal(a.boxes, [[4, 6, 24, 16], [30, 20, 46, 44]])
    np.testing.assert_array_equal(a.labels, [0, 1])
    assert a.boxes.dtype == np.float32 and a.labels.dtype == np.int64
    assert rs.records[2].boxes.shape == (0, 4) and rs.skipped == {}


def test_names_from_yaml_override_category_names(coco_dataset):
    yaml_path = coco_dataset()
    rs = read_coco(yaml_path.parent / "images/train", yaml_path.parent / "annotations/train.json", names=["s", "b"])
    assert rs.class_names == ["s", "b"]
    with pytest.raises(DatasetError, match="gives 1 names but the file has 2 categories"):
        read_coco(yaml_path.parent / "images/train", yaml_path.parent / "annotations/train.json", names=["s"])


def test_malformed_json_names_file_and_position(coco_dataset):
    msg = _error(coco_dataset(raw_json='{"images": [}'))
    assert "train.json" in msg and "malformed JSON at line 1" in msg


def test_missing_top_level_key(coco_dataset):
    msg = _error(coco_dataset(lambda d: d.pop("categories")))
    assert "train.json" in msg and "missing required key 'categories'" in msg


def test_missing_key_in_annotation_names_the_annotation(coco_dataset):
    msg = _error(coco_dataset(lambda d: d["annotations"][1].pop("bbox")))
    assert "train.json" in msg and "annotation id 2" in msg and "['bbox']" in msg


def test_missing_image_file(coco_dataset):
    yaml_path = coco_dataset()
    (yaml_path.parent / "images/train/b.png").unlink()
    msg = _error(yaml_path)
    assert "train.json" in msg and "image id 2 (b.png)" in msg and "image file not found" in msg


def test_corrupt_image(coco_dataset):
    yaml_path = coco_dataset()
    (yaml_path.parent / "images/train/b.png").write_bytes(b"\x89PNG not really an image")
    msg = _error(yaml_path)
    assert "image id 2 (b.png)" in msg and "cannot read image" in msg


def test_truncated_image(coco_dataset):
    yaml_path = coco_dataset()
    png = yaml_path.parent / "images/train/a.png"
    png.write_bytes(png.read_bytes()[:-30])  # cuts into the data/IEND chunks
    msg = _error(yaml_path)
    assert "image id 1 (a.png)" in msg and "cannot read image" in msg


def test_stored_size_must_match_the_file(coco_dataset):
    msg = _error(coco_dataset(lambda d: d["images"][0].update(width=65)))
    assert "image id 1 (a.png)" in msg and "stored size 65x48" in msg and "is 64x48" in msg


def test_box_outside_image_beyond_tolerance(coco_dataset):
    msg = _error(coco_dataset(lambda d: d["annotations"][2].update(bbox=[0, 0, 42.5, 12])))
    assert "annotation id 3 (image id 2)" in msg and "outside the 40x40 image by more than 1 px" in msg


def test_box_within_tolerance_is_clipped(coco_dataset):
    ds = _load(coco_dataset(lambda d: d["annotations"][2].update(bbox=[-0.5, 0, 41, 12])))
    np.testing.assert_allclose(ds.records[1].boxes, [[0, 0, 40, 12]])


def test_zero_size_box(coco_dataset):
    msg = _error(coco_dataset(lambda d: d["annotations"][0].update(bbox=[4, 6, 0, 10])))
    assert "annotation id 1 (image id 1)" in msg and "zero or negative width/height" in msg


def test_unknown_category(coco_dataset):
    msg = _error(coco_dataset(lambda d: d["annotations"][0].update(category_id=7)))
    assert "annotation id 1" in msg and "category id 7 is not in 'categories'" in msg


def test_unknown_image_id(coco_dataset):
    msg = _error(coco_dataset(lambda d: d["annotations"][0].update(image_id=99)))
    assert "annotation id 1" in msg and "image id 99 is not in 'images'" in msg


def test_duplicate_image_id(coco_dataset):
    msg = _error(coco_dataset(lambda d: d["images"][2].update(id=1)))
    assert "image id 1 (c.png)" in msg and "used twice (first by 'a.png')" in msg


def test_message_counts_all_problems_and_lists_the_first_few(coco_dataset):
    def edit(d):
        d["annotations"] += [
            {"id": 10 + k, "image_id": 1, "category_id": 9, "bbox": [0, 0, 5, 5]} for k in range(6)
        ]
        d["images"][1]["width"] = 41

    yaml_path = coco_dataset(edit)
    msg = _error(yaml_path)
    assert msg.startswith(f"{yaml_path.parent / 'annotations' / 'train.json'}: ")
    assert "7 invalid record(s) (size_mismatch: 1, unknown_category: 6)" in msg
    assert "annotation id 13" in msg and "annotation id 14" not in msg and "... and 2 more" in msg
    assert "skip_invalid=True" in msg


def test_skip_invalid_drops_bad_records_and_counts_them(coco_dataset, caplog):
    def edit(d):
        d["annotations"][0]["bbox"] = [60, 6, 20, 10]  # outside: drops this box only
        d["annotations"][1]["category_id"] = 5  # drops this box only
        d["images"][1]["height"] = 41  # drops image 2 and its annotation

    yaml_path = coco_dataset(edit)
    with caplog.at_level(logging.WARNING):
        ds = _load(yaml_path, skip_invalid=True)
    assert ds.skipped == {"box_outside": 1, "size_mismatch": 1, "unknown_category": 1}
    assert ds.image_ids == [1, 3]
    assert ds.records[0].boxes.shape == (0, 4)
    assert len(ds.coco_gt["images"]) == 2 and ds.coco_gt["annotations"] == []
    assert "skipped 3 invalid record(s)" in caplog.text


def test_crowd_regions_go_to_coco_gt_only(coco_dataset):
    ds = _load(coco_dataset(lambda d: d["annotations"][0].update(iscrowd=1)))
    np.testing.assert_array_equal(ds.records[0].labels, [1])
    crowd = [a for a in ds.coco_gt["annotations"] if a["iscrowd"]]
    assert len(crowd) == 1 and crowd[0]["bbox"] == [4.0, 6.0, 20.0, 10.0]
    _, target = ds[0]
    assert target["labels"].tolist() == [1]


def test_coco_gt_scores_perfect_map_against_itself(coco_dataset):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ds = _load(coco_dataset())
    gt = COCO()
    gt.dataset = json.loads(json.dumps(ds.coco_gt))
    gt.createIndex()
    dets = [dict(a, score=1.0) for a in ds.coco_gt["annotations"]]
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)
