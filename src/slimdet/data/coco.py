"""Read a COCO-format detection file (``images``, ``annotations``, ``categories``) into records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from slimdet.data.records import ImageRecord, Problems, RecordSet, check_box, check_image, stack_boxes
from slimdet.errors import DatasetError

_IMAGE_KEYS = ("id", "file_name", "width", "height")
_ANN_KEYS = ("id", "image_id", "category_id", "bbox")


def read_coco(
    images_dir: str | Path,
    annotations: str | Path,
    *,
    names: list[str] | None = None,
    skip_invalid: bool = False,
) -> RecordSet:
    """Read ``annotations`` (COCO JSON) with image files under ``images_dir``.

    Labels are the categories sorted by id, mapped to 0..C-1. ``names`` overrides the category names
    (it must have one name per category).

    Raises:
        DatasetError: naming the file and the record, for malformed JSON, missing keys, missing or
            corrupt images, wrong stored sizes, bad boxes, unknown category or image ids and
            duplicate image ids (all problems are collected; the message counts them).
    """
    images_dir, ann_file = Path(images_dir), Path(annotations)
    problems = Problems(ann_file, skip_invalid=skip_invalid)
    data = _load_json(ann_file, problems)
    cat_ids, class_names = _categories(data["categories"], names, problems)
    label_of = {c: i for i, c in enumerate(cat_ids)}

    images: dict[int, dict[str, Any]] = {}
    sizes: dict[int, tuple[int, int]] = {}
    for k, img in enumerate(data["images"]):
        where = _where_image(k, img)
        if not _has_keys(img, _IMAGE_KEYS, where, problems):
            continue
        image_id = img["id"]
        if not _is_int(image_id) or not _is_int(img["width"]) or not _is_int(img["height"]):
            problems.add("bad_record", where, "'id', 'width' and 'height' must be integers")
            continue
        if image_id in images:
            first = images[image_id]["file_name"]
            problems.add("duplicate_image_id", where, f"image id {image_id} is used twice (first by {first!r})")
            continue
        images[image_id] = img
        size = check_image(images_dir / img["file_name"], where, problems, size=(img["width"], img["height"]))
        if size is not None:
            sizes[image_id] = size

    # per kept image: boxes, labels, crowd boxes, crowd labels
    objects: dict[int, tuple[list[np.ndarray], list[int], list[np.ndarray], list[int]]]
    objects = {i: ([], [], [], []) for i in sizes}
    for k, ann in enumerate(data["annotations"]):
        where = f"annotation id {ann['id']}" if isinstance(ann, dict) and "id" in ann else f"annotations[{k}]"
        if not _has_keys(ann, _ANN_KEYS, where, problems):
            continue
        image_id, cat = ann["image_id"], ann["category_id"]
        where += f" (image id {image_id})"
        if image_id not in images:
            problems.add("unknown_image_id", where, f"image id {image_id} is not in 'images'")
            continue
        if image_id not in sizes:
            continue  # its image was already reported and dropped
        if cat not in label_of:
            problems.add("unknown_category", where, f"category id {cat!r} is not in 'categories' (known: {cat_ids})")
            continue
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            problems.add("bad_box", where, f"'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}")
            continue
        x, y, w, h = bbox
        box = check_box([x, y, x + w, y + h], *sizes[image_id], where, problems)
        if box is None:
            continue
        crowd = bool(ann.get("iscrowd", 0))
        boxes, labels, crowd_boxes, crowd_labels = objects[image_id]
        (crowd_boxes if crowd else boxes).append(box)
        (crowd_labels if crowd else labels).append(label_of[cat])

    skipped = problems.finish()
    records = []
    for image_id, (boxes, labels, crowd_boxes, crowd_labels) in objects.items():
        w, h = sizes[image_id]
        b, lab = stack_boxes(boxes, labels)
        cb, cl = stack_boxes(crowd_boxes, crowd_labels)
        path = images_dir / images[image_id]["file_name"]
        records.append(ImageRecord(image_id, path, w, h, b, lab, cb, cl))
    return RecordSet(records, class_names, cat_ids, str(ann_file), skipped)


def _load_json(path: Path, problems: Problems) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read annotation file: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise problems.fatal(
            "top level", f"expected a JSON object with 'images', 'annotations', 'categories', got {type(data).__name__}"
        )
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise problems.fatal(
                "top level", f"missing required key {key!r} (COCO needs 'images', 'annotations', 'categories')"
            )
        if not isinstance(data[key], list):
            raise problems.fatal(key, f"expected a list, got {type(data[key]).__name__}")
    return data


def _categories(cats: list[Any], names: list[str] | None, problems: Problems) -> tuple[list[int], list[str]]:
    by_id: dict[int, str] = {}
    for k, cat in enumerate(cats):
        where = f"categories[{k}]"
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise problems.fatal(where, f"expected an object with 'id' and 'name', got {cat!r}")
        if not _is_int(cat["id"]):
            raise problems.fatal(where, f"category 'id' must be an integer, got {cat['id']!r}")
        if cat["id"] in by_id:
            raise problems.fatal(where, f"category id {cat['id']} is used twice")
        by_id[cat["id"]] = str(cat["name"])
    if not by_id:
        raise problems.fatal("categories", "no categories defined")
    cat_ids = sorted(by_id)
    if names is None:
        return cat_ids, [by_id[c] for c in cat_ids]
    if len(names) != len(cat_ids):
        raise problems.fatal(
            "categories", f"dataset YAML gives {len(names)} names but the file has {len(cat_ids)} categories"
        )
    return cat_ids, list(names)


def _has_keys(obj: Any, keys: tuple[str, ...], where: str, problems: Problems) -> bool:
    if not isinstance(obj, dict):
        problems.add("bad_record", where, f"expected an object, got {type(obj).__name__}")
        return False
    missing = [k for k in keys if k not in obj]
    if missing:
        problems.add("missing_key", where, f"missing required key(s) {missing} (needs {list(keys)})")
        return False
    return True


def _where_image(k: int, img: Any) -> str:
    if isinstance(img, dict) and "id" in img:
        name = f" ({img['file_name']})" if "file_name" in img else ""
        return f"image id {img['id']}{name}"
    return f"images[{k}]"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
