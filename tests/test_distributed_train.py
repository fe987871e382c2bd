"""Data-parallel training: 2 processes under torchrun (gloo, CPU) against one process with the same global batch.

Run as a script (``python -m torch.distributed.run ... tests/test_distributed_train.py ARGS``) this file is
the worker of the torchrun tests: it trains yolo-test with ``slimdet.train.train`` and saves what each rank
ended with.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from slimdet import distributed
from slimdet.cli import _command_line, build_parser, main
from slimdet.data import load_dataset, make_loader
from slimdet.errors import ConfigError
from slimdet.evaluate import evaluate
from slimdet.io import load_checkpoint, save_checkpoint
from slimdet.models import create_model
from slimdet.train import TrainConfig, _batchnorm, train

#: exact-equivalence run: 4 epochs of 2 steps with a global batch of 4, validation after epochs 2 and 4; the
#: detection loss itself, with batch norm on its running statistics (per-rank statistics are the one thing a
#: CPU run cannot share: torch's SyncBatchNorm refuses CPU tensors)
EXACT = TrainConfig(epochs=4, batch_size=4, max_steps_per_epoch=2, lr=2e-2, warmup_epochs=0.5, eval_every=2,
                    augment=False, threads=1, freeze_bn=True)  # fmt: skip
#: What the exact comparison allows: float rounding (summation order of the gradient all-reduce) only.
#: Measured, 2 ranks vs 1 process: 8.6e-8 of the weight update (relative L2), 1.3e-7 on the loss curve (max
#: relative). Each rank dividing its loss by its own share's target scores instead of the global batch's gives
#: 3.4e-2 and 1.5e-2; a 1-process run drawing other batches (seed 1) differs by 0.60. 1e-5 leaves ~100x headroom
#: for other CPUs and BLAS builds and stays 1000x below either mistake.
FLOAT_TOL = 1e-5


def _model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("yolo-test", num_classes=10, input_size=64)


def _datasets(data: Path):
    train_ds = load_dataset(data, "train", input_size=64, augment=False, cache_images=True)
    return train_ds, train_ds  # validate on the training images: a few steps reach a mAP above 0 there


def _worker(data: str, out: str, dump: str) -> None:
    """One rank of the exact run: resumes the run in ``out``, saves its weights, logs and file writes in ``dump``."""
    import slimdet.train as slimdet_train

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    writes: list[str] = []

    def recorded(fn):
        def wrapper(path, *args, **kwargs):
            writes.append(Path(path).name)
            return fn(path, *args, **kwargs)

        return wrapper

    slimdet_train.save_checkpoint = recorded(slimdet_train.save_checkpoint)
    slimdet_train.atomic_write_json = recorded(slimdet_train.atomic_write_json)
    train_ds, val_ds = _datasets(Path(data))
    model = _model()
    with distributed.process_group():  # one group for training and the evaluation after it
        result = train(model, train_ds, val_ds, EXACT, out_dir=out, resume=True, progress=False)
        gathered = evaluate(model, val_ds, batch_size=1, progress=False, distributed=True).to_dict()
    local = evaluate(model, val_ds, batch_size=1, progress=False).to_dict()
    torch.save({"state": model.state_dict(), "history": result.history, "curve": result.loss_curve, "writes": writes,
                "gathered_eval": gathered, "local_eval": local}, Path(dump) / f"rank{rank}.pt")  # fmt: skip


def _update_rel_diff(a: dict, b: dict, init: dict) -> float:
    """|a - b| / |b - init| over the trained floating-point tensors: the share of the update that differs."""
    keys = [k for k, v in b.items() if v.is_floating_point() and not k.endswith(("running_mean", "running_var"))]
    diff = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in keys) ** 0.5
    update = sum(float(((b[k].double() - init[k].double()) ** 2).sum()) for k in keys) ** 0.5
    return diff / update


def _curve_rel_diff(a: list[dict], b: list[dict]) -> float:
    assert [p["step"] for p in a] == [p["step"] for p in b]
    return max(abs(p["loss"] - q["loss"]) / abs(q["loss"]) for p, q in zip(a, b, strict=True))


def test_two_ranks_resume_and_match_one_process_and_only_rank_0_writes(tiny_digits, tmp_path):
    from tests._crashing import Crashing, Interrupt  # here: the torchrun workers run this file without tests/

    # a 1-process run is killed in its 3rd epoch; 2 ranks under torchrun resume it from last.pt up to epoch 4
    train_ds, val_ds = _datasets(tiny_digits)
    reads_per_epoch = EXACT.max_steps_per_epoch * EXACT.batch_size
    with pytest.raises(Interrupt):
        train(_model(), Crashing(train_ds, 2 * reads_per_epoch + 3), val_ds, EXACT, out_dir=tmp_path / "ddp",
              progress=False)
    assert load_checkpoint(tmp_path / "ddp" / "last.pt")["train_state"]["epoch"] == 1
    assert distributed.launch([__file__, str(tiny_digits), str(tmp_path / "ddp"), str(tmp_path)], nproc=2,
                              module=None) == 0  # fmt: skip
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))

    single_model, init = _model(), _model().state_dict()
    single = train(single_model, train_ds, val_ds, EXACT, out_dir=tmp_path / "one", progress=False)
    other_model = _model()
    other = train(other_model, train_ds, val_ds, EXACT.model_copy(update={"seed": 1}), out_dir=tmp_path / "other",
                  progress=False)

    # it trains: the loss falls, and the weights moved
    assert single.loss_curve[-1]["loss"] < 0.9 * single.loss_curve[0]["loss"]
    assert _update_rel_diff(init, single_model.state_dict(), init) == pytest.approx(1.0)
    # gradients are averaged over the ranks, and both resumed the optimizer: they hold the very same weights
    for (k, a), b in zip(rank0["state"].items(), rank1["state"].values(), strict=True):
        assert torch.equal(a, b), k
    # ... and the resumed 2-rank run is the 1-process run with the same global batches, up to float rounding
    update_diff = _update_rel_diff(rank0["state"], single_model.state_dict(), init)
    curve_diff = _curve_rel_diff(rank0["curve"], single.loss_curve)
    assert update_diff < FLOAT_TOL, update_diff
    assert curve_diff < FLOAT_TOL, curve_diff
    assert [h["epoch"] for h in rank0["history"]] == [0, 1, 2, 3]
    for h, g in zip(rank0["history"], single.history, strict=True):
        assert h.keys() == g.keys()
        for key in ("val_map", "val_map50"):
            assert h.get(key) == pytest.approx(g.get(key), abs=1e-6), (h["epoch"], key)
    assert single.history[-1]["val_map"] > 0
    # the tolerance is far below what other batches change: the comparison can tell a wrong sampler
    assert _update_rel_diff(other_model.state_dict(), single_model.state_dict(), init) > 1000 * FLOAT_TOL
    assert _curve_rel_diff(other.loss_curve, single.loss_curve) > 1000 * FLOAT_TOL

    # validation split over the ranks and gathered scores the detections one process makes
    assert rank0["gathered_eval"] == rank0["local_eval"] == rank1["gathered_eval"]
    assert rank0["gathered_eval"]["num_detections"] > 100 and rank0["gathered_eval"]["num_images"] == 16
    # only rank 0 wrote checkpoints and logs
    assert rank1["writes"] == []
    assert set(rank0["writes"]) == {"last.pt", "best.pt", "history.json", "loss_curve.json"}  # best: epoch 4
    assert json.loads((tmp_path / "ddp" / "history.json").read_text()) == rank0["history"]


def test_cli_nproc_2_trains_like_one_process(tiny_digits, tmp_path, capfd):
    model = _model()
    init = save_checkpoint(tmp_path / "init.pt", model_config=model.model_config, state_dict=model.state_dict())
    args = ["train", "--checkpoint", str(init), "--data", str(tiny_digits), "--epochs", "2", "--batch-size", "8",
            "--lr", "0.01", "--warmup-epochs", "0.5", "--threads", "1", "--no-augment"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "ddp"), "--nproc", "2"]) == 0
    out = capfd.readouterr().out
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--freeze-bn", "--out", str(tmp_path / "ddp-frozen"), "--nproc", "2"]) == 0
    assert main([*args, "--freeze-bn", "--out", str(tmp_path / "one-frozen")]) == 0
    capfd.readouterr()

    # rank 0 alone reported (and wrote: rank 1 printing or writing would show up as a second line)
    assert out.count("checkpoint: ") == 1 and out.count("epoch 2/2") == 1
    for name in ("model.pt", "last.pt", "best.pt", "history.json", "loss_curve.json"):
        assert (tmp_path / "ddp" / name).is_file(), name

    def curve(run: str) -> list[dict]:
        return json.loads((tmp_path / run / "loss_curve.json").read_text())

    ddp, one = curve("ddp"), curve("one")
    assert [p["step"] for p in ddp] == [1, 2, 3, 4]
    # it trains
    assert ddp[-1]["loss"] < ddp[0]["loss"]
    trained = load_checkpoint(tmp_path / "ddp" / "model.pt")["state_dict"]
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in trained.items() if v.is_floating_point())
    # Batch norm in training mode: same weights and the same 8 images at step 1, but the statistics come from 4
    # images per rank, so the losses differ a little (measured 3.2e-4 relative; another shuffle gives 5.1e-3),
    # and AdamW turns that into full-size differences within a few steps.
    assert abs(ddp[0]["loss"] - one[0]["loss"]) / one[0]["loss"] < 2e-3
    # --freeze-bn: nothing depends on how a batch is split, and the whole run is the 1-process run
    assert _curve_rel_diff(curve("ddp-frozen"), curve("one-frozen")) < FLOAT_TOL
    a, b = (load_checkpoint(tmp_path / run / "model.pt")["state_dict"] for run in ("ddp-frozen", "one-frozen"))
    assert _update_rel_diff(a, b, model.state_dict()) < FLOAT_TOL


def test_nproc_needs_a_batch_divisible_by_it(tiny_digits, tmp_path, capsys):
    code = main(["train", "--model", "yolo-test", "--data", str(tiny_digits), "--out", str(tmp_path),
                 "--batch-size", "4", "--nproc", "3"])  # fmt: skip
    assert code == 2
    assert "--batch-size 4 is the global batch and must be divisible by --nproc 3" in capsys.readouterr().err
    ds = load_dataset(tiny_digits, "val", input_size=64)
    with pytest.raises(ConfigError, match="divisible by the number of processes, 3"):
        make_loader(ds, batch_size=4, shuffle=True, world_size=3)


def test_rank_loaders_cut_the_single_process_batches(tiny_digits):
    ds = load_dataset(tiny_digits, "train", input_size=64)  # 16 images

    def ids(loader, epoch):
        loader.generator.manual_seed(epoch)
        return [[t["image_id"] for t in targets] for _, targets in loader]

    for batch, drop_last in ((6, True), (6, False), (16, False)):
        one = make_loader(ds, batch_size=batch, shuffle=True, seed=0, drop_last=drop_last)
        ranks = [make_loader(ds, batch_size=batch, shuffle=True, seed=0, drop_last=drop_last, rank=r, world_size=2)
                 for r in (0, 1)]  # fmt: skip
        for epoch in (3, 4):
            expected = ids(one, epoch)
            got = [ids(loader, epoch) for loader in ranks]
            assert [a + b for a, b in zip(*got, strict=True)] == expected, (batch, drop_last, epoch)
        assert len(ranks[0]) == len(ranks[1]) == len(one)
    # 3 ranks, batch 6, no drop_last: the last batch holds 16 - 2 x 6 = 4 images, padded to 3 equal shares
    last = [list(make_loader(ds, batch_size=6, shuffle=False, rank=r, world_size=3))[-1] for r in range(3)]
    assert [len(targets) for _, targets in last] == [2, 2, 2]


def test_sync_bn_refuses_the_cpu_and_the_swap_gives_plain_batchnorm_back():
    model = _model()
    ctx = distributed.DistContext(rank=0, world_size=2, local_rank=0, backend="gloo", device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="SyncBatchNorm needs CUDA"):
        _batchnorm(model, TrainConfig(sync_bn=True), ctx)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bn_names = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    with distributed.sync_batchnorm(model):
        assert {n for n, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)} == bn_names
        model.train()(torch.rand(2, 3, 64, 64))  # no process group: plain batch norm, running stats move
    assert {n for n, m in model.named_modules() if type(m) is nn.BatchNorm2d} == bn_names
    moved = [k for k, v in model.state_dict().items() if k.endswith("running_mean") and not torch.equal(v, before[k])]
    assert len(moved) == len(bn_names)  # the originals got the state the swapped layers reached


def test_nproc_relaunch_repeats_the_command_without_nproc():
    parser = build_parser()
    argv = ["train", "--model", "yolo-test", "--data", "d.yaml", "--out", "o", "--batch-size", "8", "--no-ema",
            "--augment", "--resume", "--lr", "0.01", "--nproc", "2"]  # fmt: skip
    args = parser.parse_args(argv)
    again = parser.parse_args(["train", *_command_line(args.command_parser, args, leave_out={"nproc"})])
    assert again.nproc is None
    assert vars(again) == vars(args) | {"nproc": None}


if __name__ == "__main__":
    _worker(*sys.argv[1:])
