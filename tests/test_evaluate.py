import contextlib
import io
import json

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from slimdet.errors import ConfigError, DatasetError
from slimdet.evaluate import EvalResult, coco_map, evaluate, to_original_frame
from slimdet.models.base import Detector

# --- a hand-made COCO fixture: 3 images, 2 categories with non-contiguous ids ------------------


def _gt() -> dict:
    images = [
        {"id": 1, "width": 100, "height": 80},
        {"id": 2, "width": 120, "height": 60},
        {"id": 5, "width": 50, "height": 50},
    ]
    boxes = [  # image_id, category_id, xywh
        (1, 3, [10, 10, 20, 30]),
        (1, 7, [50, 20, 30, 30]),
        (2, 3, [0, 0, 40, 40]),
        (2, 3, [60, 10, 30, 20]),
        (5, 7, [5, 5, 40, 40]),
    ]
    anns = [
        {"id": i, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
        for i, (im, c, b) in enumerate(boxes)  # id 0 on purpose: coco_map must renumber
    ]
    return {"images": images, "annotations": anns, "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}


def _dets() -> list[dict]:
    return [
        {"image_id": 1, "category_id": 3, "bbox": [11, 10, 20, 29], "score": 0.9},  # TP, IoU ~0.92
        {"image_id": 1, "category_id": 7, "bbox": [55, 25, 30, 30], "score": 0.8},  # IoU ~0.56
        {"image_id": 1, "category_id": 3, "bbox": [70, 50, 20, 20], "score": 0.95},  # FP
        {"image_id": 2, "category_id": 3, "bbox": [0, 0, 40, 40], "score": 0.7},  # exact TP
        {"image_id": 2, "category_id": 7, "bbox": [60, 10, 30, 20], "score": 0.6},  # wrong class
        {"image_id": 5, "category_id": 7, "bbox": [8, 8, 40, 40], "score": 0.5},  # IoU ~0.74
    ]


def _pycocotools_reference(gt: dict, dets: list[dict]) -> tuple[list[float], list[float]]:
    gt = json.loads(json.dumps(gt))
    for i, a in enumerate(gt["annotations"], start=1):
        a["id"] = i
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        res = coco.loadRes(json.loads(json.dumps(dets)))
        ev = COCOeval(coco, res, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    per_class = []
    for k in range(len(ev.params.catIds)):
        p = ev.eval["precision"][:, :, k, 0, -1]
        per_class.append(float(p[p > -1].mean()))
    return list(ev.stats), per_class


def test_coco_map_equals_pycocotools_directly():
    stats, per_class = _pycocotools_reference(_gt(), _dets())
    result = coco_map(_gt(), _dets())
    assert result.map == pytest.approx(stats[0], abs=1e-12)
    assert result.map50 == pytest.approx(stats[1], abs=1e-12)
    assert result.per_class_ap == pytest.approx({"cat": per_class[0], "dog": per_class[1]}, abs=1e-12)
    assert 0.2 < result.map < result.map50 < 1.0  # the fixture really mixes TPs and FPs
    assert (result.num_images, result.num_detections) == (3, 6)


def test_perfect_detector_scores_one():
    gt = _gt()
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt["annotations"]
    ]
    result = coco_map(gt, dets)
    assert result.map == pytest.approx(1.0)
    assert result.map50 == pytest.approx(1.0)
    assert result.per_class_ap == pytest.approx({"cat": 1.0, "dog": 1.0})


def test_half_recall_matches_hand_computed_101_point_ap():
    # One image, two GT boxes, one found exactly: precision 1 at recall 0..0.5 -> 51 of 101 points.
    gt = {
        "images": [{"id": 1, "width": 100, "height": 100}],
        "annotations": [
            {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
            {"image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10]},
        ],
        "categories": [{"id": 1, "name": "x"}],
    }
    result = coco_map(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9}])
    assert result.map == pytest.approx(51 / 101)
    assert result.per_class_ap["x"] == pytest.approx(51 / 101)


def test_no_detections_gives_zero_not_a_crash():
    result = coco_map(_gt(), [])
    assert (result.map, result.map50, result.num_detections) == (0.0, 0.0, 0)
    assert result.per_class_ap == {"cat": 0.0, "dog": 0.0}


def test_bad_inputs_fail_loudly():
    with pytest.raises(DatasetError, match="image_id 99"):
        coco_map(_gt(), [{"image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(DatasetError, match="category_id 4"):
        coco_map(_gt(), [{"image_id": 1, "category_id": 4, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(DatasetError, match="no annotations"):
        coco_map({**_gt(), "annotations": []}, [])


def test_coco_map_does_not_mutate_inputs():
    gt, dets = _gt(), _dets()
    coco_map(gt, dets)
    assert gt == _gt() and dets == _dets()


def test_to_original_frame_inverts_letterbox_and_clips():
    # 200 x 100 (w x h) image letterboxed to 160: scale 0.8, pad_y 20.
    boxes = torch.tensor([[8.0, 28.0, 88.0, 68.0], [-5.0, 10.0, 170.0, 150.0]])
    out = to_original_frame(boxes, (0.8, 0.0, 20.0), (100, 200))
    assert out[0].tolist() == pytest.approx([10.0, 10.0, 110.0, 60.0])
    assert out[1].tolist() == pytest.approx([0.0, 0.0, 200.0, 100.0])


# --- evaluate() end to end with a fake dataset and an oracle detector --------------------------

INPUT = 160


class FakeDataset(torch.utils.data.Dataset):
    """Follows the DetectionDataset contract: non-square images letterboxed to INPUT."""

    def __init__(self):
        self.class_names, self.cat_ids, self.input_size, self.source = ["cat", "dog"], [3, 7], INPUT, "fake"
        sizes = [(60, 100), (120, 50), (90, 200), (40, 40)]  # (h, w)
        gt_boxes = [  # per image: (label, xyxy in original pixels)
            [(0, [10, 5, 40, 50]), (1, [55, 20, 95, 58])],
            [(1, [5, 10, 45, 100])],
            [(0, [0, 0, 60, 45]), (0, [120, 30, 199, 89]), (1, [70, 40, 110, 80])],
            [(1, [8, 8, 30, 36])],
        ]
        self.image_ids = [11, 12, 13, 14]
        self.items, images, anns = [], [], []
        for i, ((h, w), boxes) in enumerate(zip(sizes, gt_boxes, strict=True)):
            scale = INPUT / max(h, w)
            pad_x, pad_y = (INPUT - w * scale) / 2, (INPUT - h * scale) / 2
            xyxy = torch.tensor([b for _, b in boxes], dtype=torch.float32)
            target = {
                "boxes": xyxy * scale + torch.tensor([pad_x, pad_y, pad_x, pad_y]),
                "labels": torch.tensor([lab for lab, _ in boxes]),
                "image_id": self.image_ids[i],
                "orig_size": (h, w),
                "letterbox": (scale, pad_x, pad_y),
            }
            self.items.append((torch.full((3, INPUT, INPUT), i / 100), target))
            images.append({"id": self.image_ids[i], "height": h, "width": w})
            for lab, (x1, y1, x2, y2) in boxes:
                bbox = [x1, y1, x2 - x1, y2 - y1]
                anns.append({"id": len(anns) + 1, "image_id": self.image_ids[i], "category_id": self.cat_ids[lab],
                             "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
        cats = [{"id": c, "name": n} for c, n in zip(self.cat_ids, self.class_names, strict=True)]
        self.coco_gt = {"images": images, "annotations": anns, "categories": cats}

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class OracleDetector(Detector):
    """Returns the dataset's input-frame GT boxes for the image whose pixels encode its index."""

    def __init__(self, dataset: FakeDataset):
        super().__init__(num_classes=2, input_size=INPUT)
        self.dataset = dataset
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, images):
        return images[:, 0, 0, 0] * self.scale

    def postprocess(self, raw, *, conf_thres=0.001, iou_thres=0.6, max_det=100):
        out = []
        for code in raw.tolist():
            target = self.dataset.items[round(code * 100)][1]
            n = len(target["labels"])
            scores = torch.linspace(1.0, 0.5, n)
            out.append({"boxes": target["boxes"].clone(), "scores": scores, "labels": target["labels"].clone()})
        return out


def test_evaluate_maps_letterboxed_detections_back_to_original_images():
    ds = FakeDataset()
    model = OracleDetector(ds).train()
    result = evaluate(model, ds, batch_size=3, progress=False)
    assert isinstance(result, EvalResult)
    assert result.map == pytest.approx(1.0)
    assert result.map50 == pytest.approx(1.0)
    assert result.per_class_ap == pytest.approx({"cat": 1.0, "dog": 1.0})
    assert (result.num_images, result.num_detections) == (4, 7)
    assert model.training  # restored
    assert json.loads(json.dumps(result.to_dict()))["map"] == pytest.approx(1.0)


def test_without_back_mapping_the_same_boxes_score_low():
    # Control for the test above: input-frame boxes scored as if they were original-frame boxes.
    ds = FakeDataset()
    dets = []
    for _, t in ds.items:
        for (x1, y1, x2, y2), lab in zip(t["boxes"].tolist(), t["labels"].tolist(), strict=True):
            bbox = [x1, y1, x2 - x1, y2 - y1]
            dets.append({"image_id": t["image_id"], "category_id": ds.cat_ids[lab], "bbox": bbox, "score": 1.0})
    assert coco_map(ds.coco_gt, dets).map < 0.5


def test_evaluate_rejects_a_model_with_another_class_count():
    ds = FakeDataset()
    model = OracleDetector(ds)
    model.num_classes = 5
    with pytest.raises(ConfigError, match="5 classes.*fake has 2"):
        evaluate(model, ds, progress=False)
