"""Image + box transforms (NumPy/PIL): letterbox, flip, scale/translate affine, colour jitter.

Images are ``H x W x 3`` uint8 arrays; boxes are float32 ``N x 4`` xyxy in pixels with edges at
integer coordinates (a box ``[0, 0, W, H]`` covers the whole image).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from slimdet.errors import ConfigError

PAD_VALUE = 114  # grey used for letterbox borders and for pixels an affine moves in from outside

Letterbox = tuple[float, float, float]  # (scale, pad_x, pad_y): input_xy = orig_xy * scale + pad


@dataclass(frozen=True)
class Augment:
    """Training augmentation; ``load_dataset(..., augment=True)`` uses these defaults.

    Attributes:
        hflip_p: probability of a horizontal flip (off by default: it changes the meaning of digits).
        scale: random zoom factor in ``[1 - scale, 1 + scale]`` about the image centre.
        translate: random shift, as a fraction of the image size, in each direction.
        hue: random hue rotation, as a fraction of a full turn, in ``[-hue, hue]``.
        saturation: random saturation gain in ``[1 - saturation, 1 + saturation]``.
        value: random brightness gain in ``[1 - value, 1 + value]``.
        min_box_px: boxes narrower or lower than this after the affine are dropped.
        min_visible: boxes keeping less than this fraction of their area inside the image are dropped.
    """

    hflip_p: float = 0.0
    scale: float = 0.25
    translate: float = 0.1
    hue: float = 0.015
    saturation: float = 0.5
    value: float = 0.3
    min_box_px: float = 2.0
    min_visible: float = 0.4

    def __post_init__(self) -> None:
        for name in ("hflip_p", "min_visible"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"Augment.{name}: expected a value in [0, 1], got {getattr(self, name)}")
        for name in ("scale", "saturation", "value"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"Augment.{name}: expected a value in [0, 1), got {getattr(self, name)}")
        for name in ("translate", "hue", "min_box_px"):
            if getattr(self, name) < 0.0:
                raise ConfigError(f"Augment.{name}: expected a value >= 0, got {getattr(self, name)}")

    @classmethod
    def off(cls) -> Augment:
        """No augmentation at all."""
        return cls(scale=0.0, translate=0.0, hue=0.0, saturation=0.0, value=0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def letterbox(image: np.ndarray, boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, Letterbox]:
    """Resize keeping the aspect ratio so the longer side is ``size``, pad to ``size x size`` with grey.

    Returns the new image, the boxes in the new frame, and ``(scale, pad_x, pad_y)`` with
    ``new_xy = orig_xy * scale + pad`` (undo with :func:`unletterbox`).
    """
    h, w = image.shape[:2]
    scale = min(size / h, size / w)
    nw, nh = min(size, max(1, round(w * scale))), min(size, max(1, round(h * scale)))
    pad_x, pad_y = (size - nw) // 2, (size - nh) // 2
    if (nw, nh) != (w, h):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))
    if (nw, nh) != (size, size):
        canvas = np.full((size, size, 3), PAD_VALUE, np.uint8)
        canvas[pad_y : pad_y + nh, pad_x : pad_x + nw] = image
        image = canvas
    boxes = (boxes * np.float32(scale) + np.array([pad_x, pad_y, pad_x, pad_y], np.float32)).astype(np.float32)
    return image, boxes, (float(scale), float(pad_x), float(pad_y))


def unletterbox(boxes: np.ndarray | torch.Tensor, lb: Letterbox) -> np.ndarray | torch.Tensor:
    """Map xyxy boxes from the letterboxed (network-input) frame back to original pixels."""
    scale, pad_x, pad_y = lb
    pad = [pad_x, pad_y, pad_x, pad_y]
    if isinstance(boxes, torch.Tensor):
        return (boxes - torch.tensor(pad, dtype=boxes.dtype, device=boxes.device)) / scale
    return (boxes - np.asarray(pad, boxes.dtype)) / boxes.dtype.type(scale)


def hflip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left-right."""
    w = image.shape[1]
    flipped = boxes.copy()
    flipped[:, 0], flipped[:, 2] = w - boxes[:, 2], w - boxes[:, 0]
    return np.ascontiguousarray(image[:, ::-1]), flipped


def random_affine(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    *,
    scale: float,
    translate: float,
    min_box_px: float = 2.0,
    min_visible: float = 0.4,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zoom about the centre and shift; boxes are moved, clipped, and dropped when mostly gone."""
    h, w = image.shape[:2]
    s = float(rng.uniform(1.0 - scale, 1.0 + scale))
    tx, ty = (float(v) for v in rng.uniform(-translate, translate, size=2) * (w, h))
    # forward map x' = s * x + ox; PIL wants the inverse (output pixel -> input pixel)
    ox, oy = (1.0 - s) * w / 2 + tx, (1.0 - s) * h / 2 + ty
    inverse = (1.0 / s, 0.0, -ox / s, 0.0, 1.0 / s, -oy / s)
    out = Image.fromarray(image).transform(
        (w, h), Image.Transform.AFFINE, inverse, resample=Image.Resampling.BILINEAR, fillcolor=(PAD_VALUE,) * 3
    )
    moved = boxes * np.float32(s) + np.array([ox, oy, ox, oy], np.float32)
    clipped = np.clip(moved, 0, [w, h, w, h]).astype(np.float32)
    keep = _keep_boxes(moved, clipped, min_box_px=min_box_px, min_visible=min_visible)
    return np.asarray(out), clipped[keep], labels[keep]


def _keep_boxes(before: np.ndarray, after: np.ndarray, *, min_box_px: float, min_visible: float) -> np.ndarray:
    bw, bh = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    area_before = (before[:, 2] - before[:, 0]) * (before[:, 3] - before[:, 1])
    return (bw >= min_box_px) & (bh >= min_box_px) & (bw * bh >= min_visible * area_before)


def color_jitter(
    image: np.ndarray, rng: np.random.Generator, *, hue: float, saturation: float, value: float
) -> np.ndarray:
    """Random hue rotation, saturation and brightness gain, as one 3x3 colour matrix."""
    theta = float(rng.uniform(-hue, hue)) * 2 * math.pi
    s = float(rng.uniform(1 - saturation, 1 + saturation))
    v = float(rng.uniform(1 - value, 1 + value))
    # hue: rotation about the grey axis (1,1,1)/sqrt(3) (Rodrigues' formula)
    a = np.full(3, 1 / math.sqrt(3))
    cross = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    rot = math.cos(theta) * np.eye(3) + (1 - math.cos(theta)) * np.outer(a, a) + math.sin(theta) * cross
    # saturation: blend with the luma (ITU-R BT.601 weights)
    luma = np.tile([0.299, 0.587, 0.114], (3, 1))
    sat = s * np.eye(3) + (1 - s) * luma
    m = (v * sat @ rot).astype(np.float32)
    out = image.astype(np.float32) @ m.T
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def apply_augment(
    image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, aug: Augment, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply ``aug`` to a letterboxed image and its boxes."""
    if aug.scale > 0 or aug.translate > 0:
        image, boxes, labels = random_affine(
            image, boxes, labels, rng, scale=aug.scale, translate=aug.translate,
            min_box_px=aug.min_box_px, min_visible=aug.min_visible,
        )  # fmt: skip
    if aug.hue > 0 or aug.saturation > 0 or aug.value > 0:
        image = color_jitter(image, rng, hue=aug.hue, saturation=aug.saturation, value=aug.value)
    if aug.hflip_p > 0 and rng.random() < aug.hflip_p:
        image, boxes = hflip(image, boxes)
    return image, boxes, labels


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``H x W x 3`` uint8 -> float32 ``3 x H x W`` in [0, 1].

    Done in NumPy: on a busy 2-core machine a small torch op can wait milliseconds on its thread pool.
    """
    return torch.from_numpy(np.multiply(image.transpose(2, 0, 1), np.float32(1 / 255), dtype=np.float32))
