"""COCO-style detection accuracy, computed by pycocotools.

``evaluate(model, dataset)`` predicts every image, maps the boxes from the letterboxed network
input back to the original image, and scores them against ``dataset.coco_gt`` with COCOeval.
``predict`` is the prediction step alone and ``coco_map(coco_gt, detections)`` the scoring step alone.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from slimdet.data.dataset import collate
from slimdet.errors import ConfigError, DatasetError
from slimdet.models.base import Detector


@dataclass(frozen=True)
class EvalResult:
    """COCO box AP of one model on one dataset, as fractions in [0, 1]."""

    map: float  # AP averaged over IoU 0.50:0.05:0.95, all areas, up to 100 detections per image
    map50: float  # AP at IoU 0.50
    per_class_ap: dict[str, float]  # AP@[.5:.95] per class name; classes without ground truth left out
    num_images: int
    num_detections: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def coco_map(coco_gt: dict[str, Any], detections: Sequence[dict[str, Any]]) -> EvalResult:
    """Score detections against COCO ground truth with pycocotools.

    Args:
        coco_gt: COCO-format ground truth (images, annotations with xywh bbox, categories).
        detections: dicts with image_id, category_id, bbox (x, y, w, h in original pixels), score.

    Raises:
        DatasetError: the ground truth has no annotations, or a detection names an image or
            category that is not in it.
    """
    gt = check_detections(coco_gt, detections)
    cat_names = {c["id"]: c["name"] for c in gt["categories"]}
    with_gt = sorted({a["category_id"] for a in gt["annotations"]})
    if not detections:  # COCO.loadRes cannot load an empty list; every AP is 0
        return EvalResult(0.0, 0.0, {cat_names[c]: 0.0 for c in with_gt}, len(gt["images"]), 0)

    ev = cocoeval(gt, detections)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and summaries
        ev.evaluate()
        ev.accumulate()
        ev.summarize()

    # precision: [IoU thresholds, recall points, categories, area ranges, max dets]; -1 = no GT
    precision = ev.eval["precision"]
    per_class: dict[str, float] = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        if cat_id in with_gt:
            per_class[cat_names[cat_id]] = float(np.mean(p[p > -1])) if (p > -1).any() else 0.0
    return EvalResult(
        map=max(float(ev.stats[0]), 0.0),
        map50=max(float(ev.stats[1]), 0.0),
        per_class_ap=per_class,
        num_images=len(gt["images"]),
        num_detections=len(detections),
    )


def check_detections(coco_gt: dict[str, Any], detections: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ground truth completed for pycocotools, after checking it and that every detection names one
    of its images and categories.

    Raises:
        DatasetError: the ground truth has no annotations, or a detection names an image or
            category that is not in it.
    """
    gt = _complete_gt(coco_gt)
    if not gt["annotations"]:
        raise DatasetError("coco_gt has no annotations: mAP is undefined without ground-truth boxes")
    image_ids = {img["id"] for img in gt["images"]}
    cat_names = {c["id"]: c["name"] for c in gt["categories"]}
    for i, d in enumerate(detections):
        if d["image_id"] not in image_ids:
            raise DatasetError(f"detection {i}: image_id {d['image_id']} is not an image of coco_gt")
        if d["category_id"] not in cat_names:
            raise DatasetError(
                f"detection {i}: category_id {d['category_id']} is not a category of coco_gt "
                f"(known: {sorted(cat_names)})"
            )
    return gt


def cocoeval(gt: dict[str, Any], detections: Sequence[dict[str, Any]]) -> COCOeval:
    """A box COCOeval, not yet run, of ``detections`` (not empty) on ``gt`` as ``check_detections`` returns it."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        dets = coco.loadRes([_plain_detection(d) for d in detections])
    return COCOeval(coco, dets, iouType="bbox")


def evaluate(
    model: Detector,
    dataset: Any,
    *,
    batch_size: int = 16,
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 100,
    progress: bool = True,
    distributed: bool = False,
) -> EvalResult:
    """COCO mAP of ``model`` on ``dataset`` (a slimdet DetectionDataset or anything with its contract).

    Detections (``predict``) are mapped from the network-input frame to the original image with each target's
    letterbox (orig = (input - pad) / scale, clipped to the image) and their labels to
    ``dataset.cat_ids``; the model's training flag is restored afterwards. As in the COCO
    benchmark, COCOeval scores at most 100 detections per image whatever ``max_det`` is.

    ``distributed``: every rank of the initialized process group calls this; each predicts a
    contiguous share of the images, the detections are gathered in image order (as one process
    would list them) and scored once, on rank 0, and every rank returns that result.
    """
    if distributed:
        from slimdet import distributed as dist

        share = np.array_split(np.arange(len(dataset)), dist.world_size())[dist.rank()]
        part = predict(model, dataset, indices=share.tolist(), batch_size=batch_size, conf_thres=conf_thres,
                       iou_thres=iou_thres, max_det=max_det, progress=progress)  # fmt: skip
        detections = [d for rank_part in dist.all_gather_objects(part) for d in rank_part]
        return dist.run_on_main(lambda: coco_map(dataset.coco_gt, detections))
    detections = predict(model, dataset, batch_size=batch_size, conf_thres=conf_thres, iou_thres=iou_thres,
                         max_det=max_det, progress=progress)  # fmt: skip
    return coco_map(dataset.coco_gt, detections)


def predict(
    model: Detector,
    dataset: Any,
    *,
    indices: Sequence[int] | None = None,
    batch_size: int = 16,
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 100,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """COCO-format detections (image_id, category_id, xywh bbox in original pixels, score) of ``model``
    on ``dataset`` (or on its images at ``indices``), in image order; what ``evaluate`` scores."""
    num_classes = len(dataset.cat_ids)
    if getattr(model, "num_classes", num_classes) != num_classes:
        raise ConfigError(
            f"model predicts {model.num_classes} classes but dataset {getattr(dataset, 'source', '?')} "
            f"has {num_classes} ({', '.join(dataset.class_names)})"
        )
    if batch_size < 1:
        raise ConfigError(f"evaluate: batch_size must be >= 1, got {batch_size}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    part = dataset if indices is None else Subset(dataset, list(indices))
    loader = DataLoader(part, batch_size=batch_size, shuffle=False, collate_fn=collate)

    detections: list[dict[str, Any]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for images, targets in tqdm(loader, desc="evaluate", unit="batch", disable=not progress):
                preds = model.predict(images.to(device), conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det)
                for pred, target in zip(preds, targets, strict=True):
                    detections.extend(_to_coco(pred, target, dataset.cat_ids))
    finally:
        model.train(was_training)
    return detections


def to_original_frame(boxes: Tensor, letterbox: Sequence[float], orig_size: Sequence[int]) -> Tensor:
    """Map xyxy boxes from the letterboxed input back to the original image and clip them to it.

    The data pipeline resized by ``scale`` and padded by ``(pad_x, pad_y)``: input = orig * scale + pad.
    """
    scale, pad_x, pad_y = (float(v) for v in letterbox)
    h, w = (int(v) for v in orig_size)
    pad = boxes.new_tensor([pad_x, pad_y, pad_x, pad_y])
    out = (boxes - pad) / scale
    out[:, 0::2] = out[:, 0::2].clamp(0, w)
    out[:, 1::2] = out[:, 1::2].clamp(0, h)
    return out


def _to_coco(pred: dict[str, Tensor], target: dict[str, Any], cat_ids: Sequence[int]) -> list[dict[str, Any]]:
    labels = pred["labels"].detach().cpu().long()
    if len(labels) and (labels.min() < 0 or labels.max() >= len(cat_ids)):
        raise ConfigError(f"model returned label {int(labels.max())}, outside 0..{len(cat_ids) - 1}")
    boxes = to_original_frame(pred["boxes"].detach().cpu().double(), target["letterbox"], target["orig_size"])
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = pred["scores"].detach().cpu().tolist()
    image_id = int(target["image_id"])
    return [
        {"image_id": image_id, "category_id": int(cat_ids[lab]), "bbox": box, "score": float(s)}
        for box, s, lab in zip(xywh, scores, labels.tolist(), strict=True)
    ]


def _complete_gt(coco_gt: dict[str, Any]) -> dict[str, Any]:
    # pycocotools needs areas and iscrowd, and annotation ids > 0 (COCOeval reads id 0 as "unmatched"),
    # so ids are renumbered from 1 in this private copy.
    gt = copy.deepcopy(coco_gt)
    for key in ("images", "annotations", "categories"):
        if key not in gt:
            raise DatasetError(f"coco_gt has no {key!r} list (expected COCO format: images, annotations, categories)")
    for i, ann in enumerate(gt["annotations"], start=1):
        ann["id"] = i
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
    return gt


def _plain_detection(d: dict[str, Any]) -> dict[str, Any]:
    # a copy (loadRes adds fields in place) with plain Python numbers
    return {
        "image_id": int(d["image_id"]),
        "category_id": int(d["category_id"]),
        "bbox": [float(v) for v in d["bbox"]],
        "score": float(d["score"]),
    }
