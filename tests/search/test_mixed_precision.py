"""Mixed-precision bit allocation: the MILP against brute force, budgets, pins, errors; Hessian traces; the plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slimdet.errors import ConfigError
from slimdet.search.mixed_precision import BitAllocation, allocate_bits, brute_force_bits, hutchinson_trace, plot_bits

BITS = (2, 4, 8)


def random_case(seed: int, layers: int = 5, resources: int = 2) -> tuple[dict, dict, dict]:
    """Sensitivities falling with bits, costs growing with bits, budgets between the cheapest and dearest."""
    rng = np.random.default_rng(seed)
    names = [f"backbone.stage{k}.conv" for k in range(layers)]
    sens = {n: {b: float(rng.uniform(0.5, 2.0) * 4.0 ** (-b / 2) * rng.uniform(0.8, 1.2)) for b in BITS} for n in names}
    costs, budgets = {}, {}
    for r in ["weight_bytes", "bitops"][:resources]:
        size = rng.uniform(1e3, 1e5, size=layers)
        costs[r] = {n: {b: float(size[k] * b / 8 * rng.uniform(0.9, 1.1)) for b in BITS} for k, n in enumerate(names)}
        lo = sum(min(t.values()) for t in costs[r].values())
        hi = sum(max(t.values()) for t in costs[r].values())
        budgets[r] = float(lo + rng.uniform(0.2, 0.7) * (hi - lo))
    return sens, costs, budgets


@pytest.mark.parametrize("seed", range(8))
def test_milp_matches_brute_force(seed: int) -> None:
    sens, costs, budgets = random_case(seed, resources=1 + seed % 2)
    fast, slow = allocate_bits(sens, costs, budgets), brute_force_bits(sens, costs, budgets)
    assert fast.objective == pytest.approx(slow.objective, rel=1e-9)
    for alloc in (fast, slow):
        assert set(alloc.bits) == set(sens) and all(b in BITS for b in alloc.bits.values())
        assert alloc.objective == pytest.approx(sum(sens[n][b] for n, b in alloc.bits.items()), rel=1e-12)
        for r, budget in budgets.items():
            assert alloc.usage[r] == pytest.approx(sum(costs[r][n][b] for n, b in alloc.bits.items()), rel=1e-12)
            assert alloc.usage[r] <= budget
    assert "Optimal" in fast.status and "combinations" in slow.status
    # the budget binds: the unconstrained optimum (all 8-bit) does not fit
    assert any(b < 8 for b in fast.bits.values())


def test_budget_exactly_at_a_choice_is_reachable() -> None:
    """Integer costs with the budget equal to uniform 4-bit: 4-bit everywhere is allowed and optimal here."""
    names = ["a", "b", "c"]
    sens = {n: {2: 10.0, 4: 1.0, 8: 0.0} for n in names}
    costs = {"weight_bytes": {n: {2: 25.0, 4: 50.0, 8: 100.0} for n in names}}
    alloc = allocate_bits(sens, costs, {"weight_bytes": 150.0})
    assert alloc.bits == {"a": 4, "b": 4, "c": 4} and alloc.usage == {"weight_bytes": 150.0}
    assert alloc.objective == 3.0
    # layer a much more sensitive at 4 bits: it gets 8 bits and the others pay with 2
    sens["a"] = {2: 50.0, 4: 30.0, 8: 0.0}
    alloc = allocate_bits(sens, costs, {"weight_bytes": 150.0})
    assert alloc.bits == {"a": 8, "b": 2, "c": 2} and alloc.objective == 20.0
    assert alloc.objective == brute_force_bits(sens, costs, {"weight_bytes": 150.0}).objective


def test_fixed_layers_are_honoured() -> None:
    sens, costs, budgets = random_case(3)
    pins = {"backbone.stage0.conv": 8, "backbone.stage3.conv": 2}
    alloc = allocate_bits(sens, costs, budgets, fixed=pins)
    assert {n: alloc.bits[n] for n in pins} == pins
    assert alloc.objective == pytest.approx(brute_force_bits(sens, costs, budgets, fixed=pins).objective, rel=1e-9)
    free = allocate_bits(sens, costs, budgets)
    assert alloc.objective >= free.objective - 1e-12


def test_unbudgeted_resources_are_reported() -> None:
    sens, costs, budgets = random_case(4)
    alloc = allocate_bits(sens, costs, {"weight_bytes": budgets["weight_bytes"]})
    assert set(alloc.usage) == {"weight_bytes", "bitops"} and alloc.budgets == {"weight_bytes": budgets["weight_bytes"]}
    d = json.loads(json.dumps(alloc.to_dict()))
    assert d["bits"] == alloc.bits and d["objective"] == alloc.objective
    assert isinstance(alloc, BitAllocation)


def test_infeasible_budget_names_resource_and_smallest_value() -> None:
    sens, costs, _ = random_case(5)
    least = sum(min(t.values()) for t in costs["bitops"].values())
    for solver in (allocate_bits, brute_force_bits):
        with pytest.raises(ConfigError) as err:
            solver(sens, costs, {"weight_bytes": 1e12, "bitops": 0.5 * least})
        msg = str(err.value)
        assert "bitops" in msg and f"{0.5 * least:g}" in msg and f"{least:g}" in msg
    # pinned layers raise the smallest reachable value
    pinned = sum(min(t.values()) for n, t in costs["bitops"].items() if n != "backbone.stage1.conv")
    pinned += costs["bitops"]["backbone.stage1.conv"][8]
    with pytest.raises(ConfigError, match=f"{pinned:g}"):
        allocate_bits(sens, costs, {"bitops": least}, fixed={"backbone.stage1.conv": 8})


def test_jointly_infeasible_budgets() -> None:
    """Each budget alone is reachable, but one wants 2-bit layer a and the other 2-bit layer b."""
    sens = {n: {2: 1.0, 8: 0.0} for n in "ab"}
    costs = {
        "r1": {"a": {2: 0.0, 8: 10.0}, "b": {2: 10.0, 8: 0.0}},
        "r2": {"a": {2: 10.0, 8: 0.0}, "b": {2: 0.0, 8: 10.0}},
    }
    for solver in (allocate_bits, brute_force_bits):
        with pytest.raises(ConfigError, match="cannot be met together"):
            solver(sens, costs, {"r1": 5.0, "r2": 5.0})


def test_input_errors() -> None:
    sens, costs, budgets = random_case(6)
    with pytest.raises(ConfigError, match="budget 'bitop' has no cost table.*did you mean 'bitops'"):
        allocate_bits(sens, costs, {"bitop": 1.0})
    del costs["bitops"]["backbone.stage2.conv"]
    with pytest.raises(ConfigError, match="cost table 'bitops' has no entry for layer 'backbone.stage2.conv'"):
        allocate_bits(sens, costs, budgets)
    sens, costs, budgets = random_case(6)
    del costs["weight_bytes"]["backbone.stage4.conv"][4]
    with pytest.raises(ConfigError, match=r"'backbone.stage4.conv': no cost for bits \[4\]"):
        allocate_bits(sens, costs, budgets)
    sens, costs, budgets = random_case(6)
    with pytest.raises(ConfigError, match="unknown layer 'backbone.stage9.con'"):
        allocate_bits(sens, costs, budgets, fixed={"backbone.stage9.con": 4})
    with pytest.raises(ConfigError, match="no sensitivity for 3 bits"):
        allocate_bits(sens, costs, budgets, fixed={"backbone.stage1.conv": 3})
    big = {f"l{k}": {b: 1.0 for b in BITS} for k in range(13)}  # 3**13 > 1e6
    big_costs = {"weight_bytes": {n: {b: float(b) for b in BITS} for n in big}}
    with pytest.raises(ConfigError, match="exceed"):
        brute_force_bits(big, big_costs, {"weight_bytes": 50.0})
    assert allocate_bits(big, big_costs, {"weight_bytes": 50.0}).usage["weight_bytes"] <= 50.0


def quadratic(n: int, seed: int) -> torch.Tensor:
    """A symmetric positive definite matrix with sizeable off-diagonal entries (~sqrt(n) beside a diagonal ~n)."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, n, generator=g, dtype=torch.float64)
    return b @ b.T + torch.diag(torch.rand(n, generator=g, dtype=torch.float64) * 3)


def test_hutchinson_trace_of_quadratic() -> None:
    """loss = 0.5 z^T A z with z = (x, y): the Hessian block of x is A[:nx, :nx], its trace the estimate's mean."""
    nx, ny = 30, 20
    a = quadratic(nx + ny, seed=0)
    x = torch.randn(nx, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)  # any shape

    def loss() -> torch.Tensor:
        z = torch.cat([x, y.flatten()])
        return 0.5 * z @ a @ z

    rng_before = torch.get_rng_state()
    est = hutchinson_trace(loss, {"x": x, "y": y}, samples=100, seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)  # private generator only
    assert est["x"] == pytest.approx(float(a[:nx, :nx].trace()), rel=0.1)
    assert est["y"] == pytest.approx(float(a[nx:, nx:].trace()), rel=0.1)
    assert est == hutchinson_trace(loss, {"x": x, "y": y}, samples=100, seed=1)  # seeded
    # a diagonal Hessian is exact with any number of samples (v_i^2 = 1)
    d = torch.rand(nx, dtype=torch.float64) + 0.5
    exact = hutchinson_trace(lambda: 0.5 * (d * x * x).sum(), {"x": x}, samples=2)
    assert exact["x"] == pytest.approx(float(d.sum()), rel=1e-12)


def test_hutchinson_errors_and_linear_loss() -> None:
    x = torch.randn(3, requires_grad=True)
    unused = torch.randn(2, requires_grad=True)
    assert hutchinson_trace(lambda: (2 * x).sum(), {"x": x}) == {"x": 0.0}  # linear: zero curvature
    with pytest.raises(ConfigError, match="does not depend on parameter 'unused'"):
        hutchinson_trace(lambda: (x * x).sum(), {"x": x, "unused": unused})
    with pytest.raises(ConfigError, match="scalar"):
        hutchinson_trace(lambda: x * x, {"x": x})
    with pytest.raises(ConfigError, match="does not require grad"):
        hutchinson_trace(lambda: (x * x).sum(), {"x": x.detach()})


def test_plot_bits(tmp_path) -> None:
    bits = {f"model.backbone.stage{k}.block.conv": b for k, b in enumerate([8, 4, 4, 2, 8, 6])}
    path = plot_bits(bits, tmp_path / "plots" / "bits.png", title="W bits")
    assert path == tmp_path / "plots" / "bits.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert [p.name for p in path.parent.iterdir()] == ["bits.png"]  # no temporary file left
    assert "<svg" in plot_bits(bits, tmp_path / "bits.svg").read_text()
    with pytest.raises(ConfigError):
        plot_bits({}, tmp_path / "empty.png")


def test_solver_tolerance_never_breaks_a_budget() -> None:
    """All-8-bit is over the budget by 1 in 3e12, inside HiGHS' tolerance: it is cut off and the MILP re-solved."""
    sens = {"a": {4: 1.0, 8: 0.0}, "b": {4: 1.0, 8: 0.0}}
    costs = {"bitops": {"a": {4: 1e12, 8: 2e12}, "b": {4: 1e12, 8: 1e12 + 1}}}
    alloc = allocate_bits(sens, costs, {"bitops": 3e12})
    assert alloc.usage["bitops"] <= 3e12 and alloc.objective == 1.0
    assert alloc.objective == brute_force_bits(sens, costs, {"bitops": 3e12}).objective
