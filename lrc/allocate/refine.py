"""Final fits only where the allocation lands: sparse options refined next to each matrix's choice.

A method may offer sparse options with the error of a first fit (`SparseOption.refined` False), an upper
bound on the error of its final fit, which costs several times more (sparse-dictionary's reselect rounds;
the layer built for a chosen option is always the final fit). After an allocation, each matrix's
unrefined options next to its choice are refined: by cost, the chosen option and its neighbours on either
side (the method's `refine_neighbours`, 1 or 0), or for a plain rank or dense the options just below
and just above the choice's cost. Their errors
are replaced in the analysis (kept for later budgets) and the allocation is made again, until every
choice lands among refined options (at most `passes` times).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import CompressionConfig
from ..device import resolve_device
from ..distributed import merged_over_ranks, pack_jobs, world
from ..factorize import METHODS, SparseOption
from ..model.targets import target_linears
from ..progress import Progress, no_progress
from .base import Allocator, Choice, MatrixCandidates

if TYPE_CHECKING:
    from ..engine import Analysis
    from ..model.projection import Projection
    from ..stats.types import CalibrationStats

Allocation = tuple[list[MatrixCandidates], Mapping[str, Choice]]
ProblemGroups = Callable[[list[str]], Iterator[tuple["dict[str, Projection]", "CalibrationStats"]]]
"""Matrix names -> their weights and statistics, one group at a time (the whole model in memory; one decoder
block at a time when streamed, see lrc.stream.pipeline): what refining needs of the matrices it refits."""
KeepFit = Callable[[str, SparseOption, dict[str, torch.Tensor], "Projection"], None]
"""(matrix name, option, the method's factors for it, the matrix): a refit of a matrix's current choice, handed
to the caller (lrc.engine.build.KeptLayers) so that the layer it builds if the choice stands is not fitted again."""


def model_problems(model: nn.Module, stats: CalibrationStats, config: CompressionConfig) -> ProblemGroups:
    """Every matrix of a model held in memory, in one group."""
    targets = target_linears(model, config.exclude)

    def groups(names: list[str]) -> Iterator[tuple[dict[str, Projection], CalibrationStats]]:
        yield targets, stats

    return groups


def near_choice(candidate: MatrixCandidates, choice: Choice, neighbours: int = 1) -> list[SparseOption]:
    """The unrefined sparse options next to `choice` by cost (see the module docstring)."""
    options = sorted(candidate.sparse, key=lambda o: (o.cost, o.rank))
    if isinstance(choice, SparseOption):
        at = next(i for i, o in enumerate(options) if o.key == choice.key)
        near = options[max(0, at - neighbours) : at + neighbours + 1]
    else:
        above = bisect.bisect_right([o.cost for o in options], candidate.params(choice))
        near = options[max(0, above - 1) : above + 1]
    return [o for o in near if not o.refined]


def refit_cost(shape: tuple[int, int], options: list[SparseOption]) -> float:
    """A refit's relative cost, to share them out between ranks: m · n · k summed over the options (its
    rounds' products are m x n by n x k)."""
    return float(shape[0] * shape[1] * sum(o.rank for o in options))


def refine_near_choices(
    problems: ProblemGroups,
    analysis: Analysis,
    config: CompressionConfig,
    allocator: Allocator,
    allocation: Allocation,
    passes: int = 6,
    progress: Progress = no_progress,
    keep: KeepFit | None = None,
) -> Allocation:
    """Refine the options next to every choice (in `analysis`, in place) and allocate again, up to `passes` times.

    problems: the refitted matrices' weights and statistics (model_problems for a model in memory).
    progress: (phase, matrices refitted, matrices to refit) per pass, the phase "refine" and then
    "refine, pass 2", ... (a refit of a wide matrix takes seconds to minutes).
    Under torch.distributed each rank refits a share of the matrices (bin-packed by `refit_cost`) and
    every rank takes all the refits: the allocations made again are the same on every rank.
    keep: given the factors of each refitted matrix's current choice (on the rank that refitted it; the
    last refit of a matrix replaces its earlier ones).

    The time spent is added to analysis.timing["refine_s"].
    """
    from .candidates import build_candidates

    start = time.perf_counter()
    method = METHODS.create(config.method, config.method_options)
    device = resolve_device(config.device)
    rank, size = world()
    for number in range(1, passes + 1):
        candidates, choices = allocation
        todo = {c.name: near for c in candidates if (near := near_choice(c, choices[c.name], method.refine_neighbours))}
        if not todo:
            break
        costs = [(c.name, refit_cost(c.shape, todo[c.name])) for c in candidates if c.name in todo]
        share = set(pack_jobs(costs, size)[rank])
        mine = [name for name in todo if name in share]  # in model order: q/k/v, gate/up share a weighting
        phase, done = "refine" if number == 1 else f"refine, pass {number}", 0
        progress(phase, done, len(mine))
        refitted: dict[str, list[SparseOption]] = {}
        for targets, stats in problems(mine):
            in_weights = {}
            for name in [n for n in mine if n in targets]:
                options = todo[name]
                owner = stats.shares.get(name, name)
                inputs = stats.inputs[owner].to(device)
                if owner not in in_weights:  # one weighting per shared input (q/k/v, gate/up), as in the jobs
                    in_weights = {owner: method.in_weighting(inputs)}
                outputs = stats.outputs[name].to(device) if name in stats.outputs else None
                problem = method.weighted_problem(targets[name].weight.detach().to(device), inputs, name,
                                                  in_weights[owner], outputs)
                keys = {o.key for o in options}
                originals = [o for o in analysis.decompositions[name].sparse_options if o.key in keys]
                pairs = method.refine_options(problem, originals)  # errors unscaled, as the originals'
                refitted[name] = [option for option, _ in pairs]
                chosen = choices[name]
                if keep is not None and isinstance(chosen, SparseOption):
                    for option, factors in pairs:
                        if factors is not None and option.key == chosen.key:
                            keep(name, option, factors, targets[name])
                done += 1
                progress(phase, done, len(mine))
        for name, options in merged_over_ranks(refitted).items():  # every rank's refits, on every rank
            dec = analysis.decompositions[name]
            refined = {o.key: o for o in options}
            dec.sparse_options = [refined.get(o.key, o) for o in dec.sparse_options]
        candidates = build_candidates(analysis, config)
        allocation = candidates, allocator.allocate(candidates, config.budget)
    analysis.timing["refine_s"] = analysis.timing.get("refine_s", 0.0) + time.perf_counter() - start
    return allocation
