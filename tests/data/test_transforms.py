from __future__ import annotations

import numpy as np
import pytest
import torch

from slimdet.data import Augment, hflip, letterbox, unletterbox
from slimdet.data.transforms import PAD_VALUE, apply_augment, color_jitter, random_affine, to_tensor
from slimdet.errors import ConfigError


def _scene(width: int, height: int, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Black image with one white rectangle; returns the image and its xyxy box."""
    image = np.zeros((height, width, 3), np.uint8)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = 255
    return image, np.array([box], np.float32)


def _white_bounds(image: np.ndarray) -> np.ndarray:
    """xyxy (pixel edges) of the pixels brighter than mid-grey."""
    ys, xs = np.nonzero(image[..., 0] > 160)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


class _FixedRng:
    """Stands in for np.random.Generator: ``uniform`` returns preset values in call order."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def uniform(self, low, high, size=None):
        if size is None:
            return self.values.pop(0)
        return np.array([self.values.pop(0) for _ in range(size)])


@pytest.mark.parametrize(
    ("w", "h", "size"), [(64, 48, 64), (40, 40, 64), (50, 70, 32), (300, 17, 160), (160, 160, 160)]
)
def test_letterbox_round_trip_is_exact(w, h, size):
    image, _ = _scene(w, h, (1, 1, 3, 3))
    boxes = np.array([[0, 0, w, h], [1.5, 2.25, w / 2, h - 1]], np.float32)
    out, moved, lb = letterbox(image, boxes, size)
    scale, pad_x, pad_y = lb
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    np.testing.assert_allclose(moved, boxes * scale + [pad_x, pad_y, pad_x, pad_y], rtol=1e-6)
    np.testing.assert_allclose(unletterbox(moved, lb), boxes, atol=1e-4)
    np.testing.assert_allclose(unletterbox(torch.from_numpy(moved), lb).numpy(), boxes, atol=1e-4)
    # the whole original image lands inside the square, centred, with grey bars around it
    x1, y1, x2, y2 = moved[0]
    assert x1 >= 0 and y1 >= 0 and x2 <= size + 0.5 and y2 <= size + 0.5
    assert max(x2 - x1, y2 - y1) == pytest.approx(size, abs=0.5)
    if pad_y >= 1:
        assert (out[0] == PAD_VALUE).all() and (out[-1] == PAD_VALUE).all()


def test_letterbox_identity_when_already_square():
    image, boxes = _scene(160, 160, (10, 20, 50, 60))
    out, moved, lb = letterbox(image, boxes, 160)
    assert lb == (1.0, 0.0, 0.0) and out is image
    np.testing.assert_array_equal(moved, boxes)


@pytest.mark.parametrize(("w", "h", "size"), [(120, 80, 64), (40, 60, 96)])
def test_letterbox_box_still_bounds_the_object(w, h, size):
    image, boxes = _scene(w, h, (13, 9, 37, 41))
    out, moved, _ = letterbox(image, boxes, size)
    np.testing.assert_allclose(_white_bounds(out), moved[0], atol=1.5)


def test_hflip_keeps_box_on_object():
    image, boxes = _scene(64, 48, (5, 10, 20, 30))
    out, flipped = hflip(image, boxes)
    np.testing.assert_array_equal(flipped, [[44, 10, 59, 30]])
    np.testing.assert_array_equal(_white_bounds(out), flipped[0])


def test_affine_integer_shift_moves_pixels_exactly():
    image, boxes = _scene(64, 64, (10, 12, 30, 40))
    rng = _FixedRng(1.0, 0.125, -0.0625)  # scale 1, shift +8 px right, -4 px down
    out, moved, labels = random_affine(image, boxes, np.array([3]), rng, scale=0.5, translate=0.2)
    np.testing.assert_array_equal(moved, [[18, 8, 38, 36]])
    np.testing.assert_array_equal(out[8:36, 18:38], 255)
    assert labels.tolist() == [3]
    assert (out[:, :8] == PAD_VALUE).all() and (out[-4:] == PAD_VALUE).all()  # moved in from outside
    assert (out[:-4, 8:][out[:-4, 8:] != 255] == 0).all()


@pytest.mark.parametrize("seed", range(12))
def test_random_affine_keeps_boxes_on_objects(seed):
    image, boxes = _scene(96, 96, (30, 20, 70, 60))
    rng = np.random.default_rng(seed)
    out, moved, labels = random_affine(image, boxes, np.array([1]), rng, scale=0.5, translate=0.3)
    if len(moved):
        assert labels.tolist() == [1]
        np.testing.assert_allclose(_white_bounds(out), moved[0], atol=1.5)
    else:  # dropped: most of the object left the image
        visible = (out[..., 0] > 160).sum()
        assert visible < 0.4 * 40 * 40 * 2.25


def test_affine_drops_boxes_mostly_outside_and_clips_the_rest():
    image = np.zeros((64, 64, 3), np.uint8)
    boxes = np.array([[0, 0, 10, 10], [30, 30, 50, 50]], np.float32)
    rng = _FixedRng(1.0, -0.125, 0.0)  # shift 8 px left: first box keeps 2 of 10 px, second moves
    _, moved, labels = random_affine(image, boxes, np.array([0, 1]), rng, scale=0.1, translate=0.2)
    np.testing.assert_array_equal(moved, [[22, 30, 42, 50]])
    assert labels.tolist() == [1]
    rng = _FixedRng(1.0, -0.0625, 0.0)  # shift 4 px left: first box keeps 60 % and is clipped
    _, moved, _ = random_affine(image, boxes, np.array([0, 1]), rng, scale=0.1, translate=0.2)
    np.testing.assert_array_equal(moved[0], [0, 0, 6, 10])


def test_color_jitter_keeps_grey_under_hue_rotation_and_changes_colours():
    image = np.array([[[128, 128, 128], [200, 30, 30]]], np.uint8)
    out = color_jitter(image, np.random.default_rng(0), hue=0.3, saturation=0.0, value=0.0)
    assert np.abs(out[0, 0].astype(int) - 128).max() <= 1
    assert np.abs(out[0, 1].astype(int) - image[0, 1]).max() > 10
    same = color_jitter(image, np.random.default_rng(0), hue=0.0, saturation=0.0, value=0.0)
    np.testing.assert_array_equal(same, image)


def test_default_augment_never_flips_and_keeps_shapes():
    image, boxes = _scene(64, 64, (4, 4, 20, 40))
    assert Augment().hflip_p == 0.0
    for seed in range(5):
        out, moved, labels = apply_augment(image, boxes, np.array([2]), Augment(), np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8 and len(moved) == len(labels)


def test_augment_with_flip_only_mirrors():
    image, boxes = _scene(64, 64, (4, 4, 20, 40))
    aug = Augment.off()
    aug = Augment(**{**aug.to_dict(), "hflip_p": 1.0})
    out, moved, _ = apply_augment(image, boxes, np.array([0]), aug, np.random.default_rng(0))
    np.testing.assert_array_equal(moved, [[44, 4, 60, 40]])
    np.testing.assert_array_equal(out, image[:, ::-1])


@pytest.mark.parametrize("field", ["hflip_p", "scale", "saturation", "value", "min_visible"])
def test_augment_rejects_out_of_range_values(field):
    with pytest.raises(ConfigError, match=f"Augment.{field}"):
        Augment(**{field: 1.5})


def test_to_tensor_is_float_chw_in_unit_range():
    image = np.zeros((4, 6, 3), np.uint8)
    image[0, 0] = (255, 0, 51)
    t = to_tensor(image)
    assert t.shape == (3, 4, 6) and t.dtype == torch.float32
    assert t[:, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.2])
