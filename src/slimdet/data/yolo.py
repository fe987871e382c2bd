"""Read a YOLO-txt dataset: one ``.txt`` per image with lines ``cls cx cy w h`` (normalized).

``labels/<relative path>.txt`` belongs to ``images/<relative path>.<ext>``; an image with no label
file has no objects. Image ids are 1..N in sorted file order; category ids are 1..C (label + 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slimdet.data.records import IMAGE_SUFFIXES, ImageRecord, Problems, RecordSet, check_box, check_image, stack_boxes


def read_yolo(
    images_dir: str | Path,
    labels: str | Path,
    *,
    names: list[str] | None,
    skip_invalid: bool = False,
) -> RecordSet:
    """Read the images under ``images_dir`` and their label files under ``labels``.

    Raises:
        DatasetError: naming the label file and line (or the image), for lines with the wrong
            column count or non-numeric values, class ids outside ``0..len(names)-1``, bad boxes,
            and missing or corrupt images (all problems are collected; the message counts them).
    """
    images_dir, labels_dir = Path(images_dir), Path(labels)
    problems = Problems(labels_dir, skip_invalid=skip_invalid)
    if not names:
        raise problems.fatal("names", "a YOLO dataset needs the class names (names: [...] in the dataset YAML)")
    num_classes = len(names)
    files = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())

    records = []
    for image_id, path in enumerate(files, start=1):
        rel = path.relative_to(images_dir)
        size = check_image(path, f"image {rel}", problems)
        if size is None:
            continue
        label_file = labels_dir / rel.with_suffix(".txt")
        if label_file.is_file():
            parsed = _read_labels(label_file, labels_dir, size, num_classes, problems)
            if parsed is None:
                continue
            boxes, labels_ = parsed
        else:
            boxes, labels_ = stack_boxes([], [])
        records.append(ImageRecord(image_id, path, size[0], size[1], boxes, labels_))

    skipped = problems.finish()
    cat_ids = list(range(1, num_classes + 1))
    return RecordSet(records, list(names), cat_ids, str(labels_dir), skipped)


def _read_labels(
    label_file: Path, labels_dir: Path, size: tuple[int, int], num_classes: int, problems: Problems
) -> tuple[np.ndarray, np.ndarray] | None:
    """Boxes (original pixels) and labels of one label file; bad lines are reported and left out."""
    rel = label_file.relative_to(labels_dir)
    try:
        text = label_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        problems.add("bad_label_file", str(rel), f"cannot read label file {label_file}: {e}")
        return None
    width, height = size
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        where = f"{rel} line {lineno}"
        if len(parts) != 5:
            problems.add("bad_line", where, f"expected 5 columns 'cls cx cy w h', got {len(parts)}: {line.strip()!r}")
            continue
        try:
            cls_f, cx, cy, w, h = (float(p) for p in parts)
        except ValueError:
            problems.add("bad_line", where, f"expected 5 numbers 'cls cx cy w h', got {line.strip()!r}")
            continue
        if not cls_f.is_integer() or not 0 <= cls_f < num_classes:
            expected = f"an integer in 0..{num_classes - 1} ({num_classes} names)"
            problems.add("class_out_of_range", where, f"class id {parts[0]} is not {expected}")
            continue
        xyxy = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
        box = check_box(xyxy, width, height, where, problems)
        if box is not None:
            boxes.append(box)
            labels.append(int(cls_f))
    return stack_boxes(boxes, labels)
