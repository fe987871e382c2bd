"""The family of detection tasks that meta-learned initialization trains over.

A task is a few classes of a dataset seen at one zoom-out scale and one colour mode: its images are
those of a split holding at least one object of its classes; only those objects are labelled, as
``0..ways-1`` in the order of ``Task.classes``, and every other object stays in the image unlabelled
(a distractor). Objects of the held-out classes are painted over with mid-grey in meta-training
images (``erase_held_out``), so meta-training never sees them, not even as unlabelled background, and
the images a held-out task adapts on are new to the model where it matters. During meta-training the
class order is drawn at random for every sampled task, so
the classifier's rows are exchangeable (Nichol et al. 2018 shuffle the labels of every few-shot task
the same way). The scale and colour transforms act on the letterboxed tensor, and a task dataset's
frame *is* that transformed input frame: its ``coco_gt`` is built there and its targets carry an
identity letterbox, so ``slimdet.evaluate.evaluate`` scores it as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.utils.data import Dataset

from slimdet.data import DetectionDataset, load_dataset
from slimdet.data.transforms import PAD_VALUE
from slimdet.errors import ConfigError

__all__ = ["Background", "Task", "TaskDataset", "TaskFamily", "TaskPool", "erase_objects", "gray", "zoom_out"]

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights


class Background(StrEnum):
    COLOR = "color"  # the image as it is
    GRAY = "gray"  # the image turned to grey levels (luma), same in the three channels


class TaskFamily(BaseModel):
    """Which tasks meta-training samples, and which classes are kept for the held-out task."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: built-in dataset name or dataset YAML; tasks are cut from its ``train`` split
    dataset: str = "digits-det"
    #: classes per task
    ways: int = Field(3, ge=1)
    #: class ids never used in meta-training (the new tasks to adapt to)
    held_out: tuple[int, ...] = (7, 8, 9)
    #: class ids meta-training draws from; None: every class not held out
    meta_classes: tuple[int, ...] | None = None
    #: zoom-out factors: the image is shrunk by s, centred on a mid-grey canvas, boxes scaled
    scales: tuple[float, ...] = Field((0.6, 0.8, 1.0), min_length=1)
    backgrounds: tuple[Background, ...] = Field((Background.COLOR, Background.GRAY), min_length=1)
    #: at most this many images per task (evenly spaced over its images); None: all of them
    images_per_task: int | None = Field(None, ge=1)
    #: paint held-out objects over with mid-grey in meta-training images (else they stay as distractors)
    erase_held_out: bool = True

    @property
    def erased_classes(self) -> tuple[int, ...]:
        """Classes whose objects meta-training images hide."""
        return self.held_out if self.erase_held_out else ()

    @model_validator(mode="after")
    def _check(self) -> TaskFamily:
        for name in ("held_out", "meta_classes"):
            ids = getattr(self, name) or ()
            if any(c < 0 for c in ids) or len(set(ids)) != len(ids):
                raise ConfigError(f"TaskFamily.{name}: expected distinct class ids >= 0, got {list(ids)}")
        if self.meta_classes is not None:
            both = sorted(set(self.held_out) & set(self.meta_classes))
            if both:
                raise ConfigError(
                    f"TaskFamily.held_out: class ids {both} are also in meta_classes; a held-out class must "
                    "never be seen in meta-training"
                )
            if self.ways > len(self.meta_classes):
                raise ConfigError(
                    f"TaskFamily.ways: {self.ways} classes per task but meta_classes has only "
                    f"{len(self.meta_classes)} ({list(self.meta_classes)}); expected ways <= {len(self.meta_classes)}"
                )
        for s in self.scales:
            if not 0.0 < s <= 1.0:
                raise ConfigError(f"TaskFamily.scales: expected zoom-out factors in (0, 1], got {s}")
        return self

    def resolve_meta_classes(self, num_classes: int, *, source: str = "the dataset") -> tuple[int, ...]:
        """The meta-training classes for a dataset of ``num_classes`` classes, after checking every id."""
        for name in ("held_out", "meta_classes"):
            bad = [c for c in getattr(self, name) or () if c >= num_classes]
            if bad:
                raise ConfigError(
                    f"TaskFamily.{name}: class ids {bad} are not classes of {source} "
                    f"(expected ids 0..{num_classes - 1})"
                )
        meta = self.meta_classes
        if meta is None:
            meta = tuple(c for c in range(num_classes) if c not in self.held_out)
        if self.ways > len(meta):
            raise ConfigError(
                f"TaskFamily.ways: {self.ways} classes per task but only {len(meta)} meta-training classes "
                f"are left in {source} ({list(meta)}); expected ways <= {len(meta)}"
            )
        return meta

    def load(self, split: str = "train", *, input_size: int = 160, cache_images: bool = True) -> TaskPool:
        """The ``split`` of the family's dataset, indexed by class, ready to cut tasks from."""
        base = load_dataset(self.dataset, split, input_size=input_size, cache_images=cache_images)
        return TaskPool(base, self)


@dataclass(frozen=True)
class Task:
    """Classes (label k is ``classes[k]``), zoom-out scale and colour mode of one detection task."""

    classes: tuple[int, ...]
    scale: float = 1.0
    background: Background = Background.COLOR

    def describe(self) -> str:
        return f"{','.join(map(str, self.classes))}@{self.scale:g}/{self.background.value}"


class TaskPool:
    """One split of a dataset with its images grouped by class; cuts task datasets and samples tasks."""

    def __init__(self, base: DetectionDataset, family: TaskFamily) -> None:
        self.base = base
        self.family = family
        self.meta_classes = family.resolve_meta_classes(base.num_classes, source=str(family.dataset))
        self._by_class: list[set[int]] = [set() for _ in range(base.num_classes)]
        for i, rec in enumerate(base.records):
            for c in set(rec.labels.tolist()):
                self._by_class[c].add(i)

    def images_of(self, classes: Sequence[int]) -> list[int]:
        """Indices of the images holding an object of ``classes`` (capped by ``images_per_task``)."""
        found = sorted(set().union(*(self._by_class[c] for c in classes)))
        cap = self.family.images_per_task
        if cap is not None and len(found) > cap:
            keep = np.unique(np.linspace(0, len(found) - 1, cap).round().astype(int))
            found = [found[k] for k in keep]
        return found

    def dataset(self, task: Task, *, erase: Sequence[int] = ()) -> TaskDataset:
        """The images of ``task``; objects of the ``erase`` classes are painted over with mid-grey."""
        bad = [c for c in task.classes if not 0 <= c < self.base.num_classes]
        if bad:
            raise ConfigError(f"task {task.describe()}: class ids {bad} are not classes of {self.family.dataset}")
        indices = self.images_of(task.classes)
        if not indices:
            raise ConfigError(f"task {task.describe()}: no image of {self.family.dataset} holds these classes")
        return TaskDataset(self.base, task, indices, erase=erase)

    def sample(self, rng: np.random.Generator) -> Task:
        """A meta-training task: ``ways`` meta classes in random order, a random scale and colour mode."""
        picks = rng.choice(len(self.meta_classes), size=self.family.ways, replace=False)
        scale = self.family.scales[int(rng.integers(len(self.family.scales)))]
        background = self.family.backgrounds[int(rng.integers(len(self.family.backgrounds)))]
        return Task(tuple(self.meta_classes[int(k)] for k in picks), float(scale), Background(background))


class TaskDataset(Dataset[tuple[torch.Tensor, dict[str, Any]]]):
    """A task's view of a DetectionDataset, with the attributes ``evaluate`` reads (``cat_ids``,
    ``class_names``, ``coco_gt``): categories ``1..ways`` named after the original classes."""

    def __init__(
        self, base: DetectionDataset, task: Task, indices: Sequence[int], *, erase: Sequence[int] = ()
    ) -> None:
        self.base = base
        self.task = task
        self.indices = list(indices)
        self.erase = tuple(erase)
        self.input_size = base.input_size
        self.class_names = [base.class_names[c] for c in task.classes]
        self.cat_ids = list(range(1, len(task.classes) + 1))
        self.image_ids = [base.image_ids[i] for i in self.indices]
        self.source = f"{base.source} [task {task.describe()}]"
        self._label_of = torch.full((base.num_classes,), -1, dtype=torch.int64)
        for k, c in enumerate(task.classes):
            self._label_of[c] = k

    @property
    def num_classes(self) -> int:
        return len(self.task.classes)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image, target = self.base[self.indices[index]]
        if self.erase:
            image = erase_objects(image, target["boxes"][torch.isin(target["labels"], torch.tensor(self.erase))])
        labels = self._label_of[target["labels"]]
        keep = labels >= 0
        boxes, labels = target["boxes"][keep], labels[keep]
        image, boxes = zoom_out(image, boxes, self.task.scale)
        if self.task.background is Background.GRAY:
            image = gray(image)
        size = self.input_size
        return image, {"boxes": boxes, "labels": labels, "image_id": target["image_id"], "orig_size": (size, size),
                       "letterbox": (1.0, 0.0, 0.0)}  # fmt: skip

    @cached_property
    def coco_gt(self) -> dict[str, Any]:
        """COCO ground truth of the task, in its (transformed input) frame."""
        size = self.input_size
        images, annotations = [], []
        for i in range(len(self)):
            _, target = self[i]
            images.append({"id": target["image_id"], "width": size, "height": size})
            for (x1, y1, x2, y2), label in zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True):
                annotations.append({"id": len(annotations) + 1, "image_id": target["image_id"],
                                    "category_id": label + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                    "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})  # fmt: skip
        categories = [{"id": k, "name": n} for k, n in zip(self.cat_ids, self.class_names, strict=True)]
        return {"images": images, "annotations": annotations, "categories": categories}

    def __repr__(self) -> str:
        return f"TaskDataset({self.source!r}, images={len(self)}, classes={self.class_names})"


def erase_objects(image: torch.Tensor, boxes: torch.Tensor, margin_px: int = 2) -> torch.Tensor:
    """A copy of ``image`` with each box (grown by ``margin_px``, for the anti-aliased ink edge) mid-grey."""
    out = image.clone()
    h, w = image.shape[-2:]
    for x1, y1, x2, y2 in boxes.tolist():
        top, left = max(0, int(y1) - margin_px), max(0, int(x1) - margin_px)
        bottom, right = min(h, int(y2 + 0.999) + margin_px), min(w, int(x2 + 0.999) + margin_px)
        out[:, top:bottom, left:right] = PAD_VALUE / 255.0
    return out


def zoom_out(image: torch.Tensor, boxes: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink a ``3 x H x W`` image by ``scale`` and centre it on a mid-grey canvas; move the boxes along."""
    if scale == 1.0:
        return image, boxes
    h, w = image.shape[-2:]
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    top, left = (h - nh) // 2, (w - nw) // 2
    canvas = torch.full_like(image, PAD_VALUE / 255.0)
    canvas[:, top : top + nh, left : left + nw] = small
    factor = boxes.new_tensor([nw / w, nh / h, nw / w, nh / h])
    offset = boxes.new_tensor([left, top, left, top])
    return canvas, boxes * factor + offset


def gray(image: torch.Tensor) -> torch.Tensor:
    """Luma of a ``3 x H x W`` image, repeated in the three channels."""
    luma = (image * image.new_tensor(LUMA)[:, None, None]).sum(0, keepdim=True)
    return luma.expand_as(image).contiguous()
