"""Throughput plans: cut the graph into pipeline stages, one device each, for a stream of frames.

The graph's topological order is cut into contiguous segments; stage ``k`` runs one segment on its
own device, and hands the next stage every tensor still needed past its cut (the live tensors, as a
pipeline of workers joined by queues forwards them). A stage is busy for its compute plus its send,
so the stream runs at ``1 / max_k (compute_k + send_k)`` frames per second and one frame takes
``sum_k (compute_k + send_k)``.

:func:`pipeline_plan` is exact over all cuts and device orders, by dynamic programming over
(cut position, devices used, device of the next stage): first the smallest bottleneck, then the
smallest latency among the plans that reach it (a lexicographic single pass would not be exact:
a worse-bottleneck prefix can end with the better latency). ``O(n^2 2^D D^2)`` with NumPy over
the previous cut.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import numpy as np

from slimdet.errors import ConfigError
from slimdet.schedule.graph import OpGraph, Plan, Stage, plan_throughput_fps
from slimdet.schedule.partition import Method, partition, single_device, to_plan


def live_bytes(graph: OpGraph) -> np.ndarray:
    """``L[b]``: bytes of the outputs made before position ``b`` and read at or after it (b = 0..n)."""
    n = len(graph)
    diff = np.zeros(n + 2)
    for u, succ in enumerate(graph.succs):
        if succ:
            diff[u + 1] += graph.nodes[u].out_bytes
            diff[max(succ) + 1] -= graph.nodes[u].out_bytes
    return np.cumsum(diff)[: n + 1]


def pipeline_plan(graph: OpGraph, *, max_stages: int | None = None, cut_after: Collection[str] | None = None) -> Plan:
    """The highest-throughput pipeline (each device at most one stage), then the lowest latency.

    Args:
        max_stages: at most this many stages (default: one per device).
        cut_after: if given, stages may only end after these nodes (e.g. the cuts an executor can
            run, :func:`slimdet.schedule.split.executor_cuts`).

    Raises:
        ConfigError: no plan with at most ``max_stages`` stages can run every node.
    """
    n, ndev = len(graph), len(graph.devices)
    allowed = np.ones(n + 1, dtype=bool)
    if cut_after is not None:
        names = {node.name: i for i, node in enumerate(graph.nodes)}
        unknown = sorted(set(cut_after) - set(names))
        if unknown:
            raise ConfigError(f"schedule: cut_after names nodes the graph does not have: {unknown[:5]}")
        allowed[1:n] = False
        for name in cut_after:
            allowed[names[name] + 1] = True
    limit = ndev if max_stages is None else max(1, min(max_stages, ndev))
    finite = np.where(graph.supported, graph.cost_s, 0.0)
    csum = np.vstack([np.zeros(ndev), np.cumsum(finite, axis=0)])  # (n + 1) x D
    bad = np.vstack([np.zeros(ndev, int), np.cumsum(~graph.supported, axis=0)])
    lat, inv_bw = graph.link_matrices
    live = live_bytes(graph)
    end = ndev  # "next device" of the last stage: nothing to send

    def send(b: int, d: int, e: int) -> float:
        return 0.0 if e == end else float(lat[d, e] + live[b] * inv_bw[d, e])

    def solve(cap: float | None) -> tuple[float, dict]:
        """Bottleneck DP (``cap`` None) or latency DP with every stage's load <= ``cap``."""
        best: dict[tuple[int, int], np.ndarray] = {(0, e): _start(n) for e in range(ndev + 1)}
        arg: dict[tuple[int, int, int], tuple[int, int]] = {}
        for mask in sorted(range(1, 1 << ndev), key=lambda m: bin(m).count("1")):
            if bin(mask).count("1") > limit:
                continue
            for e in [*(x for x in range(ndev) if not mask >> x & 1), end]:
                row = np.full(n + 1, math.inf)
                for b in range(1, n + 1):
                    if (b == n) != (e == end) or not allowed[b]:
                        continue
                    for d in (x for x in range(ndev) if mask >> x & 1 and x != e):
                        prev = best.get((mask & ~(1 << d), d))
                        if prev is None:
                            continue
                        load = csum[b, d] - csum[:b, d] + send(b, d, e)
                        load[bad[:b, d] != bad[b, d]] = math.inf
                        if cap is None:
                            total = np.maximum(prev[:b], load)
                        else:
                            total = np.where(load <= cap, prev[:b] + load, math.inf)
                        a = int(total.argmin())
                        if total[a] < row[b]:
                            row[b] = total[a]
                            arg[mask, e, b] = (a, d)
                best[mask, e] = row
        finals = {m: best[m, end][n] for m in range(1, 1 << ndev) if (m, end) in best}
        mask = min(finals, key=lambda m: (finals[m], m), default=None)
        if mask is None or not math.isfinite(finals[mask]):
            return math.inf, {}
        return finals[mask], {"mask": mask, "arg": arg}

    bottleneck, _ = solve(None)
    if not math.isfinite(bottleneck):
        where = " with stages ending only at the allowed cuts" if cut_after is not None else ""
        raise ConfigError(f"schedule: no pipeline of <= {limit} stages on {list(graph.device_names)} "
                          f"runs every node (each device holds one stage){where}")  # fmt: skip
    _, found = solve(bottleneck * (1 + 1e-9) + 1e-15)
    cuts: list[tuple[int, int, int]] = []  # (start, stop, device), last stage first
    mask, e, b = found["mask"], end, n
    while b > 0:
        a, d = found["arg"][mask, e, b]
        cuts.append((a, b, d))
        mask, e, b = mask & ~(1 << d), d, a
    cuts.reverse()
    names = graph.device_names
    stages, transfers, load = [], [], {}
    for k, (a, b, d) in enumerate(cuts):
        compute = float(csum[b, d] - csum[a, d])
        stages.append(Stage(names[d], tuple(node.name for node in graph.nodes[a:b]), compute))
        sent = send(b, d, cuts[k + 1][2]) if k + 1 < len(cuts) else 0.0
        if k + 1 < len(cuts):
            transfers.append((names[d], names[cuts[k + 1][2]], sent))
        load[names[d]] = compute + sent
    return Plan(stages=tuple(stages), latency_s=sum(load.values()), throughput_fps=plan_throughput_fps(load),
                transfers=tuple(transfers))  # fmt: skip


def _start(n: int) -> np.ndarray:
    row = np.full(n + 1, math.inf)
    row[0] = 0.0
    return row


def schedule_plans(
    graph: OpGraph,
    *,
    method: Method | str = Method.AUTO,
    exact_max_nodes: int = 12,
    cut_after: Collection[str] | None = None,
) -> dict[str, Plan]:
    """The plans a report compares: each device alone (that can run everything), the minimum-latency
    placement of one frame (:func:`~slimdet.schedule.partition.partition`), the highest-throughput
    pipeline for each number of stages (``pipeline-2``, ...) that needs all of them, and with
    ``cut_after`` the same pipelines restricted to those cuts (``runnable-2``, ...: plans the
    executor can run)."""
    plans: dict[str, Plan] = {}
    for dev in graph.device_names:
        alone = single_device(graph, dev)
        if alone is not None:
            plans[f"all-{dev}"] = to_plan(graph, alone)
    plans["min-latency"] = to_plan(graph, partition(graph, method=method, exact_max_nodes=exact_max_nodes))
    for k in range(2, len(graph.devices) + 1):
        try:
            plan = pipeline_plan(graph, max_stages=k)
        except ConfigError:
            continue
        if len(plan.stages) == k:  # else fewer stages did as well, and that plan is listed already
            plans[f"pipeline-{k}"] = plan
        if cut_after is None:
            continue
        try:
            plan = pipeline_plan(graph, max_stages=k, cut_after=cut_after)
        except ConfigError:
            continue
        if len(plan.stages) == k:
            plans[f"runnable-{k}"] = plan
    return plans


def best_throughput(plans: dict[str, Plan]) -> str:
    """The name of the plan with the highest throughput (ties: the lower latency)."""
    return max(plans, key=lambda k: (plans[k].throughput_fps, -plans[k].latency_s))
