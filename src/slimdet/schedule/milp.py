"""The exact latency partition of a small DAG as a mixed-integer linear program (``scipy.optimize.milp``).

Variables (times divided by a horizon ``H`` so that HiGHS's tolerances act on numbers near 1):

* ``x[i, d]`` binary: node ``i`` runs on device ``d`` (only where ``d`` can run it);
* ``s[i]`` >= 0: start of node ``i``; ``C``: the makespan, minimized;
* ``q[i, j]`` >= 0 per edge: the transfer delay of the edge;
* ``y[i, j]`` binary per pair of nodes that neither precedes the other and that may share a device:
  1 when ``i`` goes first if they do share one.

Constraints::

    sum_d x[i, d] = 1
    C >= s[i] + sum_d cost[i, d] x[i, d]
    s[j] >= s[i] + sum_d cost[i, d] x[i, d] + q[i, j]                       (edge i -> j)
    q[i, j] >= T_i(d, e) (x[i, d] + x[j, e] - 1)                            (d != e)
    s[j] >= s[i] + cost[i, d] - M (1 - y[i, j]) - M (2 - x[i, d] - x[j, d])  (same device d, i first)
    s[i] >= s[j] + cost[j, d] - M y[i, j] - M (2 - x[i, d] - x[j, d])        (same device d, j first)

The disjunctive (big-M) form of a scheduling problem is Manne's (Operations Research 8, 1960). With
``C <= 1`` (the HEFT makespan bounds the optimum), ``s[i] + cost[i, d] <= 1`` and ``s[j] >= 0``, so
``M = 1`` already relaxes a disjunction that does not apply: the smallest M keeps the LP relaxation
tight and HiGHS's tolerances well away from the numbers. The solution's placement and order are then
re-timed by :func:`slimdet.schedule.partition.simulate`.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from slimdet.errors import ConfigError
from slimdet.schedule.graph import OpGraph

if TYPE_CHECKING:
    from slimdet.schedule.partition import Schedule


def milp_schedule(graph: OpGraph, *, time_limit_s: float = 60.0, mip_rel_gap: float = 1e-9) -> Schedule:
    """Minimum-latency schedule of ``graph`` by the program above; ``optimal`` is False when HiGHS
    stopped at its time limit with a feasible but unproven solution."""
    from slimdet.schedule.partition import _priority_order, heft, simulate

    n, ndev = len(graph), len(graph.devices)
    sup = graph.supported
    trans = [graph.transfer_matrix(i) for i in range(n)]
    max_cost = np.where(sup, graph.cost_s, 0.0).max(axis=1)
    max_edge = [float(trans[i][np.ix_(sup[i], sup[j])].max()) for i, j in graph.edges]
    # any feasible makespan bounds the optimum: the HEFT schedule's, or running everything serially
    horizon = min(heft(graph).latency_s, float(max_cost.sum() + sum(max_edge))) * (1 + 1e-6) or 1.0
    cost = np.where(sup, graph.cost_s, 0.0) / horizon
    big_m = 1.0  # s[i] + cost[i, d] <= C <= 1 and s[j] >= 0: a relaxed disjunction never binds

    names: list[str] = []

    def var(name: str) -> int:
        names.append(name)
        return len(names) - 1

    x = {(i, d): var(f"x{i},{d}") for i in range(n) for d in range(ndev) if sup[i, d]}
    s = [var(f"s{i}") for i in range(n)]
    c_max = var("C")
    q = {e: var(f"q{e}") for e in graph.edges}
    reach = _reachability(graph)
    pairs = [(i, j) for i, j in itertools.combinations(range(n), 2)
             if not (reach[i] >> j) & 1 and not (reach[j] >> i) & 1 and (sup[i] & sup[j]).any()]  # fmt: skip
    y = {p: var(f"y{p}") for p in pairs}

    rows: list[tuple[dict[int, float], float, float]] = []  # (coefficients, lower, upper)
    inf = np.inf
    for i in range(n):
        rows.append(({x[i, d]: 1.0 for d in range(ndev) if sup[i, d]}, 1.0, 1.0))
        rows.append(({c_max: 1.0, s[i]: -1.0, **{x[i, d]: -cost[i, d] for d in range(ndev) if sup[i, d]}}, 0.0, inf))
    for i, j in graph.edges:
        rows.append(({s[j]: 1.0, s[i]: -1.0, q[i, j]: -1.0,
                      **{x[i, d]: -cost[i, d] for d in range(ndev) if sup[i, d]}}, 0.0, inf))  # fmt: skip
        for d, e in itertools.product(np.flatnonzero(sup[i]), np.flatnonzero(sup[j])):
            t = float(trans[i][d, e]) / horizon
            if d != e and t > 0:
                rows.append(({q[i, j]: 1.0, x[i, d]: -t, x[j, e]: -t}, -t, inf))
    for (i, j), v in y.items():
        for d in np.flatnonzero(sup[i] & sup[j]):
            rows.append(({s[j]: 1.0, s[i]: -1.0, v: -big_m, x[i, d]: -big_m, x[j, d]: -big_m},
                         cost[i, d] - 3 * big_m, inf))  # fmt: skip
            rows.append(({s[i]: 1.0, s[j]: -1.0, v: big_m, x[i, d]: -big_m, x[j, d]: -big_m},
                         cost[j, d] - 2 * big_m, inf))  # fmt: skip

    nvar = len(names)
    r_idx, c_idx, vals = [], [], []
    for r, (coef, _, _) in enumerate(rows):
        for col, val in coef.items():
            r_idx.append(r)
            c_idx.append(col)
            vals.append(val)
    a = coo_array((vals, (r_idx, c_idx)), shape=(len(rows), nvar)).tocsr()
    lower = np.asarray([lo for _, lo, _ in rows])
    upper = np.asarray([hi for _, _, hi in rows])
    objective = np.zeros(nvar)
    objective[c_max] = 1.0
    integrality = np.zeros(nvar)
    upper_bound = np.full(nvar, 1.0)
    for col in list(x.values()) + list(y.values()):
        integrality[col] = 1
    for col in s + [c_max]:
        upper_bound[col] = 1.0
    for (i, j), col in q.items():
        upper_bound[col] = float(trans[i][np.ix_(sup[i], sup[j])].max()) / horizon
    res = milp(objective, constraints=LinearConstraint(a, lower, upper), integrality=integrality,
               bounds=Bounds(np.zeros(nvar), upper_bound),
               options={"time_limit": time_limit_s, "mip_rel_gap": mip_rel_gap})  # fmt: skip
    if res.x is None:
        raise ConfigError(f"schedule: the MILP found no solution ({res.message})")
    sol = res.x
    device = [max((d for d in range(ndev) if sup[i, d]), key=lambda d: sol[x[i, d]]) for i in range(n)]
    order = _priority_order(graph, np.asarray([sol[v] for v in s]))
    return simulate(graph, device, order, method="milp", optimal=res.status == 0)


def _reachability(graph: OpGraph) -> list[int]:
    """Per node, a bit set of the nodes reachable from it (itself included)."""
    reach = [1 << i for i in range(len(graph))]
    for i in range(len(graph) - 1, -1, -1):
        for j in graph.succs[i]:
            reach[i] |= reach[j]
    return reach
