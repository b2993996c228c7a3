"""The mix search's choice: one option per block, the least total damage for a budget, solved exactly.

A mixed-integer program (Puzzle's formulation), solved by SciPy's ``milp`` (HiGHS):

    binary x[b, c]                      block b takes choice c
    sum_c x[b, c] = 1                   for every block b
    sum_{b,c} cost[b][c] x[b, c] >= budget      (the parameters the choices remove)
    minimise sum_{b,c} damage[b][c] x[b, c]

plus ``limits``: linear caps on how many blocks may take choices of a kind (at least one block and one
attention and one MLP stay). The optimum is exact (relative gap 0), not a greedy ranking.

Why it is an approximation all the same: the damage is *additive*, each block's measured alone, on the
inputs the dense model gives it. In the pruned model a block sees the earlier blocks' errors, errors
compound (or cancel) through the later blocks, and the same error costs a different loss at another depth.
Summing block-local damages is the standard first-order model of this (Puzzle's replace-one-block scores,
Minitron's per-axis importances); the mix method can re-score on the chosen model and solve again
(``--rescore``), which corrects the first solution's inputs but not the additivity itself.

Costs are whatever the caller passes (parameters removed by default; a latency table would be seconds
saved per block choice). A global axis that changes every block's costs, such as the hidden size, fits
outside this program: solve once per global level with that level's table and keep the best.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prunekit.errors import PrunekitError


@dataclass(frozen=True)
class Limit:
    """At most ``most`` blocks may take a choice ``c`` with ``members[b][c]`` true."""

    members: list[list[bool]]
    most: int
    what: str  # what the limit keeps ("a block"), for the error when the budget cannot be met within it


@dataclass
class Solution:
    choices: list[int]  # the choice index per block
    damage: float
    cost: float


def solve(damage: list[list[float]], cost: list[list[float]], budget: float, limits: list[Limit] = ()) -> Solution:
    """The choice per block with the least summed damage whose summed cost reaches ``budget``.

    ``damage[b][c]`` and ``cost[b][c]``: choice ``c`` of block ``b`` (blocks may have different numbers
    of choices). ``PrunekitError`` when no choice of every block reaches the budget within the limits."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    sizes = [len(row) for row in damage]
    if any(len(c) != n for c, n in zip(cost, sizes, strict=True)) or not all(sizes):
        raise ValueError("damage and cost need the same non-empty choices per block")
    offsets = np.cumsum([0, *sizes])
    n = int(offsets[-1])
    d, k = np.concatenate([np.asarray(r, dtype=float) for r in damage]), np.concatenate(
        [np.asarray(r, dtype=float) for r in cost]
    )
    one_each = np.zeros((len(sizes), n))
    for b, (start, end) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        one_each[b, start:end] = 1
    constraints = [LinearConstraint(one_each, 1, 1), LinearConstraint(k[None], budget, np.inf)]
    for limit in limits:
        row = np.concatenate([np.asarray(m, dtype=float) for m in limit.members])
        constraints.append(LinearConstraint(row[None], 0, limit.most))
    result = milp(
        d, integrality=np.ones(n), bounds=Bounds(0, 1), constraints=constraints, options={"mip_rel_gap": 0.0}
    )
    if result.status == 2:  # infeasible
        kept = f" while keeping {', '.join(limit.what for limit in limits)}" if limits else ""
        raise PrunekitError(f"no choice per block removes {budget:,.0f} parameters{kept}; lower --target-params")
    if result.x is None or result.status != 0:
        raise PrunekitError(f"the mix solver stopped without an optimum ({result.message}); lower --target-params")
    x = np.round(result.x).astype(bool)
    choices = [int(np.flatnonzero(x[s:e])[0]) for s, e in zip(offsets[:-1], offsets[1:], strict=True)]
    return Solution(choices, float(d[x].sum()), float(k[x].sum()))
