"""The torch Dataset, its collate function and loader, and ``load_dataset``."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from slimdet.data.coco import read_coco
from slimdet.data.records import RecordSet, build_coco_gt
from slimdet.data.spec import BUILTIN_DATASETS, DatasetFormat, load_spec
from slimdet.data.transforms import Augment, Letterbox, apply_augment, letterbox, to_tensor
from slimdet.data.yolo import read_yolo
from slimdet.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

Target = dict[str, Any]


class DetectionDataset(Dataset[tuple[torch.Tensor, Target]]):
    """Letterboxed images and targets in the network-input frame.

    ``ds[i]`` is ``(image, target)``: image float32 ``3 x S x S`` in [0, 1]; target a dict with
    ``boxes`` (float32 ``N x 4`` xyxy input pixels), ``labels`` (int64, 0..C-1), ``image_id``,
    ``orig_size`` ``(h, w)`` and ``letterbox`` ``(scale, pad_x, pad_y)`` with
    ``input_xy = orig_xy * scale + pad``.

    Attributes:
        class_names: one name per label.
        cat_ids: COCO category id of each label (indexes ``coco_gt['categories']``).
        image_ids: COCO image id of each item.
        coco_gt: COCO-format ground truth in original image coordinates, for evaluation.
        input_size: side ``S`` of the square network input.
        source: the annotation file (or label folder) it came from.
        skipped: invalid records dropped on load, by kind (empty unless ``skip_invalid``).
    """

    def __init__(
        self,
        records: RecordSet,
        *,
        input_size: int = 160,
        augment: Augment | None = None,
        cache_images: bool = False,
    ) -> None:
        if input_size < 1:
            raise ValueError(f"input_size must be >= 1, got {input_size}")
        if not records.records:
            raise DatasetError(f"{records.source}: no images (skipped: {records.skipped or 'none'})")
        self.records = records.records
        self.class_names = list(records.class_names)
        self.cat_ids = list(records.cat_ids)
        self.image_ids = [r.image_id for r in self.records]
        self.coco_gt = build_coco_gt(self.records, self.class_names, self.cat_ids)
        self.input_size = input_size
        self.source = records.source
        self.skipped = dict(records.skipped)
        self.augment = augment
        self._cache: list[tuple[np.ndarray, np.ndarray, Letterbox]] | None = None
        if cache_images:
            self._cache = [self._load(i) for i in range(len(self.records))]
            size_bytes = sum(im.nbytes for im, _, _ in self._cache)
            log.info("%s: cached %d images (%.1f MiB)", self.source, len(self._cache), size_bytes / 2**20)

    def subset(self, count: int) -> DetectionDataset:
        """A copy holding ``count`` evenly spaced items (deterministic), with its own ``coco_gt``."""
        keep = np.unique(np.linspace(0, len(self) - 1, min(count, len(self))).round().astype(int)).tolist()
        out = copy.copy(self)
        out.records = [self.records[i] for i in keep]
        out.image_ids = [self.image_ids[i] for i in keep]
        out.coco_gt = build_coco_gt(out.records, self.class_names, self.cat_ids)
        if self._cache is not None:
            out._cache = [self._cache[i] for i in keep]
        return out

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        rec = self.records[index]
        image, boxes, lb = self._cache[index] if self._cache is not None else self._load(index)
        labels = rec.labels
        if self.augment is not None:
            # drawn from torch's RNG so the caller's seed (and DataLoader worker seeding) decides it
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
            image, boxes, labels = apply_augment(image, boxes, labels, self.augment, rng)
        target = {
            "boxes": torch.from_numpy(np.array(boxes, np.float32).reshape(-1, 4)),
            "labels": torch.from_numpy(np.array(labels, np.int64)),
            "image_id": rec.image_id,
            "orig_size": (rec.height, rec.width),
            "letterbox": lb,
        }
        return to_tensor(image), target

    def load_image(self, index: int) -> np.ndarray:
        """The original image of item ``index`` as ``H x W x 3`` uint8 RGB."""
        path = self.records[index].path
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
        except OSError as e:
            image_id = self.records[index].image_id
            raise DatasetError(f"{self.source}: image id {image_id}: cannot read {path}: {e}") from None

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray, Letterbox]:
        return letterbox(self.load_image(index), self.records[index].boxes, self.input_size)

    def __repr__(self) -> str:
        return (
            f"DetectionDataset({self.source!r}, images={len(self)}, classes={self.num_classes}, "
            f"input_size={self.input_size}, augment={self.augment is not None})"
        )


def collate(batch: list[tuple[torch.Tensor, Target]]) -> tuple[torch.Tensor, list[Target]]:
    """Stack images into ``B x 3 x S x S``; targets stay a list."""
    images, targets = zip(*batch, strict=True)
    if all(im.device.type == "cpu" for im in images):
        # NumPy copy: torch.stack waits on its thread pool when the cores are busy (see to_tensor)
        return torch.from_numpy(np.stack([im.numpy() for im in images])), list(targets)
    return torch.stack(images), list(targets)


def make_loader(
    ds: Dataset[Any],
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader[Any]:
    """A DataLoader with :func:`collate`; shuffling (and worker seeds) come from ``seed``.

    With ``world_size > 1`` it is the loader of one process (``rank``) of data-parallel training:
    ``batch_size`` stays the global batch, and the process gets its contiguous ``1/world_size``
    share of every batch the single-process loader draws (:class:`ShardedBatchSampler`), so N
    processes together see exactly the batches one process would. Re-seed ``loader.generator``
    before an epoch on every rank alike: it decides the shared shuffle order. Worker processes'
    seeds are offset by the rank, so that ranks do not draw the same augmentations.
    """
    generator = torch.Generator().manual_seed(seed)
    if world_size == 1:
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=num_workers,
            collate_fn=collate,
            drop_last=drop_last,
            persistent_workers=num_workers > 0,
        )
    if batch_size % world_size:
        raise ConfigError(f"batch_size {batch_size} is the global batch and must be divisible by the number of "
                          f"processes, {world_size} (each takes batch_size / processes images per step)")  # fmt: skip
    # the very sampler DataLoader(shuffle=True, generator=generator) builds, on the loader's own generator,
    # so the permutation (and the loader's draw of its worker base seed before it) matches the single process
    order = RandomSampler(range(len(ds)), generator=generator) if shuffle else SequentialSampler(range(len(ds)))
    batches = ShardedBatchSampler(BatchSampler(order, batch_size, drop_last), rank=rank, world_size=world_size)
    return DataLoader(
        ds,
        batch_sampler=batches,
        generator=generator,
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=num_workers > 0,
        worker_init_fn=_RankWorkerSeed(rank) if rank else None,
    )


class ShardedBatchSampler(Sampler[list[int]]):
    """One rank's contiguous ``1/world_size`` slice of each batch of a global batch sampler.

    Unlike torch's DistributedSampler (its own permutation, interleaved shards) this cuts the
    single-process batches themselves, so a data-parallel run trains on the same global batches
    in the same order as one process. A short last batch (no ``drop_last``) is padded by
    repeating its first items up to a multiple of ``world_size``: every rank must take the same
    number of steps, each with at least one image.
    """

    def __init__(self, batches: Sampler[list[int]], *, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            per_rank = math.ceil(len(batch) / self.world_size)
            padded = (batch * self.world_size)[: per_rank * self.world_size]
            yield padded[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


class _RankWorkerSeed:
    """worker_init_fn: moves a worker's torch seed (augmentations) off the seeds of the other ranks' workers."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(self, worker_id: int) -> None:
        torch.manual_seed((torch.initial_seed() + self.rank * 1_000_003) % 2**63)


def calibration_batches(ds: DetectionDataset, *, images: int, batches: int) -> list[tuple[Any, Any]]:
    """``images`` evenly spaced items of ``ds`` (all when fewer), as ``batches`` (images, targets) batches."""
    if images < len(ds):
        ds = ds.subset(images)
    batch_size = max(1, math.ceil(len(ds) / batches))
    return list(make_loader(ds, batch_size=batch_size, shuffle=False))[:batches]


def load_dataset(
    source: str | Path,
    split: str,
    *,
    input_size: int = 160,
    augment: bool | Augment = False,
    skip_invalid: bool = False,
    cache_images: bool = False,
    cache_dir: str | Path | None = None,
) -> DetectionDataset:
    """Load one split of a dataset.

    Args:
        source: a built-in dataset name (e.g. ``"digits-det"``), a dataset YAML file, or a folder
            holding ``data.yaml``.
        split: split name in the YAML (``"train"``, ``"val"``, ...).
        input_size: side of the square network input images are letterboxed to.
        augment: True for the default :class:`Augment`, or an ``Augment``; False for none.
        skip_invalid: drop invalid records (counted in ``.skipped``) instead of raising.
        cache_images: keep the decoded, letterboxed images in memory.
        cache_dir: where built-in datasets are generated (their default when None).

    Raises:
        DatasetError: for a bad YAML, missing files or invalid records (naming file and record).
        ConfigError: for an unknown built-in name (with the closest known one).
    """
    yaml_path = resolve_source(source, cache_dir=cache_dir)
    spec = load_spec(yaml_path)
    images, ann = spec.split_paths(split, source=str(yaml_path))
    reader = read_coco if spec.format is DatasetFormat.COCO else read_yolo
    records = reader(images, ann, names=spec.names, skip_invalid=skip_invalid)
    aug = Augment() if augment is True else (augment or None)
    return DetectionDataset(records, input_size=input_size, augment=aug, cache_images=cache_images)


def resolve_source(source: str | Path, *, cache_dir: str | Path | None = None) -> Path:
    """The dataset YAML for a built-in name, a YAML path, or a folder with ``data.yaml``."""
    path = Path(source)
    if path.is_dir():
        for name in ("data.yaml", "data.yml", "dataset.yaml"):
            if (path / name).is_file():
                return path / name
        raise DatasetError(f"{path}: folder has no data.yaml")
    if path.exists() or path.suffix in (".yaml", ".yml") or isinstance(source, Path) or "/" in str(source):
        if not path.is_file():
            raise DatasetError(f"{path}: dataset YAML not found")
        return path
    _import_builtins()
    fn = BUILTIN_DATASETS.get(str(source))
    return Path(fn(Path(cache_dir) if cache_dir is not None else None))


def _import_builtins() -> None:
    try:
        import slimdet.data.builtin  # noqa: F401  (registers the built-in datasets)
    except ModuleNotFoundError as e:
        if e.name != "slimdet.data.builtin":
            raise
