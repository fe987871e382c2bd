"""The ``slimdet`` command: a thin layer over slimdet.pipeline and the verbs (train, evaluate, ...).

``main(argv)`` runs in-process and returns the exit code: 0 on success, 2 for a user error or an
OS error such as a full disk (printed as ``error: <message>``, no traceback), argparse's code for a
usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from slimdet.errors import ConfigError, SlimdetError

DEMO_DATASET = "digits-det"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.func(args) or 0)
    except SlimdetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment, not the code: a full disk, a read-only or missing place
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slimdet", description="Make object detectors small and fast, with evidence.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="built-in datasets").add_subparsers(dest="data_command", required=True)
    build = data.add_parser("build", help="generate a built-in dataset (if not cached) and print its YAML path")
    build.add_argument("name", help="built-in dataset name, e.g. digits-det")
    build.add_argument(
        "--cache-dir", type=Path, help="where to generate it (default: $SLIMDET_CACHE or ~/.cache/slimdet)"
    )
    build.set_defaults(func=cmd_data_build)

    tr = sub.add_parser("train", help="train a model (from scratch or a checkpoint)", epilog=TRAIN_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    src = tr.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="registry name (see 'slimdet models')")
    src.add_argument("--checkpoint", type=Path, help="slimdet checkpoint to start from")
    tr.add_argument("--data", required=True, help="built-in dataset name or dataset YAML")
    tr.add_argument("--out", type=Path, required=True, help="output folder (checkpoints, logs)")
    tr.add_argument("--input-size", type=int, default=160)
    for flag, kind in (("--epochs", int), ("--batch-size", int), ("--lr", float), ("--weight-decay", float),
                       ("--warmup-epochs", float), ("--seed", int), ("--workers", int), ("--threads", int),
                       ("--max-steps-per-epoch", int), ("--eval-every", int)):  # fmt: skip
        tr.add_argument(flag, type=kind, help="TrainConfig field (its default when omitted)")
    for flag in ("--ema", "--augment", "--cache-images", "--sync-bn", "--freeze-bn"):
        tr.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help="TrainConfig field")
    tr.add_argument("--resume", action="store_true", help="continue the training stored in --out")
    tr.add_argument("--skip-invalid", action="store_true", help="drop invalid dataset records instead of failing")
    tr.add_argument("--teacher", type=Path, help="distill from this slimdet checkpoint (default loss weights)")
    tr.add_argument("--nproc", type=int, metavar="N", help="train data-parallel in N processes on this machine "
                    "(torchrun; gloo on CPU, nccl with one GPU each); --batch-size stays the global batch")  # fmt: skip
    tr.set_defaults(func=cmd_train, command_parser=tr)

    ev = sub.add_parser("eval", help="COCO mAP of a checkpoint on a dataset split")
    ev.add_argument("checkpoint", type=Path)
    ev.add_argument("--data", required=True, help="built-in dataset name or dataset YAML")
    ev.add_argument("--split", default="test")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--conf-thres", type=float, default=0.001)
    ev.add_argument("--iou-thres", type=float, default=0.6)
    ev.add_argument("--max-images", type=int, help="evaluate on this many evenly spaced images")
    ev.add_argument("--json", type=Path, help="also write the result as JSON here")
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser("profile", help="params, MACs, size and latency (PyTorch, ONNX Runtime)")
    pr.add_argument("model", help="checkpoint file or registry name")
    pr.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    pr.add_argument("--threads", type=int)
    pr.add_argument("--runs", type=int, default=30)
    pr.add_argument("--warmup", type=int, default=5)
    pr.add_argument("--no-onnx", dest="onnx", action="store_false", help="PyTorch only")
    pr.add_argument("--num-classes", type=int, default=10, help="for a registry name (default 10)")
    pr.add_argument("--input-size", type=int, default=160, help="for a registry name (default 160)")
    pr.add_argument("--layers", action="store_true", help="print the per-layer table")
    pr.add_argument("--json", type=Path, help="also write the result as JSON here")
    pr.set_defaults(func=cmd_profile)

    ex = sub.add_parser("export", help="export a checkpoint (ONNX)")
    ex.add_argument("checkpoint", type=Path)
    ex.add_argument("--format", default="onnx", help="onnx (more formats come later)")
    ex.add_argument("--out", type=Path, required=True, help="output file")
    ex.add_argument("--batch-size", type=int, default=1)
    ex.add_argument("--dynamic-batch", action="store_true")
    ex.set_defaults(func=cmd_export)

    co = sub.add_parser("compress", help="run a recipe into a run directory")
    co.add_argument("recipe", type=Path)
    co.add_argument("--out", type=Path, required=True, help="run directory")
    co.add_argument("--resume", action="store_true", help="continue the run stored in --out")
    co.add_argument("--quiet", action="store_true", help="no progress output")
    co.set_defaults(func=cmd_compress)

    de = sub.add_parser("demo", help="digits-det + baseline yolo-s + recipes/default.yaml, end to end")
    de.add_argument("--out", type=Path, default=Path("runs/demo"))
    de.add_argument("--retrain", action="store_true", help="train the baseline instead of using the shipped one")
    de.set_defaults(func=cmd_demo)

    sm = sub.add_parser("simulate", help="model a network on a systolic-array accelerator: per-layer table, plot")
    sm.add_argument("model", nargs="?", help="registry name or checkpoint file")
    sm.add_argument("--checkpoint", type=Path, help="slimdet checkpoint (instead of MODEL)")
    sm.add_argument("--target", required=True, help="systolic accelerator preset (e.g. edge-npu) or spec YAML")
    sm.add_argument("--input-size", type=int, default=160, help="for a registry name (default 160)")
    sm.add_argument("--num-classes", type=int, default=10, help="for a registry name (default 10)")
    sm.add_argument("--out", type=Path, help="also write simulate.json and the breakdown plot simulate.png here")
    sm.set_defaults(func=cmd_simulate)

    cd = sub.add_parser("codesign", help="search compression policies x accelerator configurations (Pareto report)")
    cd_src = cd.add_mutually_exclusive_group(required=True)
    cd_src.add_argument("--model", help="registry name: the shipped baseline for it on --data (e.g. yolo-n, yolo-s)")
    cd_src.add_argument("--checkpoint", type=Path, help="a trained slimdet checkpoint")
    cd.add_argument("--data", default="digits-det", help="built-in dataset name or dataset YAML")
    cd.add_argument("--out", type=Path, required=True, help="output folder (resumes a finished part when re-run)")
    cd.add_argument("--config", type=Path, help="CodesignConfig YAML (search spaces, selection); defaults otherwise")
    cd.add_argument("--quiet", action="store_true", help="no progress output")
    add_ray_flags(cd, "the policies' prune + fine-tune and quantize + evaluate trials")
    cd.set_defaults(func=cmd_codesign)

    se = sub.add_parser("sensitivity", help="pruning sensitivity of each prunable group: table, JSON and plot")
    se.add_argument("model", help="checkpoint file, or a registry name with a shipped baseline on --data (yolo-s)")
    se.add_argument("--data", default="digits-det", help="built-in dataset name or dataset YAML")
    se.add_argument("--out", type=Path, required=True, help="output folder: sensitivity.txt, .json, .png")
    se.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="fractions of a group's "
                    "channels removed (default 0.25 0.5 0.75)")  # fmt: skip
    se.add_argument("--importance", default="l1", help="channel importance criterion (default l1)")
    se.add_argument("--proxy", choices=["loss", "distortion"], default="loss", help="what a trial measures on the "
                    "calibration batches: the detector's loss, or the distortion of its raw outputs")  # fmt: skip
    se.add_argument("--calib-images", type=int, default=32, help="train images the proxy is measured on (default 32)")
    se.add_argument("--calib-batches", type=int, default=4, help="in this many batches (default 4)")
    se.add_argument("--map-images", type=int, help="also the mAP drop on this many --map-split images (slow: one "
                    "evaluation per trial)")  # fmt: skip
    se.add_argument("--map-split", default="val")
    se.add_argument("--threads", type=int, default=1, help="torch threads per trial (default 1: the same count gives "
                    "the same table with and without --ray)")  # fmt: skip
    se.add_argument("--quiet", action="store_true", help="no progress output")
    add_ray_flags(se, "the (group, ratio) trials")
    se.set_defaults(func=cmd_sensitivity)

    mi = sub.add_parser("metainit", help="meta-learn an initialization for a compact detector (Reptile over tasks)")
    mi.add_argument("--model", default="yolo-n", help="registry name of a YOLO-family model (default yolo-n)")
    mi.add_argument("--data", default="digits-det", help="built-in dataset name or dataset YAML (its train split)")
    mi.add_argument("--out", type=Path, required=True, help="output folder (last.pt, metainit.pt)")
    for flag, kind in (("--input-size", int), ("--meta-iters", int), ("--inner-steps", int), ("--inner-lr", float),
                       ("--meta-lr", float), ("--meta-batch", int), ("--batch-size", int), ("--seed", int),
                       ("--threads", int), ("--checkpoint-every", int)):  # fmt: skip
        mi.add_argument(flag, type=kind, help="MetaInitConfig field (its default when omitted)")
    mi.add_argument("--ways", type=int, help="classes per task (default 3)")
    mi.add_argument("--held-out", type=int, nargs="*", help="class ids never used in meta-training (default 7 8 9)")
    mi.add_argument("--meta-classes", type=int, nargs="+", help="class ids to meta-train on (default: all others)")
    mi.add_argument("--scales", type=float, nargs="+", help="zoom-out factors in (0, 1] (default 0.6 0.8 1.0)")
    mi.add_argument("--backgrounds", nargs="+", help="colour modes: color, gray (default both)")
    mi.add_argument("--images-per-task", type=int, help="at most this many images per task (default all)")
    mi.add_argument("--erase-held-out", action=argparse.BooleanOptionalAction, default=None,
                    help="paint held-out objects over in meta-training images (default on)")  # fmt: skip
    mi.add_argument("--union", action="store_true", help="run the baseline instead: ordinary pretraining on the "
                    "union of the tasks (same data and gradient steps, no meta-update)")  # fmt: skip
    mi.add_argument("--resume", action="store_true", help="continue the run stored in --out")
    mi.add_argument("--quiet", action="store_true", help="no progress bar")
    mi.set_defaults(func=cmd_metainit)

    sc = sub.add_parser("schedule", help="partition a model across devices: latency and pipelined throughput plans")
    sc.add_argument("model", help="registry name or checkpoint file")
    sc.add_argument("--devices", default="npu,cpu", help="comma-separated: npu, cpu, gpu, a preset, a spec YAML, "
                    "or name=preset (default npu,cpu)")  # fmt: skip
    sc.add_argument("--bits", type=int, help="price GEMMs and tensors at these bits (a float model as deployed)")
    sc.add_argument("--method", default="auto", choices=["auto", "dp", "milp", "heft", "brute"],
                    help="latency partitioner (auto: dp for a chain, milp for <= 12 nodes, else heft)")  # fmt: skip
    sc.add_argument("--depth", type=int, help="coarser nodes: one per call of a module this deep (2: backbone.stage1)")
    sc.add_argument("--link-gb-per-s", type=float, help="link bandwidth, GB/s (default: the slower DRAM)")
    sc.add_argument("--link-latency-us", type=float, help="fixed cost of one transfer, us (default 20)")
    sc.add_argument("--input-size", type=int, default=160, help="for a registry name (default 160)")
    sc.add_argument("--num-classes", type=int, default=10, help="for a registry name (default 10)")
    sc.add_argument("--out", type=Path, help="also write schedule.json and gantt.png here")
    sc.set_defaults(func=cmd_schedule)

    mo = sub.add_parser("models", help="list registered models")
    mo.set_defaults(func=cmd_models)
    return p


def cmd_codesign(args: argparse.Namespace) -> int:
    import torch

    from slimdet.models import load_model
    from slimdet.search.codesign import CodesignConfig, codesign
    from slimdet.search.parallel import TrialRunner

    cfg = CodesignConfig()
    if args.config is not None:
        import yaml
        from pydantic import ValidationError

        from slimdet.pipeline.validation import error_messages

        if not args.config.is_file():
            raise ConfigError(f"{args.config}: codesign config file not found")
        raw = yaml.safe_load(args.config.read_text(encoding="utf-8")) or {}
        try:
            cfg = CodesignConfig.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(f"{args.config}: " + "; ".join(error_messages(exc, CodesignConfig))) from None
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = shipped_baseline(args.model, str(args.data))
        if checkpoint is None:
            raise ConfigError(f"--model {args.model}: no shipped baseline for it on {args.data}; train one "
                              f"('slimdet train --model {args.model} --data {args.data} --out DIR') and pass "
                              "--checkpoint DIR/best.pt")  # fmt: skip
    model, _ = load_model(checkpoint)
    # the points depend on the torch thread count of a trial (oneDNN's summation order): unset, it is this
    # process's count for the Ray trials too, so that --ray gives the plain run's points ('threads: 1' in --config
    # lets more trials run at once)
    threads = cfg.threads or torch.get_num_threads()
    runner = TrialRunner.from_flags(ray=args.ray, address=args.ray_address, threads=threads)
    result = codesign(model.eval(), str(args.data), cfg, out_dir=args.out, checkpoint=checkpoint,
                      progress=not args.quiet, runner=runner)  # fmt: skip
    from slimdet.search.codesign_report import pareto_table

    print(pareto_table(result.points, result.pareto, result.chosen))
    print(f"{len(result.points)} points, {len(result.pareto)} on the Pareto front; report: {args.out / 'report.html'}; "
          f"chosen recipe: {result.recipe_path} ({result.time_s:.0f} s)")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from slimdet.data import calibration_batches, load_dataset
    from slimdet.io import atomic_write_text
    from slimdet.models import load_model
    from slimdet.search.parallel import TrialRunner
    from slimdet.search.sensitivity import sensitivity_scan

    if Path(args.model).is_file():
        checkpoint: Path | None = Path(args.model)
    elif args.model.endswith((".pt", ".pth")) or "/" in args.model:
        raise ConfigError(f"{args.model}: checkpoint file not found")
    elif (checkpoint := shipped_baseline(args.model, str(args.data))) is None:
        raise ConfigError(f"{args.model}: no shipped baseline for it on {args.data}; pass a trained checkpoint file")
    for flag in ("calib_images", "calib_batches", "map_images", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    model, _ = load_model(checkpoint)
    size = model.input_size
    calib = calibration_batches(load_dataset(args.data, "train", input_size=size), images=args.calib_images,
                                batches=args.calib_batches)  # fmt: skip
    map_dataset = None
    if args.map_images is not None:
        map_dataset = load_dataset(args.data, args.map_split, input_size=size)
        if args.map_images < len(map_dataset):
            map_dataset = map_dataset.subset(args.map_images)
    runner = TrialRunner.from_flags(ray=args.ray, address=args.ray_address, threads=args.threads)
    result = sensitivity_scan(model.eval(), calib=calib, ratios=args.ratios, importance=args.importance,
                              proxy=args.proxy, map_dataset=map_dataset, progress=not args.quiet,
                              runner=runner)  # fmt: skip
    atomic_write_text(args.out / "sensitivity.txt", result.table() + "\n")
    _maybe_json(args.out / "sensitivity.json", result.to_dict())
    plot = result.plot(args.out / "sensitivity.png")
    print(result.table())
    print(f"table: {args.out / 'sensitivity.txt'}, {args.out / 'sensitivity.json'}; plot: {plot}")
    return 0


def add_ray_flags(parser: argparse.ArgumentParser, trials: str) -> None:
    """``--ray`` and ``--ray-address`` of a search command (slimdet.search.parallel.TrialRunner)."""
    parser.add_argument("--ray", action="store_true", help=f"run {trials} as Ray tasks, on a local Ray instance "
                        "unless --ray-address (needs pip install 'slimdet[distributed]')")  # fmt: skip
    parser.add_argument("--ray-address", metavar="ADDR", help="an existing Ray cluster, as 'ray start --head' "
                        "prints it, or 'auto' (implies --ray)")  # fmt: skip


def cmd_metainit(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from slimdet.compress.metainit import MetaInitConfig, TaskFamily, pretrain_union, run_metainit
    from slimdet.pipeline.validation import error_messages

    family = {"dataset": str(args.data)} | {
        k: getattr(args, k)
        for k in ("ways", "held_out", "meta_classes", "scales", "backgrounds", "images_per_task", "erase_held_out")
        if getattr(args, k) is not None
    }  # fmt: skip
    fields = ("input_size", "meta_iters", "inner_steps", "inner_lr", "meta_lr", "meta_batch", "batch_size", "seed",
              "threads", "checkpoint_every")  # fmt: skip
    values = {k: getattr(args, k) for k in fields if getattr(args, k) is not None}
    try:
        cfg = MetaInitConfig(model=args.model, family=TaskFamily(**family), **values)
    except ValidationError as exc:
        model_cls = TaskFamily if exc.title == "TaskFamily" else MetaInitConfig
        raise ConfigError("metainit options: " + "; ".join(error_messages(exc, model_cls))) from None
    run = pretrain_union if args.union else run_metainit
    result = run(cfg, out_dir=args.out, resume=args.resume, progress=not args.quiet)
    print(f"checkpoint: {result.checkpoint} ({result.kind}, {result.gradient_steps} gradient steps, "
          f"{result.time_s:.0f} s)")  # fmt: skip
    return 0


def cmd_data_build(args: argparse.Namespace) -> int:
    print(build_builtin(args.name, args.cache_dir))
    return 0


def build_builtin(name: str, cache_dir: Path | None = None) -> Path:
    """Generate a built-in dataset unless cached; returns its dataset YAML."""
    import slimdet.data.builtin  # noqa: F401  (registers the built-in datasets)
    from slimdet.data import BUILTIN_DATASETS

    return Path(BUILTIN_DATASETS.get(name)(cache_dir))


TRAIN_EPILOG = """\
data-parallel training:
  slimdet train ... --nproc N  runs this command in N processes on this machine under torchrun
  (python -m torch.distributed.run --standalone --nproc_per_node N -m slimdet train ...).
  On several machines start torchrun on each one (--node_rank 0 on the machine at --master_addr):
    torchrun --nnodes 2 --node_rank 0 --master_addr 10.0.0.1 --master_port 29500 --nproc_per_node 4 \\
        -m slimdet train --model yolo-s --data digits-det --batch-size 64 --out runs/ddp
  --batch-size is the global batch (divisible by the number of processes); the processes train on
  the batches one process would, and only rank 0 writes --out.
"""


def cmd_train(args: argparse.Namespace) -> int:
    from slimdet import distributed

    fields = ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "seed", "workers", "threads",
              "max_steps_per_epoch", "eval_every", "ema", "augment", "cache_images", "sync_bn",
              "freeze_bn")  # fmt: skip
    cfg = train_config({k: getattr(args, k) for k in fields if getattr(args, k) is not None})
    if getattr(args, "nproc", None) is not None:
        if cfg.batch_size % args.nproc:
            raise ConfigError(f"--batch-size {cfg.batch_size} is the global batch and must be divisible by --nproc "
                              f"{args.nproc} (each process takes batch-size / nproc images per step)")  # fmt: skip
        argv = ["train", *_command_line(args.command_parser, args, leave_out={"nproc"})]
        return distributed.launch(argv, nproc=args.nproc)
    source = {"checkpoint": args.checkpoint} if args.checkpoint is not None else {"model": args.model}
    with distributed.process_group():  # under torchrun: one group for training and for writing model.pt
        path = train_checkpoint(
            **source, data=args.data, input_size=args.input_size, cfg=cfg, out=args.out, resume=args.resume,
            skip_invalid=args.skip_invalid, teacher=args.teacher,
        )  # fmt: skip
        if distributed.is_main():
            print(f"checkpoint: {path} (final weights; the best on validation: {args.out / 'best.pt'})")
    return 0


def _command_line(parser: argparse.ArgumentParser, args: argparse.Namespace, *, leave_out: set[str]) -> list[str]:
    """The options of ``args`` that differ from ``parser``'s defaults, as arguments it parses back to them."""
    out: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in leave_out or action.dest == "help":
            continue
        value = getattr(args, action.dest, None)
        if value is None or value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            out.append(flag if value else "--no-" + flag.removeprefix("--"))
        elif action.nargs == 0:  # store_true
            out.append(flag)
        else:
            out += [flag, *(map(str, value) if isinstance(value, list) else [str(value)])]
    return out


def train_config(values: dict[str, Any]) -> Any:
    """A TrainConfig, with invalid values reported as a ConfigError naming the option."""
    from pydantic import ValidationError

    from slimdet.pipeline.validation import error_messages
    from slimdet.train import TrainConfig

    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        raise ConfigError("train options: " + "; ".join(error_messages(exc, TrainConfig))) from None


def train_checkpoint(
    *,
    data: str,
    cfg: Any,
    out: Path,
    model: str | None = None,
    checkpoint: Path | None = None,
    input_size: int = 160,
    resume: bool = False,
    skip_invalid: bool = False,
    teacher: Path | None = None,
) -> Path:
    """Train a registry model (or continue a checkpoint) and save its final weights to ``out/model.pt``;
    with ``teacher``, distil from that checkpoint (slimdet.compress.distill, default weights)."""
    from contextlib import nullcontext

    from slimdet import distributed
    from slimdet.compress.distill import DistillConfig, Distiller, load_teacher
    from slimdet.io import save_checkpoint
    from slimdet.models import create_model, load_model
    from slimdet.pipeline.run import dataset_num_classes
    from slimdet.train import fit

    if checkpoint is not None:
        net, _ = load_model(checkpoint)
    else:  # rank 0 builds a built-in dataset first, the other ranks then find it cached
        net = create_model(str(model), num_classes=distributed.run_on_main(lambda: dataset_num_classes(data)),
                           input_size=input_size)  # fmt: skip
    distiller = Distiller(net, load_teacher(teacher), DistillConfig()) if teacher is not None else None
    with distiller if distiller is not None else nullcontext():
        result = fit(net, data, cfg, out_dir=out, resume=resume, skip_invalid=skip_invalid, distiller=distiller)
    path = out / "model.pt"
    if distributed.is_main():  # under torchrun every rank holds the same weights; rank 0 writes them
        if result.best_epoch >= 0:
            print(f"best validation mAP@[.5:.95] {result.best_map:.4f} (epoch {result.best_epoch + 1})")
        save_checkpoint(path, model_config=net.model_config, state_dict=net.state_dict())
    distributed.barrier()
    return path


def cmd_eval(args: argparse.Namespace) -> int:
    from slimdet.data import load_dataset
    from slimdet.evaluate import evaluate
    from slimdet.models import load_model

    _output_folder(args.json)
    model, _ = load_model(args.checkpoint)
    ds = load_dataset(args.data, args.split, input_size=model.input_size)
    if args.max_images is not None and args.max_images < len(ds):
        ds = ds.subset(args.max_images)
    result = evaluate(model, ds, batch_size=args.batch_size, conf_thres=args.conf_thres, iou_thres=args.iou_thres)
    print(f"{args.checkpoint} on {args.data} [{args.split}], {result.num_images} images")
    print(f"mAP@[.5:.95] {result.map:.4f}   mAP@.5 {result.map50:.4f}")
    for name, ap in result.per_class_ap.items():
        print(f"  {name:<20} AP {ap:.4f}")
    _maybe_json(args.json, result.to_dict())
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from slimdet.models import create_model, load_model
    from slimdet.profile import profile

    _output_folder(args.json)
    if Path(args.model).is_file():
        model, _ = load_model(args.model)
    elif args.model.endswith((".pt", ".pth")) or "/" in args.model:
        raise ConfigError(f"{args.model}: checkpoint file not found")
    else:
        model = create_model(args.model, num_classes=args.num_classes, input_size=args.input_size)
    result = profile(
        model, batch_sizes=args.batch_sizes, threads=args.threads, warmup=args.warmup, runs=args.runs, onnx=args.onnx
    )
    print(result.to_text(layers=args.layers))
    _maybe_json(args.json, result.to_dict())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from slimdet.export.onnx import export_onnx
    from slimdet.models import load_model

    if args.format != "onnx":
        raise ConfigError(f"--format: unsupported export format {args.format!r}; available: onnx")
    model, _ = load_model(args.checkpoint)
    result = export_onnx(model, args.out, batch_size=args.batch_size, dynamic_batch=args.dynamic_batch)
    diff = f", max |onnx - torch| {result.max_abs_diff:.2e}" if result.max_abs_diff is not None else ""
    print(f"wrote {result.path} ({result.size_bytes / 1e6:.2f} MB, opset {result.opset}{diff})")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from slimdet.pipeline import run_recipe

    result = run_recipe(args.recipe, out_dir=args.out, resume=args.resume, progress=not args.quiet)
    _print_run(result)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import yaml

    from slimdet.pipeline import load_recipe, run_recipe

    print(f"dataset: {build_builtin(DEMO_DATASET)}", file=sys.stderr)
    checkpoint = None if args.retrain else shipped_baseline()
    if checkpoint is None:
        checkpoint = train_baseline(Path(f"{args.out}_baseline"))
    recipe_path = default_recipe_path()
    raw = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
    raw["checkpoint"] = str(checkpoint)
    recipe = load_recipe(raw, base_dir=recipe_path.parent, source=str(recipe_path))
    result = run_recipe(recipe, out_dir=args.out, resume=True)
    _print_run(result)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from slimdet.hw import layer_table, load_spec
    from slimdet.hw.plots import breakdown_png
    from slimdet.hw.spec import SystolicSpec
    from slimdet.hw.systolic import simulate
    from slimdet.io import atomic_write
    from slimdet.models import create_model, load_model

    if (args.model is None) == (args.checkpoint is None):
        raise ConfigError("simulate: give a MODEL (registry name or checkpoint file) or --checkpoint, not both")
    try:
        spec = load_spec(args.target)
    except ConfigError as exc:
        raise ConfigError(f"--target: {exc}") from None
    if not isinstance(spec, SystolicSpec):
        raise ConfigError(f"--target: {args.target!r} is a {spec.kind} roofline device; simulate needs a systolic "
                          "accelerator preset or spec (e.g. edge-npu, tpu-v1, eyeriss, fpga-zcu102)")  # fmt: skip
    source = args.checkpoint if args.checkpoint is not None else args.model
    if Path(source).is_file():
        model, _ = load_model(source)
    elif args.checkpoint is not None or str(source).endswith((".pt", ".pth")) or "/" in str(source):
        raise ConfigError(f"{source}: checkpoint file not found")
    else:
        model = create_model(source, num_classes=args.num_classes, input_size=args.input_size)
    table = layer_table(model)
    result = simulate(table, spec)
    print(result.to_text())
    if args.out is not None:
        _maybe_json(args.out / "simulate.json", {"model": str(source), "target": spec.name, "totals": result.totals(),
                                                 "layers": result.rows()})  # fmt: skip
        png = breakdown_png(table, spec)
        path = atomic_write(args.out / "simulate.png", lambda f: f.write(png))
        print(f"plot: {path}")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from slimdet.schedule.command import run_schedule

    return run_schedule(args)


def cmd_models(args: argparse.Namespace) -> int:
    from slimdet.models import list_models

    print("\n".join(list_models()))
    return 0


def shipped_baseline(model: str = "yolo-s", data: str = DEMO_DATASET) -> Path | None:
    """The baseline checkpoint of ``model`` on the built-in ``data`` shipped as package data, when present."""
    from importlib.resources import files

    path = Path(str(files("slimdet").joinpath(f"assets/{model}_{data}.pt")))
    return path if path.is_file() else None


def default_recipe_path() -> Path:
    """recipes/default.yaml of the source checkout, else of the current folder."""
    import slimdet

    for root in (Path(slimdet.__file__).resolve().parents[2], Path.cwd()):
        if (root / "recipes" / "default.yaml").is_file():
            return root / "recipes" / "default.yaml"
    raise ConfigError("recipes/default.yaml not found (run the demo from a slimdet source checkout)")


def train_baseline(out: Path) -> Path:
    """Train the demo's baseline with the documented settings (resumable); returns its checkpoint.

    The settings are those of the documented command, ``slimdet.train.BASELINE_TRAIN_ARGS``.
    """
    from slimdet.train import BASELINE_TRAIN_ARGS

    resume = out.is_dir() and any(out.iterdir())
    argv = ["train", *BASELINE_TRAIN_ARGS, "--out", str(out), *(["--resume"] if resume else [])]
    print(f"training the baseline: slimdet {' '.join(argv)}", file=sys.stderr)
    cmd_train(build_parser().parse_args(argv))
    return out / "model.pt"


def _print_run(result: Any) -> None:
    from slimdet.report import summary_table

    print(summary_table(result.metrics))
    print(f"\nreport: {result.report_path}")


def _output_folder(path: Path | None) -> None:
    """Make the folder of an output file before the work, so that an unwritable place fails fast."""
    if path is not None:
        from slimdet.io import ensure_dir

        ensure_dir(path.parent)


def _maybe_json(path: Path | None, obj: dict[str, Any]) -> None:
    if path is not None:
        from slimdet.io import atomic_write_text

        atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
