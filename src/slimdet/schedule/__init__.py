"""Scheduling a detector across devices: the operator graph with per-device costs (:mod:`.graph`,
:mod:`.trace`), latency partitioning (:mod:`.partition`, :mod:`.milp`), throughput pipelines
(:mod:`.pipeline`), Gantt charts (:mod:`.gantt`), and the real pipelined executor (:mod:`.executor`,
:mod:`.split`) that runs a detector's stages as worker processes joined by bounded queues."""

from slimdet.schedule.executor import Pipeline, PipelineError, StageWorker, run_pipeline, run_sequential
from slimdet.schedule.gantt import gantt_bars, plan_table, plot_gantt
from slimdet.schedule.graph import Device, Link, Node, OpGraph, Plan, Stage, random_graph
from slimdet.schedule.partition import (
    Method,
    Schedule,
    brute_force,
    chain_dp,
    heft,
    partition,
    simulate,
    single_device,
    to_plan,
)
from slimdet.schedule.pipeline import best_throughput, pipeline_plan, schedule_plans
from slimdet.schedule.split import executor_cuts, split_detector, stages_from_plan
from slimdet.schedule.trace import Target, model_graph, resolve_devices

__all__ = ["Device", "Link", "Method", "Node", "OpGraph", "Pipeline", "PipelineError", "Plan", "Schedule", "Stage",
           "StageWorker", "Target", "best_throughput", "brute_force", "chain_dp", "executor_cuts", "gantt_bars", "heft",
           "model_graph", "partition", "pipeline_plan", "plan_table", "plot_gantt", "random_graph",
           "resolve_devices", "run_pipeline", "run_sequential", "schedule_plans", "simulate", "single_device",
           "split_detector", "stages_from_plan", "to_plan"]  # fmt: skip
