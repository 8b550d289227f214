"""Sparse options refined next to the allocator's choices: the final fits where they matter, the same errors."""

from __future__ import annotations

import pytest

import lrc
from lrc.allocate import allocate_ranks
from lrc.engine import decompose_all
from lrc.factorize import SparseOption
from lrc.sources import load_model
from lrc.stats.collect import collect_statistics


def decomposed(llama_dir, calib_file, reselect_options):
    config = lrc.CompressionConfig(calib=str(calib_file), samples=4, seq_len=32, batch_size=2, budget=0.3,
                                   method_options={"reselect_options": reselect_options})
    loaded = load_model(str(llama_dir))
    return loaded, config, decompose_all(loaded, config, collect_statistics(loaded, config))


@pytest.mark.parametrize("scope", ["near-choice", "chosen"])
def test_choices_land_on_refined_options_with_the_errors_of_refining_all(llama_dir, calib_file, scope):
    loaded, config, analysis = decomposed(llama_dir, calib_file, scope)
    first = {name: list(dec.sparse_options) for name, dec in analysis.decompositions.items()}
    assert not any(o.refined for options in first.values() for o in options)
    candidates, choices = allocate_ranks(analysis, config)  # without the model: nothing refined
    assert not any(o.refined for dec in analysis.decompositions.values() for o in dec.sparse_options)

    reports = []
    candidates, choices = allocate_ranks(analysis, config, loaded.model, progress=lambda *r: reports.append(r))
    chosen = [c for c in choices.values() if isinstance(c, SparseOption)]
    assert chosen and all(c.refined for c in chosen)
    refined = [o for dec in analysis.decompositions.values() for o in dec.sparse_options if o.refined]
    total = sum(len(options) for options in first.values())
    assert len(refined) < total  # only the neighbourhoods of the choices
    # each pass counts the matrices it refits from 0 to all of them; together they refit every refined matrix
    passes = list(dict.fromkeys(phase for phase, _, _ in reports))
    assert passes[0] == "refine" and passes[1:] == [f"refine, pass {k}" for k in range(2, len(passes) + 1)]
    for phase in passes:
        counts = [(done, of) for p, done, of in reports if p == phase]
        assert counts == [(done, counts[0][1]) for done in range(counts[0][1] + 1)]
    refitted = {name for name, dec in analysis.decompositions.items() if any(o.refined for o in dec.sparse_options)}
    assert 0 < reports[0][2] <= len(refitted)
    assert analysis.timing["refine_s"] > 0

    _, _, every = decomposed(llama_dir, calib_file, "all")
    for name, dec in analysis.decompositions.items():
        expected = {(o.rank, o.nnz): o.error for o in every.decompositions[name].sparse_options}
        for option, before in zip(dec.sparse_options, first[name]):
            if option.refined:
                assert option.error == pytest.approx(expected[(option.rank, option.nnz)], rel=1e-9)
                assert option.error <= before.error
            else:
                assert option == before
    # with every option refined the knapsack may do better, never worse than the upper bounds allow
    _, best = allocate_ranks(every, config)

    def total_error(analysis, picks):
        errors = {c.name: c for c in candidates}
        return sum(p.error if isinstance(p, SparseOption) else float(errors[n].errors[p]) if p else 0.0
                   for n, p in picks.items())

    assert total_error(every, best) <= total_error(analysis, choices) * (1 + 1e-9)

