import json

import pytest
import torch

from slimdet.compress.share import shared_layers
from slimdet.errors import ConfigError
from slimdet.export.archive import read_archive
from slimdet.models import load_model
from slimdet.pipeline import run_recipe
from slimdet.pipeline.recipe import load_recipe


def _recipe(tiny_digits, steps):
    return {"model": "yolo-test", "dataset": str(tiny_digits), "input_size": 64, "steps": steps}


def _outputs(model):
    model.eval()
    with torch.no_grad():
        return model(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)))


def test_sparsify_share_finetune_export_archive(tiny_digits, tmp_path):
    finetune = {"epochs": 1, "batch_size": 4, "max_steps_per_epoch": 2, "val_split": None, "threads": 1}
    steps = [{"sparsify": {"sparsity": 0.7, "scope": "layer"}}, {"share": {"bits": 3}}, {"finetune": finetune},
             {"export": {"format": "archive"}}]  # fmt: skip
    result = run_recipe(_recipe(tiny_digits, steps), out_dir=tmp_path / "run", progress=False)
    steps_dir = tmp_path / "run" / "steps"

    share = json.loads((steps_dir / "01_share" / "record.json").read_text())
    m = share["metrics"]
    assert m["layers"] == len(share["record"]["layers"]) > 40 and m["bits"] == 3
    assert m["dense_bytes"] > m["pruned_bytes"] > m["shared_bytes"] and m["ratio_shared"] > 5
    assert all(layer["clusters_used"] <= 8 for layer in share["record"]["layers"])

    export = json.loads((steps_dir / "03_export" / "record.json").read_text())
    e = export["metrics"]
    archive = steps_dir / "03_export" / "model.sdz"
    assert e["format"] == "archive" and e["max_abs_diff"] == 0.0
    assert e["size_bytes"] == e["huffman_bytes"] == archive.stat().st_size
    assert e["ratio_huffman"] == pytest.approx(e["dense_bytes"] / e["size_bytes"])

    finetuned, _ = load_model(steps_dir / "02_finetune" / "model.pt")
    assert set(shared_layers(finetuned)) == set(shared_layers(result.model))
    for a, b, c in zip(_outputs(result.model), _outputs(finetuned), _outputs(read_archive(archive)), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_unknown_share_option_and_export_format_are_refused(tiny_digits):
    with pytest.raises(ConfigError, match="bitz"):
        load_recipe(_recipe(tiny_digits, [{"share": {"bitz": 4}}]))
    with pytest.raises(ConfigError, match="unsupported format 'zip': only 'onnx' and 'archive'"):
        load_recipe(_recipe(tiny_digits, [{"export": {"format": "zip"}}]))
