"""Multiple-choice knapsack: pick one option per group, minimizing the summed error under a byte budget.

``kvtool plan`` has one group per (layer, role) — or per (layer, KV head, role) — and one option per
candidate codec, with its true stored bytes as the cost and its measured error as the value.

Method: exact dynamic programming over a discretised budget. Every group's cheapest option is taken first;
the DP then spends the rest of the budget on upgrades. Upgrade costs are divided by a unit ``u``: the
greatest common divisor of all upgrade costs when the table stays under ``max_cells`` (then the answer is
the exact optimum, equal to brute force), otherwise ``u = ⌈rest / max_cells⌉`` with every cost rounded *up*
to a multiple of ``u`` — the chosen options then always fit the budget in true bytes, and the solution is
optimal for the rounded costs. A greedy pass finally spends bytes the rounding left over on the upgrades
with the best error decrease that still fit. Dominated options (no cheaper and no better than another) are
dropped before the DP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAX_CELLS = 1 << 15


@dataclass
class Solution:
    """Chosen option index per group, the total cost (true units) and the summed error."""

    choice: list[int]
    cost: int
    error: float
    unit: int  # the DP's cost unit: 1 or the gcd means exact, larger means rounded-up costs
    exact: bool


def _frontier(cost: np.ndarray, err: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated options of one group, by increasing cost (strictly falling error)."""
    order = np.lexsort((err, cost))
    keep, best = [], math.inf
    for i in order:
        if err[i] < best:
            keep.append(int(i))
            best = float(err[i])
    return np.array(keep, dtype=np.int64)


def solve(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: int, *,
          max_cells: int = MAX_CELLS) -> Solution:
    """One option per group minimizing ``Σ errors[g][choice[g]]`` with ``Σ costs[g][choice[g]] <= budget``.

    Costs are non-negative integers (bytes). Raises ValueError when even the cheapest options exceed the
    budget or a group is empty.
    """
    cost = [np.asarray(c, dtype=np.int64) for c in costs]
    err = [np.asarray(e, dtype=np.float64) for e in errors]
    if any(c.size == 0 for c in cost) or len(cost) != len(err):
        raise ValueError("every group needs at least one option, with a cost and an error each")
    keep = [_frontier(c, e) for c, e in zip(cost, err, strict=True)]
    base = [int(c[k[0]]) for c, k in zip(cost, keep, strict=True)]  # the cheapest option of each group
    rest = int(budget) - sum(base)
    if rest < 0:
        raise ValueError(f"the cheapest options cost {sum(base)}, over the budget {budget}")
    extra = [c[k] - b for c, k, b in zip(cost, keep, base, strict=True)]  # upgrade costs, first is 0
    unit = math.gcd(*(int(x) for e in extra for x in e)) or 1
    exact = rest // unit <= max_cells
    if not exact:
        unit = -(-rest // max_cells)
    scaled = [-(-e // unit) for e in extra]  # rounded up: what fits in the table fits in true bytes
    cells = rest // unit + 1
    dp = np.zeros(cells)  # dp[b]: least error of the groups so far with scaled upgrade cost <= b
    picks = []
    for e_opts, s_opts, k in zip(err, scaled, keep, strict=True):
        vals = e_opts[k]
        new = np.full(cells, np.inf)
        pick = np.zeros(cells, dtype=np.int32)
        for j, (s, v) in enumerate(zip(s_opts, vals, strict=True)):
            if s >= cells:
                break  # options are sorted by cost
            cand = np.full(cells, np.inf)
            cand[s:] = dp[:cells - s] + v
            better = cand < new
            new[better], pick[better] = cand[better], j
        dp = new
        picks.append(pick)
    b = cells - 1
    chosen = [0] * len(cost)
    for g in range(len(cost) - 1, -1, -1):
        j = int(picks[g][b])
        chosen[g] = j
        b -= int(scaled[g][j])
    chosen = _spend_leftover(chosen, extra, err, keep, rest)
    choice = [int(k[j]) for k, j in zip(keep, chosen, strict=True)]
    total = sum(int(c[i]) for c, i in zip(cost, choice, strict=True))
    return Solution(choice, total, float(sum(e[i] for e, i in zip(err, choice, strict=True))), unit, exact)


def _spend_leftover(chosen: list[int], extra: list[np.ndarray], err: list[np.ndarray], keep: list[np.ndarray],
                    rest: int) -> list[int]:
    """Greedy upgrades into the bytes that rounding left unused (never beyond the budget)."""
    chosen = list(chosen)
    left = rest - sum(int(x[j]) for x, j in zip(extra, chosen, strict=True))
    while left > 0:
        best = None
        for g, (x, e, k) in enumerate(zip(extra, err, keep, strict=True)):
            j = chosen[g]
            for jj in range(j + 1, len(k)):
                delta = int(x[jj] - x[j])
                if delta > left:
                    break
                gain = float(e[k[j]] - e[k[jj]])
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, g, jj, delta)
        if best is None:
            break
        _, g, jj, delta = best
        chosen[g] = jj
        left -= delta
    return chosen
