"""The knapsack allocator against brute force, and its budget accounting."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lrc.allocate import ALLOCATORS, DENSE, MatrixCandidates, allowed_params, stored_params
from lrc.allocate.knapsack import solve_mckp
from lrc.errors import ConfigError
from lrc.factorize import SparseOption, breakeven_rank


def random_matrix(name, m, n, gen, group=""):
    """A decreasing error curve like dropped σ²: errors[r] = Σ_{i>=r} σ_i²."""
    sigma_sq = torch.rand(min(m, n), generator=gen, dtype=torch.float64).sort(descending=True).values
    tail = sigma_sq.flip(0).cumsum(0).flip(0)
    return MatrixCandidates(name, (m, n), torch.cat([tail, tail.new_zeros(1)]), breakeven_rank(m, n), group=group)


@pytest.mark.parametrize("seed", range(12))
def test_mckp_equals_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    items = int(torch.randint(2, 5, (1,), generator=gen))
    costs = [sorted(torch.randint(1, 30, (int(torch.randint(1, 5, (1,), generator=gen)),), generator=gen).tolist())
             for _ in range(items)]
    errors = [torch.rand(len(c), generator=gen).tolist() for c in costs]
    capacity = int(torch.randint(sum(min(c) for c in costs), sum(max(c) for c in costs) + 1, (1,), generator=gen))
    chosen, total = solve_mckp(costs, errors, capacity)
    best = min(
        sum(errors[i][o] for i, o in enumerate(combo))
        for combo in itertools.product(*[range(len(c)) for c in costs])
        if sum(costs[i][o] for i, o in enumerate(combo)) <= capacity
    )
    assert total == pytest.approx(best)
    assert sum(costs[i][o] for i, o in enumerate(chosen)) <= capacity
    assert sum(errors[i][o] for i, o in enumerate(chosen)) == pytest.approx(best)


def choice_error(m, choice):
    if isinstance(choice, SparseOption):
        return choice.error
    return 0.0 if choice == DENSE else float(m.errors[choice])


def summed_error(mats, picked):
    return sum(choice_error(m, picked[m.name]) for m in mats)


def brute_force_error(mats, options, allowed):
    """The least summed error over every combination of one option per matrix within `allowed` parameters."""
    return min(
        sum(choice_error(m, c) for m, c in zip(mats, combo))
        for combo in itertools.product(*options)
        if sum(m.params(c) for m, c in zip(mats, combo)) <= allowed
    )


@pytest.mark.parametrize("seed", range(6))
def test_allocator_equals_brute_force_over_its_rank_grid(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    shapes = [(24, 16), (16, 16), (8, 24)]
    mats = [random_matrix(f"m{i}", m, n, gen) for i, (m, n) in enumerate(shapes)]
    budget = 0.2 + 0.5 * float(torch.rand(1, generator=gen))
    allocator = ALLOCATORS.create("knapsack", {"rank_step": 2})
    ranks = allocator.allocate(mats, budget)
    allowed = allowed_params(mats, budget)

    options = [[r for r in range(2, m.max_rank + 1, 2)] + [DENSE] for m in mats]
    assert summed_error(mats, ranks) == pytest.approx(brute_force_error(mats, options, allowed))
    assert stored_params(mats, ranks) <= allowed


def test_meets_budget_and_wastes_less_than_one_step():
    gen = torch.Generator().manual_seed(7)
    mats = [random_matrix(f"l{i}.{t}", m, n, gen) for i in range(4)
            for t, (m, n) in {"q": (64, 64), "k": (32, 64), "up": (128, 64), "down": (64, 128)}.items()]
    for budget in (0.1, 0.3, 0.5):
        allocator = ALLOCATORS.create("knapsack", {"rank_step": 4})
        ranks = allocator.allocate(mats, budget)
        allowed = allowed_params(mats, budget)
        used = stored_params(mats, ranks)
        assert used <= allowed
        assert allocator.last_unit == math.gcd(*[4 * sum(m.shape) for m in mats], *[m.dense_params for m in mats])
        leftover = allowed - used
        for m in mats:  # no matrix could move to its next option with what is left
            r = ranks[m.name]
            if r != DENSE:
                nxt = r + 4 if r + 4 <= m.max_rank else DENSE
                assert leftover < m.params(nxt) - m.params(r)


def test_constraints_keep_dense_min_rank_and_tied_types():
    gen = torch.Generator().manual_seed(3)
    mats = [random_matrix(f"l{i}.{t}", 32, 32, gen, group=t) for i in range(3) for t in ("q", "o")]
    mats[0].keep_dense = True
    mats[1].min_rank = 12
    ranks = ALLOCATORS.create("knapsack", {"rank_step": 1}).allocate(mats, 0.3)
    assert ranks["l0.q"] == DENSE and (ranks["l0.o"] >= 12 or ranks["l0.o"] == DENSE)
    mats[0].keep_dense = False
    mats[1].min_rank = 1
    tied = ALLOCATORS.create("knapsack", {"rank_step": 1, "same_rank_per_type": True}).allocate(mats, 0.3)
    assert len({tied[f"l{i}.q"] for i in range(3)}) == 1 and len({tied[f"l{i}.o"] for i in range(3)}) == 1


def test_infeasible_budget():
    gen = torch.Generator().manual_seed(0)
    mats = [random_matrix("a", 16, 16, gen)]
    mats[0].keep_dense = True
    with pytest.raises(ConfigError, match="cannot be met"):
        ALLOCATORS.create("knapsack").allocate(mats, 0.5)


@pytest.mark.parametrize("name", ["energy", "svd-llm-v2", "knapsack", "uniform"])
@pytest.mark.parametrize("budget", [0.2, 0.4])
def test_every_allocator_meets_the_budget(name, budget):
    gen = torch.Generator().manual_seed(11)
    shapes = {"q": (96, 96), "k": (32, 96), "up": (256, 96), "down": (96, 256)}
    mats = [random_matrix(f"l{i}.{t}", m, n, gen, group=t) for i in range(3) for t, (m, n) in shapes.items()]
    ranks = ALLOCATORS.create(name).allocate(mats, budget)
    removed = 1 - stored_params(mats, ranks) / sum(m.dense_params for m in mats)
    assert removed >= budget - (0.0 if name != "svd-llm-v2" else 0.01)
    assert removed < budget + 0.05


@pytest.mark.parametrize("seed", range(6))
def test_sparse_options_compete_with_ranks_exactly(seed):
    """With sparse options (arbitrary byte costs) next to the ranks, the knapsack still finds the brute-force optimum."""
    gen = torch.Generator().manual_seed(200 + seed)
    shapes = [(24, 16), (16, 16), (8, 24)]
    mats = [random_matrix(f"m{i}", m, n, gen) for i, (m, n) in enumerate(shapes)]
    for m in mats:
        total = float(m.errors[0])
        m.sparse = [
            SparseOption("sparse-dictionary", 4, 10, "csr", 0, int(c), total * float(e))
            for c, e in zip(torch.randint(10, m.dense_params, (3,), generator=gen), torch.rand(3, generator=gen) * 0.5)
        ]
    budget = 0.2 + 0.5 * float(torch.rand(1, generator=gen))
    picked = ALLOCATORS.create("knapsack", {"rank_step": 2}).allocate(mats, budget)
    allowed = allowed_params(mats, budget)

    options = [[*range(2, m.max_rank + 1, 2), DENSE, *m.sparse] for m in mats]
    assert summed_error(mats, picked) == pytest.approx(brute_force_error(mats, options, allowed))
    assert stored_params(mats, picked) <= allowed
