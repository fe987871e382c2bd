"""Tiny synthetic datasets (black images with white rectangles) written to tmp_path."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

NAMES = ["square", "bar"]
# (file name, width, height, [(category id, x, y, w, h), ...]); category ids 1 and 2
IMAGES = [
    ("a.png", 64, 48, [(1, 4, 6, 20, 10), (2, 30, 20, 16, 24)]),
    ("b.png", 40, 40, [(2, 0, 0, 40, 12)]),
    ("c.png", 50, 70, []),
]


def draw(path: Path, width: int, height: int, boxes: list[tuple[int, int, int, int, int]]) -> None:
    image = np.zeros((height, width, 3), np.uint8)
    for _, x, y, w, h in boxes:
        image[y : y + h, x : x + w] = 255
    Image.fromarray(image).save(path)


def coco_json(images: list[tuple[str, int, int, list[Any]]] = IMAGES) -> dict[str, Any]:
    anns = []
    for image_id, (_, _, _, boxes) in enumerate(images, start=1):
        for cat, x, y, w, h in boxes:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": [x, y, w, h]})
    return {
        "images": [
            {"id": i, "file_name": f, "width": w, "height": h} for i, (f, w, h, _) in enumerate(images, start=1)
        ],
        "annotations": anns,
        # listed out of order on purpose: labels follow sorted category ids
        "categories": [{"id": 2, "name": NAMES[1]}, {"id": 1, "name": NAMES[0]}],
    }


def write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, w, h, boxes in IMAGES:
        draw(folder / name, w, h, boxes)


@pytest.fixture
def coco_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Factory: writes a COCO dataset (optionally with edited JSON) and returns its data.yaml."""

    def make(edit: Callable[[dict[str, Any]], Any] | None = None, *, raw_json: str | None = None) -> Path:
        write_images(tmp_path / "images" / "train")
        data = coco_json()
        if edit is not None:
            edit(data)
        ann = tmp_path / "annotations" / "train.json"
        ann.parent.mkdir(parents=True, exist_ok=True)
        ann.write_text(raw_json if raw_json is not None else json.dumps(data))
        yaml_path = tmp_path / "data.yaml"
        yaml_path.write_text(
            "format: coco\nsplits:\n  train: {images: images/train, annotations: annotations/train.json}\n"
        )
        return yaml_path

    return make


@pytest.fixture
def yolo_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Factory: writes the same data as YOLO txt (``extra_lines`` appended to a.txt); returns data.yaml."""

    def make(extra_lines: tuple[str, ...] = ()) -> Path:
        root = tmp_path / "yolo"
        write_images(root / "images" / "train")
        labels = root / "labels" / "train"
        labels.mkdir(parents=True)
        for name, w, h, boxes in IMAGES:
            if not boxes:
                continue  # an image without a label file has no objects
            lines = [
                f"{cat - 1} {(x + bw / 2) / w} {(y + bh / 2) / h} {bw / w} {bh / h}" for cat, x, y, bw, bh in boxes
            ]
            if name == "a.png":
                lines += list(extra_lines)
            (labels / name).with_suffix(".txt").write_text("\n".join(lines) + "\n")
        yaml_path = root / "data.yaml"
        yaml_path.write_text(
            f"format: yolo\nnames: {NAMES}\nsplits:\n  train: {{images: images/train, labels: labels/train}}\n"
        )
        return yaml_path

    return make
