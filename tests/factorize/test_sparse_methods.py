"""Sparse-plus-low-rank methods: option errors against the directly computed weighted error, the closed-form
refit against a least-squares solve, and honest byte costs."""

from __future__ import annotations

import math

import pytest
import torch

from lrc.errors import ConfigError
from lrc.factorize import METHODS, breakeven_rank
from lrc.factorize.low_rank_sparse import sparse_correction
from lrc.factorize.sparse_dictionary import group_top_mask, row_top_mask
from lrc.forms.sparse_linear import LowRankSparseLinear, SparseDictionaryLinear

from .test_loss_aware import output_stats
from .test_methods import random_stats

SHAPES = [(24, 40), (40, 24)]


def problem_and_reference(method, m, n, seed=0):
    """The method's weighted problem, and A = E[g gᵀ], G = E[x xᵀ] computed here from the raw samples."""
    weight = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    x, inputs = random_stats(n, seed=seed + 1)
    grads, outputs = output_stats(m, seed=seed + 2)
    problem = method.weighted_problem(weight, inputs, "w", None, outputs)
    return weight, inputs, outputs, problem, grads.T @ grads / outputs.tokens, x.T @ x / inputs.tokens


def loss_error(a, g, delta):
    """tr(A ΔW G ΔWᵀ) = ||A^½ ΔW G^½||_F², the loss-aware scale."""
    return float(torch.trace(a @ delta @ g @ delta.T))


@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_dictionary_option_errors_are_the_weighted_error(shape):
    m, n = shape
    method = METHODS.create("sparse-dictionary", {"ridge": 0.0})
    weight, inputs, outputs, problem, a, g = problem_and_reference(method, m, n)
    dec = method.decompose(weight, inputs, breakeven_rank(m, n), outputs=outputs)
    assert dec.sparse_options and not any(o.refined for o in dec.sparse_options)  # first fits, upper bounds
    pairs = method.refine_options(problem, dec.sparse_options)
    refined = [option for option, _ in pairs]
    assert all(o.refined for o in refined)
    for option, factors in pairs:  # the refit's factors are the layer's, to the bit
        assert factors is not None
        for name, tensor in method.sparse_layer(problem, option).items():
            assert torch.equal(tensor, factors[name])
    assert all(r.error <= o.error for r, o in zip(refined, dec.sparse_options))
    for option in refined:
        factors = method.sparse_layer(problem, option)
        mixing, atoms = factors["mixing"], factors["atoms"]
        assert mixing.shape == (m, option.rank) and atoms.shape == (option.rank, n)
        assert ((mixing != 0).sum(1) == option.nnz // m).all()  # s entries in every output row
        direct = loss_error(a, g, weight - mixing @ atoms)
        assert option.error == pytest.approx(direct, rel=1e-3)


def test_reselection_rounds_refine_the_same_options_and_never_raise_their_errors():
    m, n = SHAPES[0]
    weight, inputs, outputs, *_ = problem_and_reference(METHODS.create("sparse-dictionary"), m, n)
    errors = {}
    for rounds in (0, 2, 8):
        method = METHODS.create("sparse-dictionary", {"reselect": rounds, "sparsity_levels": [1.5, 2.0], "reselect_options": "all"})
        dec = method.decompose(weight, inputs, breakeven_rank(m, n), outputs=outputs)
        errors[rounds] = {(o.rank, o.nnz): o.error for o in dec.sparse_options}
    assert errors[0].keys() == errors[2].keys() == errors[8].keys()  # the level is chosen before the rounds
    for key in errors[0]:
        assert errors[8][key] <= errors[2][key] <= errors[0][key]
    assert any(errors[2][key] < 0.99 * errors[0][key] for key in errors[0])


def test_refining_chosen_options_gives_the_errors_of_refining_every_option():
    """reselect_options "near-choice" defers the rounds: refine_options later gives what "all" computes at once."""
    m, n = 40, 24
    weight, inputs, outputs, problem, *_ = problem_and_reference(METHODS.create("sparse-dictionary"), m, n, seed=3)
    every = METHODS.create("sparse-dictionary", {"reselect_options": "all"})
    deferred = METHODS.create("sparse-dictionary")
    all_options = every.decompose(weight, inputs, breakeven_rank(m, n), outputs=outputs).sparse_options
    first = deferred.decompose(weight, inputs, breakeven_rank(m, n), outputs=outputs).sparse_options
    assert [(o.rank, o.nnz) for o in first] == [(o.rank, o.nnz) for o in all_options]
    assert all(o.refined for o in all_options) and not any(o.refined for o in first)
    picked = first[1::3]
    for option, (refined, _) in zip(picked, deferred.refine_options(problem, picked)):
        expected = next(o for o in all_options if (o.rank, o.nnz) == (option.rank, option.nnz))
        assert refined.error == pytest.approx(expected.error, rel=1e-9) and refined.refined
    one_shot = METHODS.create("sparse-dictionary", {"reselect": 0}).decompose(weight, inputs, breakeven_rank(m, n), outputs=outputs)
    assert [o.error for o in first] == [o.error for o in one_shot.sparse_options]


def test_row_top_mask_keeps_what_topk_keeps_even_with_ties():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(50, 30, dtype=torch.float64, generator=gen)
    values[::3] = torch.randint(-3, 4, (17, 30), generator=gen).double()  # rows full of ties, zeros included
    for s in (1, 7, 15, 29, 30, 40):
        mask = row_top_mask(values, s)
        keep = values.abs().topk(min(s, 30), dim=1).indices
        expected = torch.zeros_like(mask).scatter_(1, keep, True)
        assert torch.equal(mask, expected)  # the threshold, or topk itself in rows tied at it
        assert (mask.sum(dim=1) == min(s, 30)).all()
        kept = torch.where(mask, values.abs(), torch.inf).amin(dim=1)  # every kept |v| >= every dropped |v|
        dropped = torch.where(mask, -torch.inf, values.abs()).amax(dim=1)
        assert (kept >= dropped).all()


def test_sparse_dictionary_refit_is_the_least_squares_solution():
    """With ridge 0 the atoms minimise ||P_out (W - S U) P_in||: compare with torch.linalg.lstsq on that problem."""
    m, n = 40, 24
    method = METHODS.create("sparse-dictionary", {"ridge": 0.0, "atom_step": 1})  # many options at this small size
    weight, inputs, outputs, problem, a, g = problem_and_reference(method, m, n, seed=5)
    option = method.decompose(weight, inputs, breakeven_rank(m, n), outputs=outputs).sparse_options[3]
    factors = method.sparse_layer(problem, option)
    mixing, atoms = factors["mixing"], factors["atoms"]
    # min_U ||A^½ (W - S U) G^½||: with Z = U G^½, an ordinary least squares in Z
    a_half = torch.linalg.cholesky(a).T
    g_half = torch.linalg.cholesky(g)
    z = torch.linalg.lstsq(a_half @ mixing, a_half @ weight @ g_half).solution
    expected = z @ torch.linalg.inv(g_half)
    torch.testing.assert_close(atoms, expected, rtol=1e-4, atol=1e-6)


def test_sparse_dictionary_costs_count_indices():
    m, n = 40, 24
    method = METHODS.create("sparse-dictionary")
    weight, inputs, outputs, problem, _, _ = problem_and_reference(method, m, n)
    for value_bytes in (2, 4):
        for option in method.decompose(weight, inputs, 5, outputs=outputs, value_bytes=value_bytes).sparse_options:
            layer = SparseDictionaryLinear.from_factors(
                **method.sparse_layer(problem, option), dtype=torch.float32, layout=option.layout
            )
            assert layer.weight_bytes(value_bytes) == option.bytes
            assert option.cost == math.ceil(option.bytes / value_bytes)
            assert option.bytes < m * n * value_bytes  # an option that saves nothing is not offered


@pytest.mark.parametrize("shape", SHAPES)
def test_low_rank_sparse_option_errors_are_the_weighted_error(shape):
    m, n = shape
    method = METHODS.create("low-rank-sparse")
    weight, inputs, outputs, problem, a, g = problem_and_reference(method, m, n)
    dec = method.decompose(weight, inputs, breakeven_rank(m, n), outputs=outputs)
    assert dec.sparse_options
    for option in dec.sparse_options:
        up, down = problem.low_rank(option.rank)
        residual, error = sparse_correction(problem, weight - up @ down, option.nnz)
        assert int((residual != 0).sum()) == option.nnz
        assert option.error == pytest.approx(error)
        assert error == pytest.approx(loss_error(a, g, weight - up @ down - residual), rel=1e-3)
        # the correction never hurts, and the built layer (low rank refitted to W - R) does at least as well
        assert error <= loss_error(a, g, weight - up @ down) * (1 + 1e-6)
        factors = method.sparse_layer(problem, option)
        built = factors["up"] @ factors["down"] + factors["residual"]
        assert loss_error(a, g, weight - built) <= error * (1 + 1e-6)
        layer = LowRankSparseLinear.from_factors(**factors, dtype=torch.float64, layout=option.layout)
        assert layer.weight_bytes(4) == option.bytes


def test_sparse_correction_with_identity_weights_keeps_the_largest_residual_entries():
    m, n = 12, 9
    method = METHODS.create("svd")  # no weighting: P_out = P_in = identity
    weight = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x, inputs = random_stats(n)
    problem = method.weighted_problem(weight, inputs)
    residual = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    kept, error = sparse_correction(problem, residual, 10)
    top = residual.abs().flatten().topk(10).indices
    expected = torch.zeros(m * n, dtype=torch.float64)
    expected[top] = residual.flatten()[top]
    torch.testing.assert_close(kept.flatten(), expected)
    assert error == pytest.approx(float(residual.flatten().square().sum() - expected.square().sum()))


def test_sparse_options_beat_plain_rank_of_the_same_bytes_on_a_decaying_spectrum():
    """Not a guarantee in general; for a matrix with slowly decaying singular values, the dictionary's
    sparse mixing buys more than the rank it gives up (the reason the family exists)."""
    m, n = 64, 64
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    weight = u @ torch.diag(torch.linspace(1.0, 0.3, 64, dtype=torch.float64)) @ v.T
    x, inputs = random_stats(n, seed=1)
    _, outputs = output_stats(m, seed=2)
    dec = METHODS.create("sparse-dictionary").decompose(weight, inputs, breakeven_rank(m, n), outputs=outputs)
    wins = [o for o in dec.sparse_options if o.cost <= dec.max_rank * (m + n) and o.error < float(dec.errors[o.cost // (m + n)])]
    assert wins


@pytest.mark.parametrize("max_work", [1.0, 0.6, None])
def test_sparse_dictionary_options_do_no_more_multiply_adds_than_allowed(max_work):
    """A many-token forward of S U runs k (m + n) multiply-adds per token (the mixing expanded), dense m n."""
    m, n = 60, 24
    method = METHODS.create("sparse-dictionary", {"max_work": max_work, "atom_step": 1})
    weight, inputs, outputs, _, _, _ = problem_and_reference(method, m, n)
    ranks = [o.rank for o in method.decompose(weight, inputs, 5, outputs=outputs).sparse_options]
    assert ranks
    if max_work is None:
        assert max(ranks) > m * n / (m + n)  # the byte budget alone lets k pass the break-even rank here
    else:
        assert all(k * (m + n) <= max_work * m * n for k in ranks)
        assert max(ranks) == int(max_work * m * n / (m + n))  # the cap binds for the small savings


def test_sparse_dictionary_max_work_must_be_positive():
    with pytest.raises(ConfigError, match="max_work"):
        METHODS.create("sparse-dictionary", {"max_work": 0})


def test_atom_step_makes_every_atom_count_its_multiple_and_the_largest_that_fits():
    """With atom_step q (8 by default) every option's k is a multiple of q: the largest one whose bytes fit the option's budget
    (checked against the unconstrained options: each rounded down, never more atoms than the budget allows)."""
    m, n = 72, 40
    free = METHODS.create("sparse-dictionary", {"reselect": 0, "atom_step": 1})
    stepped = METHODS.create("sparse-dictionary", {"reselect": 0, "atom_step": 8})
    weight, inputs, outputs, _, _, _ = problem_and_reference(free, m, n)
    free_ranks = sorted(o.rank for o in free.decompose(weight, inputs, 5, outputs=outputs).sparse_options)
    stepped_options = stepped.decompose(weight, inputs, 5, outputs=outputs).sparse_options
    stepped_ranks = sorted(o.rank for o in stepped_options)
    assert stepped_ranks and all(k % 8 == 0 for k in stepped_ranks)
    assert {k // 8 * 8 for k in free_ranks} >= set(stepped_ranks)
    with pytest.raises(ConfigError, match="atom_step"):
        METHODS.create("sparse-dictionary", {"atom_step": 0})


def test_group_top_mask_keeps_the_largest_of_each_group_as_sorting_does():
    values = torch.randn(6, 16, generator=torch.Generator().manual_seed(3))
    for kept, size in [(2, 4), (1, 4), (3, 8)]:
        mask = group_top_mask(values, kept, size)
        for i in range(values.shape[0]):
            for start in range(0, values.shape[1], size):
                group = values[i, start : start + size].abs().tolist()
                largest = sorted(range(size), key=lambda j: -group[j])[:kept]
                assert sorted(mask[i, start : start + size].nonzero().flatten().tolist()) == sorted(largest)


def test_a_pattern_makes_every_fit_semi_structured_with_the_weighted_error():
    """pattern 2:4: every option offers k a multiple of 4 and s = k / 2; the built mixing keeps at most 2 of each
    4 consecutive atoms in every row (exactly 2 of its stored entries), and the option's error is the fit's."""
    m, n = 48, 40
    method = METHODS.create("sparse-dictionary", {"ridge": 0.0, "pattern": "2:4", "reselect_options": "all"})
    weight, inputs, outputs, problem, a, g = problem_and_reference(method, m, n)
    options = method.decompose(weight, inputs, breakeven_rank(m, n), outputs=outputs).sparse_options
    assert options
    for option in options:
        assert option.rank % 4 == 0 and option.nnz == m * option.rank // 2
        factors = method.sparse_layer(problem, option)
        groups = (factors["mixing"] != 0).reshape(m, option.rank // 4, 4).sum(2)
        assert (groups <= 2).all() and int(groups.sum()) == option.nnz
        assert option.error == pytest.approx(loss_error(a, g, weight - factors["mixing"] @ factors["atoms"]), rel=1e-3)


@pytest.mark.parametrize("options, match", [
    ({"pattern": "4:2"}, "pattern"), ({"pattern": "2-4"}, "pattern"), ({"pattern": "2:4", "atom_step": 6}, "atom_step"),
    ({"pattern": "2:4", "sparsity_levels": [1.5]}, "sparsity_levels"),
])
def test_a_pattern_refuses_what_it_cannot_make(options, match):
    with pytest.raises(ConfigError, match=match):
        METHODS.create("sparse-dictionary", options)
