"""Detection datasets: COCO-JSON and YOLO-txt readers, built-ins, transforms and loaders.

Typical use::

    train = load_dataset("digits-det", "train", augment=True, cache_images=True)
    loader = make_loader(train, batch_size=32, shuffle=True, seed=0)
"""

from slimdet.data.coco import read_coco
from slimdet.data.dataset import (
    DetectionDataset,
    calibration_batches,
    collate,
    load_dataset,
    make_loader,
    resolve_source,
)
from slimdet.data.records import ImageRecord, RecordSet
from slimdet.data.spec import BUILTIN_DATASETS, DatasetFormat, DatasetSpec, load_spec, register_builtin
from slimdet.data.transforms import Augment, hflip, letterbox, unletterbox
from slimdet.data.yolo import read_yolo

__all__ = [
    "BUILTIN_DATASETS",
    "Augment",
    "DatasetFormat",
    "DatasetSpec",
    "DetectionDataset",
    "calibration_batches",
    "ImageRecord",
    "RecordSet",
    "collate",
    "hflip",
    "letterbox",
    "load_dataset",
    "load_spec",
    "make_loader",
    "read_coco",
    "read_yolo",
    "register_builtin",
    "resolve_source",
    "unletterbox",
]
