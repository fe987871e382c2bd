import json

import pytest
import torch

from slimdet.compress.sparse_storage import nm_groups
from slimdet.errors import ConfigError
from slimdet.models import load_model
from slimdet.pipeline import run_recipe
from slimdet.pipeline.recipe import load_recipe


def _recipe(tiny_digits, steps):
    return {"model": "yolo-test", "dataset": str(tiny_digits), "input_size": 64, "steps": steps}


def _outputs(model):
    model.eval()
    with torch.no_grad():
        return model(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)))


def test_sparsify_then_finetune_keeps_2_4_and_checkpoints_round_trip(tiny_digits, tmp_path):
    finetune = {"epochs": 1, "batch_size": 4, "max_steps_per_epoch": 2, "val_split": None, "threads": 1}
    steps = [{"sparsify": {"mode": "n_m", "ignore": ["neck"]}}, {"finetune": finetune}]
    result = run_recipe(_recipe(tiny_digits, steps), out_dir=tmp_path / "run", progress=False)

    rec = json.loads((tmp_path / "run" / "steps" / "00_sparsify" / "record.json").read_text())
    assert rec["metrics"]["sparsity"] == pytest.approx(0.5)
    assert rec["metrics"]["sparse_bytes"] < rec["metrics"]["dense_bytes"]
    assert rec["metrics"]["model_sparse_bytes"] < rec["metrics"]["model_dense_bytes"]
    assert "do not run faster" in rec["metrics"]["note"]
    assert rec["record"]["layers"] and all(not layer["name"].startswith("neck.") for layer in rec["record"]["layers"])

    for step in ("00_sparsify", "01_finetune"):  # each stage's checkpoint rebuilds the masked model
        model, _ = load_model(tmp_path / "run" / "steps" / step / "model.pt")
        masked = {n: m for n, m in model.named_modules() if hasattr(m, "weight_mask")}
        assert len(masked) == len(rec["record"]["layers"])
        for name, module in masked.items():
            assert torch.all((nm_groups(module.weight_mask, 4) == 0).sum(dim=1) == 2), name
            assert torch.all((module.weight_orig * module.weight_mask)[module.weight_mask == 0] == 0), name
    for a, b in zip(_outputs(model), _outputs(result.model), strict=True):
        assert torch.equal(a, b)

    resumed = run_recipe(_recipe(tiny_digits, steps), out_dir=tmp_path / "run", resume=True, progress=False)
    assert resumed.skipped == ["00_sparsify", "01_finetune"]


def test_unknown_sparsify_option_is_refused_by_the_recipe(tiny_digits):
    with pytest.raises(ConfigError, match="sparsty"):
        load_recipe(_recipe(tiny_digits, [{"sparsify": {"sparsty": 0.5}}]))
