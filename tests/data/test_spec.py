from __future__ import annotations

from pathlib import Path

import pytest

from slimdet.data import BUILTIN_DATASETS, DatasetFormat, load_dataset, load_spec
from slimdet.data.spec import BuiltinDataset
from slimdet.errors import ConfigError, DatasetError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "data.yaml"
    path.write_text(text)
    return path


def _spec_error(path: Path) -> str:
    with pytest.raises(DatasetError) as info:
        load_spec(path)
    return str(info.value)


def test_unknown_top_level_key_suggests_the_closest(tmp_path):
    path = _write(tmp_path, "format: coco\nsplit:\n  train: {images: i, annotations: a.json}\n")
    msg = _spec_error(path)
    assert msg.startswith(f"{path}: ") and "split: unknown key (did you mean 'splits'?)" in msg


def test_unknown_split_key_suggests_the_closest(tmp_path):
    msg = _spec_error(_write(tmp_path, "format: coco\nsplits:\n  train: {imgs: i, annotations: a.json}\n"))
    assert "splits.train.imgs: unknown key (did you mean 'images'?)" in msg


def test_bad_format_value_names_the_field(tmp_path):
    msg = _spec_error(_write(tmp_path, "format: voc\nsplits:\n  train: {images: i, annotations: a.json}\n"))
    assert "data.yaml: format:" in msg and "'coco' or 'yolo'" in msg and "'voc'" in msg


def test_yolo_needs_names_and_labels(tmp_path):
    msg = _spec_error(_write(tmp_path, "format: yolo\nsplits:\n  train: {images: i, labels: l}\n"))
    assert "names: required for format 'yolo'" in msg
    text = "format: yolo\nnames: [a]\nsplits:\n  train: {images: i, annotations: a.json}\n"
    msg = _spec_error(_write(tmp_path, text))
    assert "splits.train.labels: required for format 'yolo'" in msg


def test_not_a_mapping_and_bad_yaml(tmp_path):
    assert "expected a mapping" in _spec_error(_write(tmp_path, "- a\n- b\n"))
    assert "cannot read dataset YAML" in _spec_error(_write(tmp_path, "format: [coco\n"))
    assert "dataset YAML not found" in _spec_error(tmp_path / "nope.yaml")


def test_paths_are_relative_to_the_yaml_folder(coco_dataset, tmp_path, monkeypatch):
    yaml_path = coco_dataset()
    monkeypatch.chdir(tmp_path.parent)
    spec = load_spec(yaml_path)
    assert spec.format is DatasetFormat.COCO
    images, ann = spec.split_paths("train")
    assert images == yaml_path.parent / "images/train" and ann.is_file()


def test_root_is_relative_to_the_yaml_folder(coco_dataset, tmp_path):
    coco_dataset()
    sub = tmp_path / "cfg"
    sub.mkdir()
    path = sub / "d.yaml"
    path.write_text(
        "format: coco\nroot: ..\nsplits:\n  train: {images: images/train, annotations: annotations/train.json}\n"
    )
    assert len(load_dataset(path, "train", input_size=32)) == 3


def test_missing_folder_names_file_and_field(tmp_path):
    path = _write(tmp_path, "format: coco\nsplits:\n  train: {images: nowhere, annotations: a.json}\n")
    with pytest.raises(DatasetError) as info:
        load_dataset(path, "train")
    assert str(info.value) == f"{path}: splits.train.images: folder not found: {tmp_path / 'nowhere'}"


def test_missing_annotation_file_names_the_field(coco_dataset):
    yaml_path = coco_dataset()
    (yaml_path.parent / "annotations/train.json").unlink()
    with pytest.raises(DatasetError, match=r"data.yaml: splits.train.annotations: file not found: .*train.json"):
        load_dataset(yaml_path, "train")


def test_unknown_split_suggests_the_closest(coco_dataset):
    with pytest.raises(DatasetError, match=r"no split 'trian'; known: train \(did you mean 'train'\?\)"):
        load_dataset(coco_dataset(), "trian")


def test_source_may_be_a_folder_with_data_yaml(coco_dataset):
    assert load_dataset(coco_dataset().parent, "train", input_size=32).image_ids == [1, 2, 3]


def test_builtin_name_resolves_through_the_registry(coco_dataset, monkeypatch, tmp_path):
    yaml_path = coco_dataset()
    seen: list[Path | None] = []

    def fake(cache_dir: Path | None) -> Path:
        seen.append(cache_dir)
        return yaml_path

    fn: BuiltinDataset = fake
    monkeypatch.setitem(BUILTIN_DATASETS._items, "fake-det", fn)
    ds = load_dataset("fake-det", "train", input_size=32, cache_dir=tmp_path / "cache")
    assert len(ds) == 3 and seen == [tmp_path / "cache"]
    with pytest.raises(ConfigError, match=r"unknown built-in dataset 'fake-dte'.*did you mean 'fake-det'"):
        load_dataset("fake-dte", "train")


def test_register_builtin_decorator_registers_once(monkeypatch):
    from slimdet.data import register_builtin

    monkeypatch.setattr(BUILTIN_DATASETS, "_items", dict(BUILTIN_DATASETS._items))

    @register_builtin("tiny-test")
    def tiny(cache_dir: Path | None) -> Path:
        return Path("x.yaml")

    assert BUILTIN_DATASETS.get("tiny-test") is tiny
    with pytest.raises(ValueError, match="registered twice"):
        register_builtin("tiny-test")(tiny)
