"""Is a difference in mAP@.5 between two models real, or the luck of the evaluation images?

``paired_bootstrap(coco_gt, runs_a, runs_b)`` resamples the images of the evaluation set with
replacement (Efron and Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13: percentile
interval) and scores both models on the *same* resampled images each time, so the interval is
that of the difference, not of either mAP. Each side may be several runs (e.g. one per calibration
set); its score is then the mean over them.

COCOeval matches each image's detections once; every resample is then scored from those matches
with COCOeval's own accumulation (101-point interpolated precision at IoU 0.5, up to 100
detections per image, all areas), an image drawn k times counting k times. On the set itself
``map50`` equals ``evaluate.coco_map(...).map50``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from slimdet.errors import ConfigError
from slimdet.evaluate import check_detections, cocoeval

Detections = Sequence[dict[str, Any]]
_RECALLS = np.linspace(0.0, 1.0, 101)  # COCOeval's recall thresholds


@dataclass(frozen=True)
class MapDifference:
    """mAP@.5 of side a minus side b (fractions in [-1, 1]) and its bootstrap interval."""

    difference: float  # on the evaluation set itself
    low: float  # percentile interval over the resamples
    high: float
    confidence: float
    resamples: int
    #: fraction of resamples in which a scored below b
    a_lower_share: float
    num_images: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Matches:
    """One run's detections, matched by COCOeval at IoU 0.5, ready to be scored on any image multiset."""

    def __init__(self, coco_gt: dict[str, Any], detections: Detections) -> None:
        gt = check_detections(coco_gt, detections)
        images = sorted(int(im["id"]) for im in gt["images"])
        column = {cat: k for k, cat in enumerate(sorted(int(c["id"]) for c in gt["categories"]))}
        row = {image: i for i, image in enumerate(images)}
        self.gt_count = np.zeros((len(images), len(column)))  # non-ignored ground truth per image and class
        for ann in gt["annotations"]:
            if not ann.get("iscrowd", 0):
                self.gt_count[row[int(ann["image_id"])], column[int(ann["category_id"])]] += 1
        self.per_class: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (image row, tp, fp) by score
        if not detections:
            empty = np.zeros(0)
            self.per_class = [(empty.astype(int), empty, empty) for _ in column]
            return
        ev = cocoeval(gt, detections)
        ev.params.iouThrs = np.array([0.5])
        ev.params.areaRng, ev.params.areaRngLbl, ev.params.maxDets = [[0, 1e10]], ["all"], [100]
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
        num_images = len(ev.params.imgIds)
        for k in range(len(ev.params.catIds)):  # evalImgs: category-major, then area (one), then image
            rows, scores, tp, ignored = [], [], [], []
            for i, e in enumerate(ev.evalImgs[k * num_images : (k + 1) * num_images]):
                if e is None or not len(e["dtScores"]):
                    continue
                n = len(e["dtScores"][:100])
                rows.append(np.full(n, row[int(ev.params.imgIds[i])]))
                scores.append(np.asarray(e["dtScores"][:100]))
                tp.append(np.asarray(e["dtMatches"][0, :n]) > 0)
                ignored.append(np.asarray(e["dtIgnore"][0, :n], dtype=bool))
            if not rows:
                self.per_class.append((np.zeros(0, int), np.zeros(0), np.zeros(0)))
                continue
            order = np.argsort(-np.concatenate(scores), kind="mergesort")  # COCOeval's order, ties by image
            keep = ~np.concatenate(ignored)[order]  # ignored detections count as neither tp nor fp
            hit = np.concatenate(tp)[order][keep]
            self.per_class.append((np.concatenate(rows)[order][keep], hit.astype(float), (~hit).astype(float)))

    def map50(self, weights: np.ndarray) -> float:
        """mAP@.5 over the images drawn ``weights[i]`` times each (classes without ground truth left out)."""
        gt = weights @ self.gt_count
        aps = []
        for k, (rows, tp, fp) in enumerate(self.per_class):
            if gt[k] == 0:
                continue
            if not len(rows):  # ground truth, no detection: COCOeval's precision is 0 at every recall
                aps.append(0.0)
                continue
            w = weights[rows]
            tps, fps = np.cumsum(w * tp), np.cumsum(w * fp)
            recall = tps / gt[k]
            precision = tps / (tps + fps + np.spacing(1))  # COCOeval.accumulate's formula
            envelope = np.maximum.accumulate(precision[::-1])[::-1]  # precision made non-increasing in recall
            idx = np.searchsorted(recall, _RECALLS, side="left")
            aps.append(float(np.where(idx < len(envelope), envelope[np.minimum(idx, len(envelope) - 1)], 0).mean()))
        return float(np.mean(aps)) if aps else 0.0


def map50(coco_gt: dict[str, Any], detections: Detections) -> float:
    """COCO mAP@.5 of ``detections``, scored the way each bootstrap resample is."""
    return _Matches(coco_gt, detections).map50(np.ones(len(coco_gt["images"])))


def paired_bootstrap(
    coco_gt: dict[str, Any],
    runs_a: Sequence[Detections],
    runs_b: Sequence[Detections],
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    progress: bool = True,
) -> MapDifference:
    """Bootstrap interval of mean mAP@.5 over ``runs_a`` minus that over ``runs_b`` on ``coco_gt``'s images.

    Args:
        coco_gt: COCO ground truth both sides were evaluated on.
        runs_a: one or more detection lists of side a (``evaluate.predict`` output), averaged.
        runs_b: the same for side b.
        resamples: bootstrap resamples of the images (with replacement, the same for both sides).
        confidence: coverage of the percentile interval.
        seed: of the resampling.
    """
    if not runs_a or not runs_b:
        raise ConfigError("paired_bootstrap: each side needs at least one run of detections")
    if resamples < 1 or not 0 < confidence < 1:
        raise ConfigError(f"paired_bootstrap: resamples must be >= 1 and confidence in (0, 1), got "
                          f"{resamples} and {confidence}")  # fmt: skip
    n = len(coco_gt["images"])
    if n == 0:
        raise ConfigError("paired_bootstrap: coco_gt has no images")
    a = [_Matches(coco_gt, run) for run in runs_a]
    b = [_Matches(coco_gt, run) for run in runs_b]

    def diff(weights: np.ndarray) -> float:
        return float(np.mean([m.map50(weights) for m in a]) - np.mean([m.map50(weights) for m in b]))

    rng = np.random.default_rng(seed)
    draws = np.array([diff(np.bincount(rng.integers(0, n, n), minlength=n).astype(float))
                      for _ in tqdm(range(resamples), desc="bootstrap", disable=not progress)])  # fmt: skip
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return MapDifference(difference=diff(np.ones(n)), low=float(low), high=float(high), confidence=confidence,
                         resamples=resamples, a_lower_share=float((draws < 0).mean()), num_images=n)  # fmt: skip
