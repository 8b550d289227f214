"""The allocation curve kept in the report: the knapsack's one-DP frontier against brute force, and the
grid of allocations for other allocators."""

from __future__ import annotations

import itertools

import pytest
import torch

from lrc.allocate import ALLOCATORS, DENSE, stored_params
from lrc.allocate.curve import KEPT_GRID, allocation_curve, choice_error
from lrc.factorize import SparseOption

from .test_knapsack import random_matrix

SHAPES = [(8, 8), (4, 8), (8, 12), (6, 8)]


def matrices(seed: int, sparse: bool = False):
    gen = torch.Generator().manual_seed(seed)
    found = [random_matrix(f"model.layers.{i // 2}.m{i}", m, n, gen, group=f"t{i % 2}") for i, (m, n) in enumerate(SHAPES)]
    if sparse:  # one sparse option on the first matrix, cheaper than rank 2 and better than rank 1
        first = found[0]
        option = SparseOption("sparse-dictionary", 1, 10, "csr", 0, 24, float(first.errors[1]) * 0.5)
        first.sparse = [option]
    return found


def brute_force_least(cands, step: int, capacity: int, tie_groups: bool) -> float:
    """min Σ error over every combination of ranks (multiples of step up to max_rank), dense and sparse options."""
    def options(m):
        return [r for r in range(step, m.max_rank + 1, step)] + [DENSE] + list(m.sparse if not tie_groups else [])

    if tie_groups:  # one rank per group, shared by its members
        groups: dict[str, list] = {}
        for m in cands:
            groups.setdefault(m.group, []).append(m)
        per_group = []
        for members in groups.values():
            top = min(m.max_rank for m in members)
            per_group.append([[(m, r) for m in members] for r in [*range(step, top + 1, step), DENSE]])
        combos = [sum(c, []) for c in itertools.product(*per_group)]
    else:
        combos = [list(zip(cands, c)) for c in itertools.product(*[options(m) for m in cands])]
    best = float("inf")
    for combo in combos:
        if sum(m.params(c) for m, c in combo) <= capacity:
            best = min(best, sum(choice_error(m, c) for m, c in combo))
    return best


@pytest.mark.parametrize(("seed", "tie_groups", "sparse"), [(0, False, False), (1, False, True), (2, True, False)])
def test_knapsack_frontier_is_the_least_error_at_every_size(seed, tie_groups, sparse):
    cands = matrices(seed, sparse)
    allocator = ALLOCATORS.create("knapsack", {"rank_step": 1, "same_rank_per_type": tie_groups})
    total = sum(m.dense_params for m in cands)
    kept = [0.1, 0.2, 0.33, 0.5, 0.61, 0.8, 1.0]
    least = allocator.least_errors(cands, kept)  # type: ignore[attr-defined]
    for k, got in zip(kept, least):
        expected = brute_force_least(cands, 1, int(k * total), tie_groups)
        assert got == (None if expected == float("inf") else pytest.approx(expected)), k


def test_curve_marks_the_run_and_never_rises(seed=3):
    cands = matrices(seed, sparse=True)
    allocator = ALLOCATORS.create("knapsack", {"rank_step": 1})
    choices = allocator.allocate(cands, 0.4)
    curve = allocation_curve(allocator, cands, choices)
    total = sum(m.dense_params for m in cands)
    assert curve["kept_fraction"] == KEPT_GRID and curve["error"][-1] == 0.0
    finite = [e for e in curve["error"] if e is not None]
    assert finite == sorted(finite, reverse=True)
    assert curve["chosen"] == {"kept_fraction": round(stored_params(cands, choices) / total, 4),
                               "error": pytest.approx(sum(choice_error(m, choices[m.name]) for m in cands), rel=1e-5)}
    # the knapsack's own choice at 60% kept is the frontier's point at 60%
    assert curve["error"][KEPT_GRID.index(0.6)] == pytest.approx(curve["chosen"]["error"], rel=1e-5)


def test_other_allocators_are_run_at_each_budget():
    cands = matrices(4)
    allocator = ALLOCATORS.create("uniform", {})
    curve = allocation_curve(allocator, cands, allocator.allocate(cands, 0.3), grid=[0.3, 0.5, 0.7, 1.0])
    total = sum(m.dense_params for m in cands)
    assert len(curve["kept_fraction"]) == 3  # kept 1.0 is no budget for a budget-driven allocator
    for k, kept, error in zip([0.3, 0.5, 0.7], curve["kept_fraction"], curve["error"]):
        picked = allocator.allocate(cands, 1 - k)
        assert kept == round(stored_params(cands, picked) / total, 4) <= k + 1e-9
        assert error == pytest.approx(sum(choice_error(m, picked[m.name]) for m in cands), rel=1e-5)
