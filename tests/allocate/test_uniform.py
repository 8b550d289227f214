"""Uniform allocation: budget accounting on random shapes."""

from __future__ import annotations

import pytest
import torch

from lrc.allocate import ALLOCATORS, DENSE, MatrixCandidates, stored_params
from lrc.errors import ConfigError
from lrc.factorize import breakeven_rank


def matrices(shapes, keep=()):
    return [
        MatrixCandidates(f"m{i}", (m, n), torch.zeros(min(m, n) + 1), breakeven_rank(m, n), keep_dense=i in keep)
        for i, (m, n) in enumerate(shapes)
    ]


SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (64, 64)]


@pytest.mark.parametrize("budget", [0.05, 0.2, 0.3, 0.5, 0.9])
def test_removes_at_least_the_budget_and_not_much_more(budget):
    mats = matrices(SHAPES)
    ranks = ALLOCATORS.create("uniform").allocate(mats, budget)
    total = sum(m.dense_params for m in mats)
    removed = 1 - stored_params(mats, ranks) / total
    assert removed >= budget
    # each matrix is at most one rank below the exact ratio
    assert removed - budget <= sum(m.shape[0] + m.shape[1] for m in mats) / total


def test_keep_dense_shifts_the_cut_to_the_others():
    mats = matrices(SHAPES, keep={2})
    ranks = ALLOCATORS.create("uniform").allocate(mats, 0.3)
    assert ranks["m2"] == DENSE
    assert 1 - stored_params(mats, ranks) / sum(m.dense_params for m in mats) >= 0.3


def test_unreachable_budget_is_an_error():
    mats = matrices([(64, 64), (512, 512)], keep={1})
    with pytest.raises(ConfigError, match="cannot be met"):
        ALLOCATORS.create("uniform").allocate(mats, 0.5)
