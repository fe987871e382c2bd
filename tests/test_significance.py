"""paired_bootstrap / map50: COCOeval's mAP@.5 on the set and on resamples, and the paired interval."""

import numpy as np
import pytest

from slimdet.errors import ConfigError, DatasetError
from slimdet.evaluate import coco_map
from slimdet.significance import _Matches, map50, paired_bootstrap


def _scene(seed: int, images: int = 12, classes: int = 3, *, ties: bool = True) -> tuple[dict, list[dict]]:
    """Ground truth with 1..4 boxes per image, and detections: jittered hits, misses, false alarms, and
    scores rounded to tenths (``ties``: COCOeval orders tied detections by image)."""
    rng = np.random.default_rng(seed)
    gt = {"images": [{"id": i + 1, "width": 100, "height": 100} for i in range(images)],
          "categories": [{"id": c + 1, "name": f"c{c}"} for c in range(classes)], "annotations": []}  # fmt: skip
    dets = []
    for image in gt["images"]:
        for _ in range(rng.integers(1, 5)):
            x, y, w, h = (float(v) for v in (*rng.uniform(0, 60, 2), *rng.uniform(10, 40, 2)))
            cat = int(rng.integers(1, classes + 1))
            gt["annotations"].append({"image_id": image["id"], "category_id": cat, "bbox": [x, y, w, h]})
            if rng.random() < 0.8:  # found, more or less well (IoU above or below 0.5)
                close = rng.random() < 0.7  # close boxes score higher, as a working detector's do
                jitter = rng.normal(0, 2 if close else 10, 4)
                score = (0.4 + 0.6 * rng.random()) if close else 0.6 * rng.random()
                dets.append({"image_id": image["id"], "category_id": cat, "bbox": list(np.add([x, y, w, h], jitter)),
                             "score": float(np.round(score, 1 if ties else 12))})  # fmt: skip
        for _ in range(rng.integers(0, 3)):  # false alarms
            box = [*rng.uniform(0, 60, 2).tolist(), 20.0, 20.0]
            dets.append({"image_id": image["id"], "category_id": int(rng.integers(1, classes + 1)), "bbox": box,
                         "score": 0.6 * float(rng.random())})  # fmt: skip
    return gt, dets


@pytest.mark.parametrize("seed", range(5))
def test_map50_is_cocoevals_on_the_set(seed):
    gt, dets = _scene(seed)
    assert map50(gt, dets) == pytest.approx(coco_map(gt, dets).map50, abs=1e-12)
    assert 0.1 < map50(gt, dets) < 0.95  # neither trivial case


def test_a_class_without_detections_scores_zero_as_in_cocoeval():
    gt, dets = _scene(0)
    gt["categories"].append({"id": 9, "name": "never detected"})
    gt["annotations"].append({"image_id": 1, "category_id": 9, "bbox": [1.0, 1.0, 5.0, 5.0]})
    assert map50(gt, dets) == pytest.approx(coco_map(gt, dets).map50, abs=1e-12)
    assert map50(gt, []) == coco_map(gt, []).map50 == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_a_resample_scores_as_cocoeval_scores_the_images_copied_that_many_times(seed):
    gt, dets = _scene(seed, ties=False)  # copies of tied detections would interleave in COCOeval's order
    counts = np.random.default_rng(seed).integers(0, 4, len(gt["images"]))
    copied = {"images": [], "categories": gt["categories"], "annotations": []}
    copied_dets = []
    for i, image in enumerate(gt["images"]):
        for k in range(counts[i]):
            new_id = 1000 * (k + 1) + image["id"]
            copied["images"].append({**image, "id": new_id})
            mine = [a for a in gt["annotations"] if a["image_id"] == image["id"]]
            copied["annotations"] += [{**a, "image_id": new_id} for a in mine]
            copied_dets += [{**d, "image_id": new_id} for d in dets if d["image_id"] == image["id"]]
    expected = coco_map(copied, copied_dets).map50
    assert _Matches(gt, dets).map50(counts.astype(float)) == pytest.approx(expected, abs=1e-9)


def test_paired_interval_is_zero_for_a_model_against_itself_and_excludes_zero_for_a_clear_gap():
    gt, good = _scene(7, images=40)
    rng = np.random.default_rng(1)
    worse = [{**d, "score": float(rng.random())} for d in good]  # the same boxes, ranked at random
    same = paired_bootstrap(gt, [good], [good], resamples=200, progress=False)
    assert (same.difference, same.low, same.high, same.a_lower_share) == (0.0, 0.0, 0.0, 0.0)
    gap = paired_bootstrap(gt, [good], [worse], resamples=300, progress=False)
    assert gap.difference == pytest.approx(map50(gt, good) - map50(gt, worse), abs=1e-12)
    assert 0 < gap.low < gap.difference < gap.high and gap.a_lower_share < 0.025
    swapped = paired_bootstrap(gt, [worse], [good], resamples=300, progress=False)
    assert (swapped.low, swapped.high) == pytest.approx((-gap.high, -gap.low), abs=1e-12)
    # several runs per side: their mean is compared
    both = paired_bootstrap(gt, [good, worse], [worse], resamples=50, progress=False)
    assert both.difference == pytest.approx(gap.difference / 2, abs=1e-12)


def test_bad_input_is_refused_with_a_clear_error():
    gt, dets = _scene(0)
    with pytest.raises(ConfigError, match="at least one run"):
        paired_bootstrap(gt, [], [dets])
    with pytest.raises(ConfigError, match="confidence"):
        paired_bootstrap(gt, [dets], [dets], confidence=1.5)
    with pytest.raises(DatasetError, match="image_id 999"):
        paired_bootstrap(gt, [dets + [{**dets[0], "image_id": 999}]], [dets], progress=False)
