"""Latency partitioning: place every node of an :class:`OpGraph` on a device to finish one frame soonest.

The model of execution: each device runs one node at a time; devices run in parallel; a node
starts when its device is free and its inputs have arrived (an input from another device arrives
``link latency + bytes / bandwidth`` after its producer finished; transfers do not occupy devices).
One frame's latency is the makespan.

* chains: exact dynamic programming over (node, device), ``O(n D^2)``;
* small DAGs: exact mixed-integer program (``scipy.optimize.milp``, HiGHS): assignment variables,
  start times, a communication delay per edge, and a big-M disjunction for every pair of nodes that
  may share a device (the disjunctive formulation of Manne, Operations Research 1960);
* large DAGs: HEFT list scheduling (Topcuoglu, Hariri and Wu, IEEE TPDS 2002): nodes by decreasing
  upward rank, each onto the device giving the earliest finish, inserted into idle gaps;
* :func:`brute_force` enumerates every assignment and order, to check the exact methods.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from slimdet.errors import ConfigError
from slimdet.schedule.graph import OpGraph, Plan, Stage, plan_throughput_fps


class Method(StrEnum):
    AUTO = "auto"  # dp for a chain, milp up to exact_max_nodes, else heft
    DP = "dp"
    MILP = "milp"
    HEFT = "heft"
    BRUTE = "brute"


@dataclass(frozen=True)
class Schedule:
    """A placement and timing of one frame: per node its device index, start and finish."""

    device: tuple[int, ...]
    start_s: tuple[float, ...]
    finish_s: tuple[float, ...]
    latency_s: float
    method: str
    optimal: bool = False


def simulate(graph: OpGraph, device: Sequence[int], order: Sequence[int] | None = None, *, method: str = "given",
             optimal: bool = False) -> Schedule:  # fmt: skip
    """Times of the placement ``device`` when every device runs its nodes in ``order`` (a topological
    order; default: the graph's), each as early as its inputs and its device allow."""
    n = len(graph)
    order = range(n) if order is None else order
    start, finish = [0.0] * n, [0.0] * n
    free = [0.0] * len(graph.devices)
    done = [False] * n
    for i in order:
        d = device[i]
        if not graph.supported[i, d]:
            raise ConfigError(f"schedule: device {graph.device_names[d]!r} cannot run {graph.nodes[i].name!r}")
        ready = 0.0
        for p in graph.preds[i]:
            if not done[p]:
                raise ValueError(f"order is not topological: {graph.nodes[i].name!r} before its input")
            ready = max(ready, finish[p] + graph.transfer_s(graph.nodes[p].out_bytes, device[p], d))
        start[i] = max(ready, free[d])
        finish[i] = free[d] = start[i] + float(graph.cost_s[i, d])
        done[i] = True
    return Schedule(tuple(int(d) for d in device), tuple(start), tuple(finish), max(finish, default=0.0),
                    method, optimal)  # fmt: skip


def chain_dp(graph: OpGraph) -> Schedule:
    """Exact for a chain: ``best[i, e] = cost[i, e] + min_d (best[i-1, d] + transfer_{i-1}(d, e))``."""
    if not graph.is_chain:
        raise ConfigError("schedule: chain_dp needs a chain (every node reads only the one before it)")
    n = len(graph)
    best = np.empty((n, len(graph.devices)))
    arg = np.zeros((n, len(graph.devices)), dtype=np.int64)
    best[0] = graph.cost_s[0]
    for i in range(1, n):
        total = best[i - 1][:, None] + graph.transfer_matrix(i - 1)  # from d (rows) to e (columns)
        arg[i] = total.argmin(axis=0)
        best[i] = total.min(axis=0) + graph.cost_s[i]
    device = [0] * n
    device[-1] = int(best[-1].argmin())
    for i in range(n - 1, 0, -1):
        device[i - 1] = int(arg[i, device[i]])
    return simulate(graph, device, method="dp", optimal=True)


def brute_force(graph: OpGraph, *, max_nodes: int = 10) -> Schedule:
    """Exact by enumerating every (topological order, device of each node), with a bound that only
    cuts branches already no better than the best found. Exponential: for checking small graphs."""
    n, ndev = len(graph), len(graph.devices)
    if n > max_nodes:
        raise ConfigError(f"schedule: brute force is for graphs of <= {max_nodes} nodes, got {n}")
    cost, preds, succs = graph.cost_s.tolist(), graph.preds, graph.succs
    trans = [graph.transfer_matrix(i).tolist() for i in range(n)]
    runs = [[d for d in range(ndev) if math.isfinite(cost[i][d])] for i in range(n)]
    device, finish, free = [0] * n, [0.0] * n, [0.0] * ndev
    waiting = [len(p) for p in preds]
    ready = {i for i in range(n) if not preds[i]}
    best: list = [math.inf, None, None]
    order: list[int] = []

    def visit(cur: float) -> None:
        if cur >= best[0]:
            return
        if len(order) == n:
            best[:] = [cur, list(device), list(order)]
            return
        for i in sorted(ready):
            ready.discard(i)
            opened = [j for j in succs[i] if waiting[j] == 1]
            for j in succs[i]:
                waiting[j] -= 1
            ready.update(opened)
            order.append(i)
            for d in runs[i]:
                arrive = max((finish[p] + trans[p][device[p]][d] for p in preds[i]), default=0.0)
                saved = free[d]
                device[i], finish[i] = d, max(arrive, saved) + cost[i][d]
                free[d] = finish[i]
                visit(max(cur, finish[i]))
                free[d] = saved
            order.pop()
            ready.difference_update(opened)
            for j in succs[i]:
                waiting[j] += 1
            ready.add(i)

    visit(0.0)
    return simulate(graph, best[1], best[2], method="brute", optimal=True)


def heft(graph: OpGraph, *, improve_rounds: int = 50) -> Schedule:
    """HEFT: upward ranks from mean costs and mean transfer times, then earliest-finish placement
    with insertion into idle gaps (Topcuoglu et al., 2002). Then up to ``improve_rounds`` rounds of
    local search move single nodes to other devices (re-listed in the same rank order) while that
    shortens the frame (0: plain HEFT)."""
    n, ndev = len(graph), len(graph.devices)
    sup = graph.supported
    mean_cost = np.asarray([graph.cost_s[i, sup[i]].mean() for i in range(n)])
    rank = np.zeros(n)
    for i in range(n - 1, -1, -1):
        tail = 0.0
        for j in graph.succs[i]:
            t = graph.transfer_matrix(i)[np.ix_(sup[i], sup[j])]
            off = ~np.eye(ndev, dtype=bool)[np.ix_(sup[i], sup[j])]
            tail = max(tail, (float(t[off].mean()) if off.any() else 0.0) + rank[j])
        rank[i] = mean_cost[i] + tail
    order = _priority_order(graph, -rank)
    best = _list_schedule(graph, order)
    for _ in range(improve_rounds):
        moved = False
        for i in order:
            for d in np.flatnonzero(sup[i]):
                if d == best.device[i]:
                    continue
                trial = _list_schedule(graph, order, [*best.device[:i], int(d), *best.device[i + 1 :]])
                if trial.latency_s < best.latency_s * (1 - 1e-12):
                    best, moved = trial, True
        if not moved:
            break
    return Schedule(best.device, best.start_s, best.finish_s, best.latency_s, "heft")


def _list_schedule(graph: OpGraph, order: Sequence[int], device: Sequence[int] | None = None) -> Schedule:
    """List scheduling in ``order`` with insertion into idle gaps: each node on its given device, or
    (``device`` None) on the device where it finishes first; then re-timed left-shifted."""
    n = len(graph)
    slots: list[list[tuple[float, float]]] = [[] for _ in graph.devices]  # busy intervals, sorted
    placed, start, finish = [0] * n, [0.0] * n, [0.0] * n
    for i in order:
        best = (math.inf, math.inf, 0, 0.0)
        for d in np.flatnonzero(graph.supported[i]) if device is None else (device[i],):
            ready = max((finish[p] + graph.transfer_s(graph.nodes[p].out_bytes, placed[p], d)
                         for p in graph.preds[i]), default=0.0)  # fmt: skip
            c = float(graph.cost_s[i, d])
            est = _earliest_gap(slots[d], ready, c)
            best = min(best, (est + c, c, int(d), est))
        _, c, d, est = best
        placed[i], start[i], finish[i] = d, est, est + c
        slots[d].append((est, est + c))
        slots[d].sort()
    # each device's order as listed, left-shifted: never later than the listed times
    return simulate(graph, placed, _priority_order(graph, np.asarray(start)), method="heft")


def _earliest_gap(busy: list[tuple[float, float]], ready: float, length: float) -> float:
    t = ready
    for s, f in busy:
        if t + length <= s + 1e-15:
            return t
        t = max(t, f)
    return t


def _priority_order(graph: OpGraph, key: np.ndarray) -> list[int]:
    """A topological order taking, among ready nodes, the smallest ``key`` first (then the index)."""
    waiting = [len(p) for p in graph.preds]
    heap = [(float(key[i]), i) for i in range(len(graph)) if not waiting[i]]
    heapq.heapify(heap)
    order = []
    while heap:
        _, i = heapq.heappop(heap)
        order.append(i)
        for j in graph.succs[i]:
            waiting[j] -= 1
            if not waiting[j]:
                heapq.heappush(heap, (float(key[j]), j))
    return order


def partition(graph: OpGraph, *, method: Method | str = Method.AUTO, exact_max_nodes: int = 12,
              time_limit_s: float = 60.0) -> Schedule:  # fmt: skip
    """The minimum-latency placement of one frame (see the module docstring for the methods).

    Args:
        graph: the operator graph with its costs.
        method: "auto" (dp for a chain, milp up to ``exact_max_nodes`` nodes, else heft), or one method.
        exact_max_nodes: the largest DAG "auto" gives to the MILP.
        time_limit_s: the MILP's limit; past it the best solution found is returned, marked not optimal.
    """
    try:
        method = Method(method)
    except ValueError:
        raise ConfigError(f"schedule: method must be one of {[m.value for m in Method]}, got {method!r}") from None
    if method == Method.AUTO:
        method = Method.DP if graph.is_chain else Method.MILP if len(graph) <= exact_max_nodes else Method.HEFT
    if method == Method.DP:
        return chain_dp(graph)
    if method == Method.MILP:
        from slimdet.schedule.milp import milp_schedule

        return milp_schedule(graph, time_limit_s=time_limit_s)
    if method == Method.BRUTE:
        return brute_force(graph)
    return heft(graph)


def single_device(graph: OpGraph, device: str) -> Schedule | None:
    """Everything on one device (None when it cannot run every node)."""
    d = graph.device_names.index(device)
    if not graph.supported[:, d].all():
        return None
    return simulate(graph, [d] * len(graph), method=f"all-{device}", optimal=True)


def to_plan(graph: OpGraph, schedule: Schedule) -> Plan:
    """The schedule as stages: runs of nodes back to back on one device, cut where a node waits for an
    input from another device. Throughput: one frame per busiest device's load, its sends included."""
    n = len(graph)
    order = _priority_order(graph, np.asarray(schedule.start_s))
    stages: list[list[int]] = []
    last_on: dict[int, int] = {}  # device -> index of its open stage
    for i in order:
        d = schedule.device[i]
        k = last_on.get(d)
        cross = any(schedule.device[p] != d for p in graph.preds[i])
        if k is None or cross or not math.isclose(schedule.finish_s[stages[k][-1]], schedule.start_s[i],
                                                  rel_tol=1e-9, abs_tol=1e-15):  # fmt: skip
            stages.append([i])
            last_on[d] = len(stages) - 1
        else:
            stages[k].append(i)
    names = graph.device_names
    load = {names[d]: 0.0 for d in set(schedule.device)}
    transfers = []
    for i in range(n):
        d = schedule.device[i]
        load[names[d]] += float(graph.cost_s[i, d])
        for e in sorted({schedule.device[j] for j in graph.succs[i]} - {d}):
            t = graph.transfer_s(graph.nodes[i].out_bytes, d, e)
            load[names[d]] += t
            transfers.append((names[d], names[e], t))
    stages.sort(key=lambda s: (schedule.start_s[s[0]], s[0]))
    out = tuple(Stage(names[schedule.device[s[0]]], tuple(graph.nodes[i].name for i in s),
                      float(sum(graph.cost_s[i, schedule.device[i]] for i in s))) for s in stages)  # fmt: skip
    return Plan(
        stages=out,
        latency_s=schedule.latency_s,
        throughput_fps=plan_throughput_fps(load),
        transfers=tuple(transfers),
        stage_start_s=tuple(schedule.start_s[s[0]] for s in stages),
    )
