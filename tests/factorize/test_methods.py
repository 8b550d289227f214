"""Each method's error curve against a direct computation of the weighted error of the truncated factors."""

from __future__ import annotations

import pytest
import torch

from lrc.factorize import METHODS, InputStats, breakeven_rank
from lrc.factorize.output_error import relative_output_errors


def random_stats(n: int, tokens: int = 400, dead: int = 0, seed: int = 0) -> tuple[torch.Tensor, InputStats]:
    """Correlated inputs X (tokens x n), optionally with `dead` all-zero channels (singular Gram)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix * torch.linspace(0.1, 3, n, dtype=torch.float64)
    if dead:
        x[:, :dead] = 0
    return x, InputStats(x.T @ x, x.abs().sum(0), tokens)


def input_weighting(method_name: str, stats: InputStats, method) -> torch.Tensor | None:
    """Independent construction of P_in as a dense matrix from the published definitions (None: whitening,
    checked against the output error instead, since any S with S Sᵀ = G gives the same norm)."""
    n = stats.gram.shape[0]
    if method_name == "svd":
        return torch.eye(n, dtype=torch.float64)
    if method_name == "asvd":
        s = stats.abs_sum / stats.tokens
        return torch.diag(s.clamp_min(1e-6 * s.max()) ** method.alpha)
    return None


@pytest.mark.parametrize("name", ["svd", "asvd", "svd-llm", "svd-llm-v2"])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_error_curve_matches_direct_weighted_error(name, shape):
    m, n = shape
    torch.manual_seed(1)
    weight = torch.randn(m, n, dtype=torch.float64)
    x, stats = random_stats(n)
    method = METHODS.create(name)
    dec = method.decompose(weight, stats, breakeven_rank(m, n))
    p_in = input_weighting(name, stats, method)
    for rank in (1, dec.max_rank // 2, dec.max_rank):
        up, down = dec.factors(rank)
        diff = weight - up.double() @ down.double()
        if p_in is not None:
            direct = (diff @ p_in).square().sum()
        else:  # whitened: dropped sigma^2 = mean squared output error on the calibration data
            direct = (x @ diff.T).square().sum() / stats.tokens
        assert float(dec.errors[rank]) == pytest.approx(float(direct), rel=1e-3, abs=1e-9)
    assert float(dec.errors[0]) >= float(dec.errors[1]) >= float(dec.errors[-1]) == 0.0


@pytest.mark.parametrize("name", ["svd-llm", "svd-llm-v2", "svd"])
def test_relative_output_error_against_dense_reference(name):
    m, n = 30, 20
    torch.manual_seed(2)
    weight = torch.randn(m, n, dtype=torch.float64)
    x, stats = random_stats(n, seed=3)
    dec = METHODS.create(name).decompose(weight, stats, breakeven_rank(m, n))
    curve = relative_output_errors(weight, stats.gram, dec)
    reference = (x @ weight.T).norm()
    for rank in range(1, dec.max_rank + 1):
        up, down = dec.factors(rank)
        direct = (x @ (weight - up.double() @ down.double()).T).norm() / reference
        assert float(curve[rank]) == pytest.approx(float(direct), rel=1e-4, abs=1e-7)
    assert float(curve[0]) == pytest.approx(1.0)


def test_whitening_beats_plain_svd_on_output_error():
    m, n = 32, 32
    torch.manual_seed(4)
    weight = torch.randn(m, n, dtype=torch.float64)
    _, stats = random_stats(n, seed=5)
    rank = 8
    errs = {}
    for name in ("svd", "svd-llm"):
        dec = METHODS.create(name).decompose(weight, stats, breakeven_rank(m, n))
        errs[name] = float(relative_output_errors(weight, stats.gram, dec)[rank])
    assert errs["svd-llm"] < errs["svd"]


@pytest.mark.parametrize("name", ["svd-llm", "svd-llm-v2"])
def test_singular_gram_gives_finite_factors(name):
    m, n = 16, 24
    weight = torch.randn(m, n, dtype=torch.float64)
    _, stats = random_stats(n, dead=5)
    dec = METHODS.create(name).decompose(weight, stats, breakeven_rank(m, n))
    assert torch.isfinite(dec.up_full).all() and torch.isfinite(dec.down_full).all()
    assert torch.isfinite(dec.errors).all()


def test_non_finite_weight_is_refused():
    from lrc.errors import NumericalError

    weight = torch.randn(8, 8, dtype=torch.float64)
    weight[2, 3] = float("nan")
    _, stats = random_stats(8)
    with pytest.raises(NumericalError, match="layers.0.q"):
        METHODS.create("svd-llm").decompose(weight, stats, 3, "layers.0.q")


def test_breakeven_rank():
    for m, n in [(576, 576), (192, 576), (1536, 576), (7, 3)]:
        r = breakeven_rank(m, n)
        assert r * (m + n) < m * n <= (r + 1) * (m + n)


def test_a_damping_above_the_retry_limit_is_used_not_skipped():
    """G singular: the whitener is the Cholesky factor of G + λ mean(diag G) I at the damping asked, even above
    the 1e-1 the retries stop at (it used to give up without trying)."""
    from lrc.factorize.whitening import cholesky_whitener

    gram = torch.diag(torch.tensor([4.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    chol, inv = cholesky_whitener(gram, 0.5)
    expected = gram + 0.5 * 1.0 * torch.eye(4, dtype=torch.float64)  # mean diagonal 1
    torch.testing.assert_close(chol @ chol.T, expected)
    torch.testing.assert_close(inv @ chol, torch.eye(4, dtype=torch.float64))
