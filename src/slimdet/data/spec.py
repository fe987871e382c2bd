"""The dataset YAML file, and the registry of built-in datasets.

Example (paths are relative to ``root``, which is relative to the YAML file's folder)::

    format: coco            # or: yolo
    root: .
    names: [cat, dog]       # required for yolo; for coco taken from the categories (sorted by id)
    splits:
      train: {images: images/train, annotations: annotations/train.json}
      val:   {images: images/val,   annotations: annotations/val.json}
      # yolo: {images: images/train, labels: labels/train}
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from slimdet.errors import DatasetError
from slimdet.registry import Registry, closest

#: A built-in dataset: ``(cache_dir) -> path of its dataset YAML`` (generating the files if needed).
BuiltinDataset = Callable[[Path | None], Path]
BUILTIN_DATASETS: Registry[BuiltinDataset] = Registry("built-in dataset")


def register_builtin(name: str) -> Callable[[BuiltinDataset], BuiltinDataset]:
    """Decorator: register ``fn(cache_dir) -> dataset YAML path`` under ``name``."""
    return BUILTIN_DATASETS.register(name)


class DatasetFormat(StrEnum):
    COCO = "coco"
    YOLO = "yolo"


class SplitSpec(BaseModel):
    """One split: an image folder plus a COCO JSON file (coco) or a label folder (yolo)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    images: Path
    annotations: Path | None = None
    labels: Path | None = None


class DatasetSpec(BaseModel):
    """A dataset YAML file, validated; paths are as written (see :meth:`split_paths`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: DatasetFormat
    root: Path = Path(".")
    names: list[str] | None = None
    splits: dict[str, SplitSpec]
    #: the folder of the YAML file; relative paths start here (set by :func:`load_spec`).
    base_dir: Path = Path(".")

    @model_validator(mode="after")
    def _check_format(self) -> DatasetSpec:
        if not self.splits:
            raise ValueError("splits: at least one split is needed")
        if self.format is DatasetFormat.YOLO and not self.names:
            raise ValueError("names: required for format 'yolo' (one class name per class id)")
        if self.names is not None and len(set(self.names)) != len(self.names):
            raise ValueError(f"names: duplicate class names in {self.names}")
        need, other = ("annotations", "labels") if self.format is DatasetFormat.COCO else ("labels", "annotations")
        for name, split in self.splits.items():
            if getattr(split, need) is None:
                raise ValueError(f"splits.{name}.{need}: required for format '{self.format.value}'")
            if getattr(split, other) is not None:
                raise ValueError(f"splits.{name}.{other}: not used by format '{self.format.value}' (it uses '{need}')")
        return self

    @property
    def root_dir(self) -> Path:
        return self.base_dir / self.root

    def split_paths(self, split: str, *, source: str = "dataset YAML") -> tuple[Path, Path]:
        """(images folder, annotation file or labels folder) of ``split``, checked to exist.

        Raises:
            DatasetError: for an unknown split or a missing folder/file, naming the field.
        """
        if split not in self.splits:
            hint = closest(split, list(self.splits))
            tip = f" (did you mean {hint!r}?)" if hint else ""
            raise DatasetError(f"{source}: splits: no split {split!r}; known: {', '.join(self.splits)}{tip}")
        spec = self.splits[split]
        images = self.root_dir / spec.images
        if not images.is_dir():
            raise DatasetError(f"{source}: splits.{split}.images: folder not found: {images}")
        if self.format is DatasetFormat.COCO:
            ann = self.root_dir / spec.annotations  # type: ignore[operator]
            if not ann.is_file():
                raise DatasetError(f"{source}: splits.{split}.annotations: file not found: {ann}")
            return images, ann
        labels = self.root_dir / spec.labels  # type: ignore[operator]
        if not labels.is_dir():
            raise DatasetError(f"{source}: splits.{split}.labels: folder not found: {labels}")
        return images, labels


def load_spec(path: str | Path) -> DatasetSpec:
    """Read and validate a dataset YAML file.

    Raises:
        DatasetError: naming the file and the field (unknown keys get the closest valid key).
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: dataset YAML not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DatasetError(f"{path}: cannot read dataset YAML: {e}") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: expected a mapping with 'format' and 'splits', got {type(raw).__name__}")
    if "base_dir" in raw:
        raise DatasetError(f"{path}: base_dir: not a YAML key (paths are relative to the YAML's folder; use 'root')")
    try:
        return DatasetSpec.model_validate({**raw, "base_dir": path.parent})
    except ValidationError as e:
        raise DatasetError(f"{path}: {_explain(e)}") from None


def _explain(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key{_suggest(item['loc'])}")
        elif item["type"] == "missing":
            lines.append(f"{loc}: required key missing")
        elif item["type"] == "value_error":
            lines.append(str(item["ctx"]["error"]) if "ctx" in item else item["msg"])
        else:
            lines.append(f"{loc}: {item['msg']} (got {item.get('input')!r})" if loc else item["msg"])
    return lines[0] if len(lines) == 1 else f"{len(lines)} problems:\n  - " + "\n  - ".join(lines)


def _suggest(loc: tuple[Any, ...]) -> str:
    """' (did you mean ...)' for an unknown key, from the fields valid at that place."""
    key = str(loc[-1])
    if len(loc) == 1:
        fields = [f for f in DatasetSpec.model_fields if f != "base_dir"]
    elif loc[0] == "splits":
        fields = list(SplitSpec.model_fields)
    else:
        return ""
    hint = closest(key, fields)
    return f" (did you mean {hint!r}?)" if hint else f" (valid keys: {', '.join(fields)})"
