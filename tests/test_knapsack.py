"""The multiple-choice knapsack behind `kvtool plan`: equal to brute force, never over the budget."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from kvtool.knapsack import solve


def brute_force(costs, errors, budget):
    best = math.inf
    for combo in itertools.product(*(range(len(c)) for c in costs)):
        if sum(costs[g][i] for g, i in enumerate(combo)) <= budget:
            best = min(best, sum(errors[g][i] for g, i in enumerate(combo)))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_equals_brute_force_on_small_instances(seed: int) -> None:
    rng = np.random.default_rng(seed)
    groups = int(rng.integers(1, 6))
    costs = [list(rng.integers(1, 30, size=int(rng.integers(1, 5)))) for _ in range(groups)]
    errors = [list(rng.random(len(c)) * 10) for c in costs]
    budget = int(sum(min(c) for c in costs) + rng.integers(0, 40))
    sol = solve(costs, errors, budget)
    assert sol.exact and sol.cost <= budget
    assert sol.error == pytest.approx(brute_force(costs, errors, budget), abs=1e-12)
    assert sol.cost == sum(costs[g][i] for g, i in enumerate(sol.choice))
    assert sol.error == pytest.approx(sum(errors[g][i] for g, i in enumerate(sol.choice)))


def test_large_costs_use_the_gcd_and_stay_exact() -> None:
    costs = [[12_288, 24_576, 49_152], [12_288, 36_864], [24_576, 49_152, 98_304]]
    errors = [[5.0, 2.0, 0.5], [4.0, 1.0], [3.0, 1.5, 0.1]]
    for budget in range(49_152, 200_000, 6_000):
        sol = solve(costs, errors, budget, max_cells=64)
        assert sol.unit == 12_288 and sol.exact
        assert sol.error == pytest.approx(brute_force(costs, errors, budget))


def test_rounded_costs_never_exceed_the_budget() -> None:
    rng = np.random.default_rng(7)
    costs = [list(rng.integers(1_000, 50_000, size=6)) for _ in range(12)]
    errors = [list(np.sort(rng.random(6))[::-1]) for _ in costs]
    cheapest = sum(min(c) for c in costs)
    for budget in (cheapest, 200_000, 350_000):
        sol = solve(costs, errors, budget, max_cells=50)  # forces a coarse unit
        assert sol.exact == (budget == cheapest) and sol.cost <= budget
        fine = solve(costs, errors, budget, max_cells=1 << 20)
        assert fine.error <= sol.error + 1e-12 and fine.cost <= budget


def test_budget_below_the_cheapest_options() -> None:
    with pytest.raises(ValueError, match="over the budget"):
        solve([[5, 7], [3]], [[1.0, 0.5], [1.0]], 7)
