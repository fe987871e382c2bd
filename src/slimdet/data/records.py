"""In-memory image records shared by the COCO and YOLO readers, and the checks both apply.

A reader turns a dataset on disk into a list of :class:`ImageRecord` (boxes in original pixels,
labels 0..C-1) plus the class names and the COCO category id of each label. Problems found while
reading go to a :class:`Problems` collector, which either raises one :class:`DatasetError` listing
them all (the default) or drops the bad records and counts them (``skip_invalid=True``).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from slimdet.errors import DatasetError

log = logging.getLogger(__name__)

#: A box may stick out of the image by this many pixels before it is an error; it is then clipped.
BOX_TOLERANCE_PX = 1.0
#: How many problems the error message lists before "... and N more".
MAX_LISTED = 5
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _empty_boxes() -> np.ndarray:
    return np.zeros((0, 4), np.float32)


def _empty_labels() -> np.ndarray:
    return np.zeros((0,), np.int64)


@dataclass(frozen=True)
class ImageRecord:
    """One image and its objects, in original pixel coordinates.

    Attributes:
        image_id: id used in the COCO ground truth.
        path: image file.
        width: image width in pixels.
        height: image height in pixels.
        boxes: float32 ``N x 4`` xyxy, clipped to the image.
        labels: int64 ``N`` in 0..C-1.
        crowd_boxes: COCO ``iscrowd=1`` regions (evaluation ignores detections there; not trained on).
        crowd_labels: labels of ``crowd_boxes``.
    """

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=_empty_boxes)
    labels: np.ndarray = field(default_factory=_empty_labels)
    crowd_boxes: np.ndarray = field(default_factory=_empty_boxes)
    crowd_labels: np.ndarray = field(default_factory=_empty_labels)


@dataclass(frozen=True)
class RecordSet:
    """What a reader returns: the records, the class names, and each label's COCO category id."""

    records: list[ImageRecord]
    class_names: list[str]
    cat_ids: list[int]
    source: str
    skipped: dict[str, int] = field(default_factory=dict)


class Problems:
    """Collects invalid records of one dataset file; raises them all at once or counts the skips."""

    def __init__(self, source: str | Path, *, skip_invalid: bool) -> None:
        self.source = str(source)
        self.skip_invalid = skip_invalid
        self.counts: Counter[str] = Counter()
        self.messages: list[str] = []

    def add(self, kind: str, where: str, message: str) -> None:
        """Record one problem: ``kind`` is the counter key, ``where`` names the record."""
        self.counts[kind] += 1
        self.messages.append(f"{where}: {message}")

    def fatal(self, where: str, message: str) -> DatasetError:
        """An error that ``skip_invalid`` cannot work around (the file itself is unusable)."""
        return DatasetError(f"{self.source}: {where}: {message}")

    def finish(self) -> dict[str, int]:
        """Raise a DatasetError listing the problems, or log and return the skip counts."""
        total = sum(self.counts.values())
        if not total:
            return {}
        if not self.skip_invalid:
            listed = "\n".join(f"  - {m}" for m in self.messages[:MAX_LISTED])
            more = f"\n  ... and {total - MAX_LISTED} more" if total > MAX_LISTED else ""
            kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.counts.items()))
            raise DatasetError(
                f"{self.source}: {total} invalid record(s) ({kinds}):\n{listed}{more}\n"
                "(pass skip_invalid=True to drop the bad records instead)"
            )
        counts = dict(sorted(self.counts.items()))
        log.warning("%s: skipped %d invalid record(s): %s; first: %s", self.source, total, counts, self.messages[0])
        return counts


def check_image(
    path: Path, where: str, problems: Problems, *, size: tuple[int, int] | None = None
) -> tuple[int, int] | None:
    """Check that ``path`` is a readable image (and of ``size`` = (w, h) when given).

    Returns its (width, height), or None after reporting a problem.
    """
    if not path.is_file():
        problems.add("missing_image", where, f"image file not found: {path}")
        return None
    try:
        with Image.open(path) as im:
            real, kind = im.size, im.format
            im.verify()  # checks the file structure and checksums without decoding the pixels
        if kind not in ("PNG", "GIF"):
            # verify() cannot see a truncated JPEG (or BMP, WebP, TIFF): decode it, JPEGs at 1/8 scale
            # (the DCT's draft mode still reads every byte), so it fails here and not mid-training
            with Image.open(path) as im:
                im.draft("RGB", (max(1, real[0] // 8), max(1, real[1] // 8)))
                im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        problems.add("corrupt_image", where, f"cannot read image {path}: {e}")
        return None
    if size is not None and tuple(size) != tuple(real):
        problems.add(
            "size_mismatch", where, f"stored size {size[0]}x{size[1]} (w x h) but {path.name} is {real[0]}x{real[1]}"
        )
        return None
    return real


def check_box(xyxy: list[float], width: int, height: int, where: str, problems: Problems) -> np.ndarray | None:
    """Validate one box in original pixels; returns it clipped to the image, or None after a problem."""
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    if not np.isfinite([x1, y1, x2, y2]).all():
        problems.add("bad_box", where, f"box {_fmt(xyxy)} has non-finite values")
        return None
    if x2 <= x1 or y2 <= y1:
        problems.add("empty_box", where, f"box {_fmt(xyxy)} (xyxy) has zero or negative width/height")
        return None
    tol = BOX_TOLERANCE_PX
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        problems.add(
            "box_outside",
            where,
            f"box {_fmt(xyxy)} (xyxy) lies outside the {width}x{height} image by more than {tol:g} px",
        )
        return None
    box = np.array([min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(x2, width), min(y2, height)], np.float32)
    if box[2] <= box[0] or box[3] <= box[1]:
        problems.add("empty_box", where, f"box {_fmt(xyxy)} (xyxy) has zero size inside the {width}x{height} image")
        return None
    return box


def stack_boxes(boxes: list[np.ndarray], labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    if not boxes:
        return _empty_boxes(), _empty_labels()
    return np.stack(boxes).astype(np.float32), np.asarray(labels, np.int64)


def build_coco_gt(records: list[ImageRecord], class_names: list[str], cat_ids: list[int]) -> dict[str, Any]:
    """COCO-format ground truth (original coordinates, xywh boxes) for evaluation with pycocotools."""
    images, annotations = [], []
    for r in records:
        images.append({"id": r.image_id, "file_name": r.path.name, "width": r.width, "height": r.height})
        for boxes, labels, crowd in ((r.boxes, r.labels, 0), (r.crowd_boxes, r.crowd_labels, 1)):
            for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist(), strict=True):
                w, h = x2 - x1, y2 - y1
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": r.image_id,
                        "category_id": cat_ids[label],
                        "bbox": [x1, y1, w, h],
                        "area": w * h,
                        "iscrowd": crowd,
                    }
                )
    categories = [{"id": c, "name": n} for c, n in zip(cat_ids, class_names, strict=True)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"
