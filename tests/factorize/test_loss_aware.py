"""Gradient-weighted methods: error curves against the directly computed weighted error."""

from __future__ import annotations

import pytest
import torch

from lrc.factorize import METHODS, OutputStats, breakeven_rank

from .test_methods import random_stats


def output_stats(m: int, seed: int = 0, full: bool = True) -> tuple[torch.Tensor, OutputStats]:
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(300, m, generator=g, dtype=torch.float64) * torch.linspace(0.05, 2, m, dtype=torch.float64)
    gram = grads.T @ grads
    fisher = torch.rand(m, generator=g, dtype=torch.float64) + 0.1
    return grads, OutputStats(gram if full else None, torch.diagonal(gram).clone(), fisher, 300)


@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("shape", [(20, 30), (30, 20)])
def test_loss_aware_errors_are_the_doubly_weighted_error(full, shape):
    m, n = shape
    weight = torch.randn(m, n, dtype=torch.float64)
    x, inputs = random_stats(n, seed=1)
    grads, outputs = output_stats(m, seed=2, full=full)
    dec = METHODS.create("loss-aware").decompose(weight, inputs, breakeven_rank(m, n), outputs=outputs)
    a = grads.T @ grads / 300 if full else torch.diag((grads**2).sum(0) / 300)
    g_in = x.T @ x / inputs.tokens
    for rank in (1, dec.max_rank // 2, dec.max_rank):
        up, down = dec.factors(rank)
        delta = weight - up.double() @ down.double()
        direct = torch.trace(a @ delta @ g_in @ delta.T)  # ||A^½ ΔW G^½||_F²
        assert float(dec.errors[rank]) == pytest.approx(float(direct), rel=2e-3)


def test_fwsvd_errors_are_fisher_row_weighted():
    m, n = 24, 16
    weight = torch.randn(m, n, dtype=torch.float64)
    _, inputs = random_stats(n)
    _, outputs = output_stats(m)
    dec = METHODS.create("fwsvd").decompose(weight, inputs, breakeven_rank(m, n), outputs=outputs)
    for rank in (2, 5):
        up, down = dec.factors(rank)
        direct = (outputs.fisher_rows.sqrt()[:, None] * (weight - up.double() @ down.double())).square().sum()
        assert float(dec.errors[rank]) == pytest.approx(float(direct), rel=1e-6)


def test_loss_aware_without_gradients_is_an_error():
    from lrc.errors import NumericalError

    _, inputs = random_stats(8)
    with pytest.raises(NumericalError, match="output-gradient statistics"):
        METHODS.create("loss-aware").decompose(torch.randn(8, 8), inputs, 3)
