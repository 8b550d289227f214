"""Knapsack allocation: the rank of every matrix chosen jointly to minimise the summed error under the budget.

A multiple-choice knapsack: each item (a matrix, or all matrices of one type when ranks are tied) offers
options, ranks that are multiples of `rank_step` up to its break-even rank, "dense", and (for a single
matrix) the sparse-plus-low-rank options its method computed; exactly one option per item; minimise Σ error subject to Σ parameters <= allowed. Solved exactly by dynamic programming over
the budget in units of the greatest common divisor of all option costs (so no rounding at all), unless
that needs more than `max_units` cells; then the unit grows to allowed / max_units and every cost is
rounded up (the budget is still never exceeded; `last_unit` holds the unit of the last call).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

import numpy as np

from ..errors import ConfigError
from .base import ALLOCATORS, DENSE, Allocator, Choice, MatrixCandidates, allowed_params
from .objective import Price


@dataclass
class _Item:
    members: list[MatrixCandidates]
    choices: list[Choice]  # ranks (DENSE = 0 for dense) and sparse options
    costs: list[Any]  # price of each option summed over members: parameters (int), or the objective's measure
    errors: list[float]


def _options(members: list[MatrixCandidates], step: int, price: Price | None = None) -> _Item:
    if any(m.keep_dense for m in members):
        ranks = [DENSE]
    else:
        top = min(m.max_rank for m in members)
        low = max(m.min_rank for m in members)
        ranks = [r for r in range(step, top + 1, step) if r >= low]
        ranks.append(DENSE)
    choices: list[Choice] = list(ranks)
    errors = [sum(0.0 if r == DENSE else float(m.errors[r]) for m in members) for r in ranks]
    if len(members) == 1 and not members[0].keep_dense:
        sparse = [o for o in members[0].sparse if o.cost < members[0].dense_params]
        choices += sparse
        errors += [o.error for o in sparse]
    costs = [sum(m.params(c) if price is None else price(m, c) for m in members) for c in choices]
    return _Item(members, choices, costs, errors)


def solve_mckp(costs: list[list[int]], errors: list[list[float]], capacity: int) -> tuple[list[int], float]:
    """Exact multiple-choice knapsack by DP: one option per item, Σ cost <= capacity, minimal Σ error.

    costs are integers (budget units). Returns (chosen option index per item, total error).
    dp[b] = least error of the items so far within cost b; O(items x options x capacity).
    """
    if sum(min(c) for c in costs) > capacity:
        raise ConfigError(
            "the budget cannot be met under these constraints: keep_dense / min_kept leave too few parameters to remove"
        )
    dp = np.zeros(capacity + 1)
    choices = []
    for item_costs, item_errors in zip(costs, errors):
        best = np.full(capacity + 1, np.inf)
        pick = np.zeros(capacity + 1, dtype=np.int32)
        for index, (c, e) in enumerate(zip(item_costs, item_errors)):
            if c > capacity:
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[c:] = dp[: capacity + 1 - c] + e
            better = candidate < best
            best[better] = candidate[better]
            pick[better] = index
        dp = best
        choices.append(pick)
    b = capacity
    chosen = [0] * len(costs)
    for i in range(len(costs) - 1, -1, -1):
        chosen[i] = int(choices[i][b])
        b -= costs[i][chosen[i]]
    return chosen, float(dp[capacity])


@ALLOCATORS.register("knapsack")
@dataclass
class KnapsackAllocator(Allocator):
    """Global optimum of Σ error under the budget (multiple-choice knapsack, exact DP on a rank grid)."""

    rank_step: int = 8
    max_units: int = 100_000
    same_rank_per_type: bool = False
    last_unit: float = field(default=0, init=False, repr=False)
    # the price of an option (see lrc.allocate.objective); None: parameters, the bytes on disk
    price: Price | None = field(default=None, init=False, repr=False)
    # with a price: the measured cost of the rest of the model (latency: its time outside the targeted
    # matrices), which the budget counts too: Σ price + outside <= (1 - budget) (Σ dense price + outside)
    outside: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.rank_step < 1 or self.max_units < 100:
            raise ConfigError("knapsack needs rank_step >= 1 and max_units >= 100")

    def _items(self, matrices: list[MatrixCandidates]) -> list[_Item]:
        groups: dict[str, list[MatrixCandidates]] = {}
        for m in matrices:
            key = m.group if self.same_rank_per_type else m.name
            groups.setdefault(key, []).append(m)
        return [_options(members, self.rank_step, self.price) for members in groups.values()]

    def allocate(self, matrices: list[MatrixCandidates], budget: float) -> dict[str, Choice]:
        items = self._items(matrices)
        if self.price is None:
            allowed = allowed_params(matrices, budget)
            gcd = reduce(math.gcd, (c for item in items for c in item.costs))
            unit: float = max(gcd, math.ceil(allowed / self.max_units))
            capacity = allowed // int(unit)
        else:  # measured prices: the allowed total in max_units units, every price rounded up
            price = self.price
            dense = sum(price(m, DENSE) for m in matrices)
            allowed_price = (1.0 - budget) * (dense + self.outside) - self.outside
            if any(c < 0 for item in items for c in item.costs):
                raise ValueError("an option of the knapsack is priced below zero")
            least = sum(min(item.costs) for item in items)
            if least > allowed_price:
                most = 1 - (least + self.outside) / (dense + self.outside)
                raise ConfigError(f"budget {budget} cannot be met by measured cost: the cheapest option of every "
                                  f"matrix together, with the rest of the model, still costs {1 - most:.3f} of the "
                                  f"dense model's (budget at most {most:.3f})")
            unit = allowed_price / self.max_units
            capacity = self.max_units
        self.last_unit = unit
        costs = [[-(-c // unit) if isinstance(c, int) and isinstance(unit, int) else math.ceil(c / unit)
                  for c in item.costs] for item in items]
        chosen, _ = solve_mckp(costs, [item.errors for item in items], capacity)
        picked: dict[str, Choice] = {}
        for item, index in zip(items, chosen):
            for m in item.members:
                picked[m.name] = item.choices[index]
        return picked

    def least_errors(self, matrices: list[MatrixCandidates], kept: list[float]) -> list[float | None]:
        """The least Σ error of these options within kept[i] · Σ m n parameters, for every i, from ONE DP.

        dp[b] after the last item is the best error within b units, for every b at once. As in `allocate`,
        costs are rounded up to units of max(gcd, ⌈Σ m n / max_units⌉), so a point's error is reachable
        within its kept fraction (pessimistic by less than one unit per matrix); k >= 1 keeps all dense.
        None where no choice fits.
        """
        items = self._items(matrices)
        total = sum(m.dense_params for m in matrices)
        unit = max(reduce(math.gcd, (c for item in items for c in item.costs)), math.ceil(total / self.max_units))
        costs = [[math.ceil(c / unit) for c in item.costs] for item in items]
        capacity = sum(max(c) for c in costs)
        dp = np.zeros(capacity + 1)
        for item_costs, item_errors in zip(costs, (item.errors for item in items)):
            best = np.full(capacity + 1, np.inf)
            for c, error in zip(item_costs, item_errors):
                np.minimum(best[c:], dp[: capacity + 1 - c] + error, out=best[c:])
            dp = best
        points = [float(dp[capacity if k >= 1 else min(capacity, int(k * total) // unit)]) for k in kept]
        return [p if math.isfinite(p) else None for p in points]
