"""The pipelined executor: frame order, outputs equal to the model in one piece, stage failures that
surface as PipelineError (raised, died, hung) without hanging the caller, and clean shutdown.

Process workers are spawned and import the stage functions: those live in a light module of their own
(tests/schedule/_executor_stages.py), so a worker starts without importing this file's dependencies.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch

from slimdet.errors import ConfigError
from slimdet.schedule.executor import Pipeline, PipelineError, StageWorker, run_pipeline, run_sequential
from slimdet.schedule.graph import Plan, Stage
from tests.schedule._executor_stages import (
    BadSetup,
    ExitOn,
    FailOn,
    SleepOn,
    add_one,
    make_tensor,
    times_ten,
    unpicklable,
)

WORKERS = ["process", "thread"]


# -- order, reuse, clean shutdown -------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", WORKERS)
def test_results_come_back_in_frame_order_and_equal_the_sequential_run(workers):
    stages = [StageWorker("add", add_one), StageWorker("mul", times_ten), StageWorker("add2", add_one)]
    frames = list(range(40))
    expected = [10 * (x + 1) + 1 for x in frames]
    assert list(run_sequential(stages, frames)) == expected
    with Pipeline(stages, workers=workers, queue_size=2, timeout_s=30) as pipe:
        assert list(pipe.run(frames)) == expected
        assert list(pipe.run(iter(frames[:5]))) == expected[:5]  # reusable, and takes any iterable
        assert list(pipe.run([])) == []
        stats = pipe.stats()
        workers_seen = list(pipe.workers)
    assert [s.frames for s in stats] == [45, 45, 45]
    assert all(s.busy_s > 0 for s in stats)
    # a clean stop: every worker left on the stop message (exit code 0), none had to be terminated
    assert all(not w.is_alive() for w in workers_seen)
    if workers == "process":
        assert [w.exitcode for w in workers_seen] == [0, 0, 0]


@pytest.mark.timeout(120)
def test_tensors_cross_processes_intact():
    frames = list(range(6))
    got = list(run_pipeline([StageWorker("make", make_tensor)], frames, timeout_s=30))
    for x, out in zip(frames, got, strict=True):
        assert isinstance(out["v"], torch.Tensor) and torch.equal(out["v"], torch.full((3,), float(x)))
        assert out["i"].dtype == torch.int64 and torch.equal(out["i"], torch.arange(x % 4))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", WORKERS)
def test_stopping_early_stops_the_workers(workers):
    pipe = Pipeline([StageWorker("add", add_one), StageWorker("mul", times_ten)], workers=workers, timeout_s=30)
    with pipe:
        procs = list(pipe.workers)
        gen = pipe.run(range(1000))
        assert [next(gen) for _ in range(3)] == [10, 20, 30]
        gen.close()  # the caller walks away with frames in flight
        with pytest.raises(ConfigError, match="closed"):
            list(pipe.run(range(3)))
    assert all(not w.is_alive() for w in procs)


# -- failures ---------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", WORKERS)
def test_stage_exception_names_stage_and_frame_and_stops_everything(workers):
    stages = [StageWorker("add", add_one), StageWorker("picky", FailOn(8)), StageWorker("mul", times_ten)]
    got = []
    t0 = time.monotonic()
    with Pipeline(stages, workers=workers, timeout_s=30) as pipe:
        procs = list(pipe.workers)
        with pytest.raises(PipelineError) as info:
            for r in pipe.run(range(50)):
                got.append(r)
    err = info.value
    assert (err.stage, err.stage_index, err.frame) == ("picky", 1, 7)  # frame 7 holds the value 8 after add_one
    assert "ValueError: bad frame value 8" in str(err) and "frame 7" in str(err)
    assert "FailOn" in err.remote_traceback or "bad frame value" in err.remote_traceback
    assert got == [10 * (x + 1) for x in range(7)]  # every frame before the failure, in order
    assert time.monotonic() - t0 < 30  # reported at once, not after a timeout
    assert all(not w.is_alive() for w in procs)
    # the sequential reference reports the same stage and frame
    with pytest.raises(PipelineError) as seq:
        list(run_sequential(stages, range(50)))
    assert (seq.value.stage, seq.value.frame) == ("picky", 7)


@pytest.mark.timeout(120)
def test_a_worker_that_dies_is_reported_with_its_exit_code_and_frame():
    stages = [StageWorker("add", add_one), StageWorker("crash", ExitOn(5))]
    t0 = time.monotonic()
    with pytest.raises(PipelineError) as info:
        list(run_pipeline(stages, range(50), timeout_s=60))
    assert (info.value.stage, info.value.frame) == ("crash", 4)
    assert "exit code 3" in str(info.value)
    assert time.monotonic() - t0 < 30  # the liveness check, not the 60 s timeout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", WORKERS)
def test_a_stage_that_hangs_times_out_naming_the_frame(workers):
    stages = [StageWorker("add", add_one), StageWorker("slow", SleepOn(3, seconds=20))]
    t0 = time.monotonic()
    with pytest.raises(PipelineError) as info:
        list(run_pipeline(stages, range(10), workers=workers, timeout_s=1.5))
    assert (info.value.stage, info.value.frame) == ("slow", 2)
    assert "timed out" in str(info.value)
    assert time.monotonic() - t0 < 15


@pytest.mark.timeout(120)
def test_setup_input_and_transfer_failures_are_pipeline_errors():
    with pytest.raises(PipelineError, match="'dev'.*setup: RuntimeError: no such device") as info:
        with Pipeline([StageWorker("add", add_one), StageWorker("dev", BadSetup())], timeout_s=30):
            pass
    assert info.value.frame is None
    # a result that cannot cross to the next process is that stage's error, not a frame silently lost
    with pytest.raises(PipelineError, match="'closure'.*frame 0.*cannot be sent to the next stage"):
        list(run_pipeline([StageWorker("closure", unpicklable), StageWorker("add", add_one)], range(3), timeout_s=30))

    def frames():
        yield 1
        yield 2
        raise OSError("camera unplugged")

    with pytest.raises(PipelineError, match="'input'.*frame 2.*camera unplugged") as info:
        list(run_pipeline([StageWorker("add", add_one)], frames(), workers="thread", timeout_s=30))
    assert info.value.stage == "input"


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="at least one stage"):
        Pipeline([])
    with pytest.raises(ConfigError, match="unique"):
        Pipeline([StageWorker("a", add_one), StageWorker("a", add_one)])
    with pytest.raises(ConfigError, match="workers must be one of"):
        Pipeline([StageWorker("a", add_one)], workers="fibers")


# -- a detector split into stages -------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized_tiny(fitted_tiny, tiny_test_ds):
    from slimdet.compress.quant import QuantConfig, quantize
    from slimdet.data.dataset import collate

    images, targets = collate([tiny_test_ds[i] for i in range(len(tiny_test_ds))])
    model = copy.deepcopy(fitted_tiny)
    quantize(model, QuantConfig(auto_keep=False, adaround=False, runtime_aware=False), calib=[(images, targets)],
             progress=False)  # fmt: skip
    return model.eval()


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


@pytest.mark.timeout(180)
def test_int8_split_pipeline_equals_the_model_in_one_piece(quantized_tiny, tiny_test_ds, tmp_path):
    from slimdet.export.qdq import export_qdq
    from slimdet.models.onnx import OrtDetector
    from slimdet.schedule.parts import SplitGraphs, export_split
    from slimdet.schedule.split import split_detector

    frames = [tiny_test_ds[i][0] for i in range(len(tiny_test_ds))] * 2
    graphs = export_split(quantized_tiny)
    assert len(graphs.cut_names) == 3 and graphs.quantized
    assert SplitGraphs.load(graphs.save(tmp_path / "split")) == graphs
    # the reference: the file export_qdq writes, run by ONNX Runtime in one piece, decoded by the model
    whole = OrtDetector(export_qdq(quantized_tiny, tmp_path / "int8.onnx").path, like=quantized_tiny)
    reference = [whole.predict(x[None])[0] for x in frames]
    assert sum(len(d["boxes"]) for d in reference) > 0
    stages = split_detector(quantized_tiny, cut="neck", graphs=graphs)
    assert [s.name for s in stages] == ["backbone+neck", "heads+decode+nms"]
    # int8 codes cross the cut, not floats
    first = stages[0].fn(frames[0])
    assert [a.dtype for a in first] == [np.uint8] * 3
    assert _same(list(run_sequential(stages, frames)), reference)
    # uint8 RGB frames, as decoded from the files, give the same detections as the dataset's float images
    from slimdet.data.transforms import letterbox

    ds = tiny_test_ds
    frames_u8 = [letterbox(ds.load_image(i), ds.records[i].boxes, ds.input_size)[0] for i in range(len(ds))] * 2
    assert frames_u8[0].dtype == np.uint8 and frames_u8[0].shape == (64, 64, 3)
    with Pipeline(stages, timeout_s=60) as pipe:
        assert _same(list(pipe.run(frames)), reference)
        assert _same(list(pipe.run(frames_u8)), reference)
    three = split_detector(quantized_tiny, cut="neck+heads", graphs=graphs)
    assert [s.name for s in three] == ["backbone+neck", "heads", "decode+nms"]
    assert _same(list(run_pipeline(three, frames, workers="thread", timeout_s=60)), reference)
    assert _same(list(run_sequential(split_detector(quantized_tiny, cut="none", graphs=graphs), frames)), reference)


@pytest.mark.timeout(120)
def test_float_torch_split_equals_predict(fitted_tiny, tiny_test_ds):
    from slimdet.schedule.split import split_detector

    model = copy.deepcopy(fitted_tiny).eval()
    frames = [tiny_test_ds[i][0] for i in range(len(tiny_test_ds))]
    with torch.no_grad():
        reference = [model.predict(x[None])[0] for x in frames]
    stages = split_detector(model, cut="heads", backbone_runtime="torch")
    assert [s.name for s in stages] == ["backbone+neck+heads", "decode+nms"]
    assert _same(list(run_pipeline(stages, frames, workers="thread", timeout_s=60)), reference)


def test_split_refuses_what_it_cannot_run(fitted_tiny, quantized_tiny):
    from slimdet.schedule.split import split_detector

    with pytest.raises(ConfigError, match="needs a quantized model"):
        split_detector(fitted_tiny, backbone_runtime="onnxruntime-int8")
    with pytest.raises(ConfigError, match="onnxruntime-int8"):
        split_detector(quantized_tiny, backbone_runtime="torch")
    with pytest.raises(ConfigError, match="unknown cut"):
        split_detector(fitted_tiny, cut="stem", backbone_runtime="torch")


def _plan(*groups: tuple[str, ...]) -> Plan:
    stages = tuple(Stage(device=f"dev{i}", nodes=g, time_s=1e-3) for i, g in enumerate(groups))
    return Plan(stages=stages, latency_s=1e-3 * len(groups), throughput_fps=1e3, transfers=())


def test_stages_from_plan_follows_the_plans_cut(fitted_tiny):
    from slimdet.schedule.split import stages_from_plan

    model = copy.deepcopy(fitted_tiny).eval()
    features = ("input", "backbone.stem.0", "neck.td4.cv1.0")
    plan = _plan(features, ("heads.0.box.0.0", "heads.2.cls_pred", "decode", "nms"))
    stages = stages_from_plan(model, plan, backbone_runtime="torch")
    assert [s.name for s in stages] == ["backbone+neck", "heads+decode+nms"]
    x = torch.rand(3, model.input_size, model.input_size)
    with torch.no_grad():
        assert _same(list(run_sequential(stages, [x])), [model.predict(x[None])[0]])
    with pytest.raises(ConfigError, match="contiguous groups of whole pieces"):
        stages_from_plan(model, _plan(("backbone.stem.0", "heads.0.box.0.0"), ("neck.td4.cv1.0", "nms")),
                         backbone_runtime="torch")  # fmt: skip
    with pytest.raises(ConfigError, match="no piece the executor knows"):
        stages_from_plan(model, _plan(("backbone.stem.0", "mystery.op")), backbone_runtime="torch")


def test_planner_restricted_to_the_executors_cuts_gives_a_plan_it_runs(fitted_tiny):
    from slimdet.schedule import model_graph, pipeline_plan, resolve_devices
    from slimdet.schedule.split import executor_cuts, stages_from_plan

    model = copy.deepcopy(fitted_tiny).eval()
    graph = model_graph(model, resolve_devices("npu,cpu"), bits=8)
    names = [node.name for node in graph.nodes]
    cuts = executor_cuts(names)
    assert len(cuts) == 2  # after the last neck node, after the last head node
    for cut in cuts:  # every node of a later piece comes after the cut
        later = names[names.index(cut) + 1 :]
        assert not any(n.startswith(("backbone", "neck")) for n in later) or cut.startswith("heads")
    plan = pipeline_plan(graph, cut_after=cuts)
    assert all(stage.nodes[-1] in cuts for stage in plan.stages[:-1])
    stages = stages_from_plan(model, plan, backbone_runtime="torch")
    assert len(stages) == len(plan.stages)
    x = torch.rand(3, model.input_size, model.input_size)
    with torch.no_grad():
        assert _same(list(run_sequential(stages, [x])), [model.predict(x[None])[0]])
    with pytest.raises(ConfigError, match="does not have"):
        pipeline_plan(graph, cut_after={"no.such.node"})
