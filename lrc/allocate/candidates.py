"""From decompositions to the allocator's view: one `MatrixCandidates` per targeted matrix, then a choice each."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import nn

from ..config import DEFAULT_EXCLUDE, CompressionConfig
from ..errors import ConfigError
from ..model.targets import matrix_type
from ..progress import Progress, no_progress
from .base import ALLOCATORS, Allocator, Choice, MatrixCandidates

if TYPE_CHECKING:
    from ..engine import Analysis
    from .refine import KeepFit, ProblemGroups


def compile_patterns(patterns: list[str], what: str) -> list[re.Pattern[str]]:
    """The regexes of a config field (keep_dense, exclude); a bad one is a ConfigError naming the field."""
    try:
        return [re.compile(p) for p in patterns]
    except re.error as exc:
        raise ConfigError(f"bad regex in {what}: {exc}") from None


def check_patterns_match(model: nn.Module, config: CompressionConfig) -> None:
    """Before any statistics: ConfigError for a keep_dense regex that matches no targeted matrix, or an exclude
    regex that matches no module (the default's lm_head pattern aside: encoders have none): a misspelt name
    would otherwise be ignored, and the layers it was meant to keep compressed."""
    from ..model.targets import target_linears

    targets = list(target_linears(model, config.exclude))
    for pattern in compile_patterns(config.keep_dense, "keep_dense"):
        if not any(pattern.search(name) for name in targets):
            raise ConfigError(f"keep_dense pattern {pattern.pattern!r} matches no targeted layer (they are named like "
                              f"{targets[0]}); correct it or leave it out")
    modules = [name for name, _ in model.named_modules()]
    for pattern in compile_patterns([p for p in config.exclude if p not in DEFAULT_EXCLUDE], "exclude"):
        if not any(pattern.search(name) for name in modules):
            raise ConfigError(f"exclude pattern {pattern.pattern!r} matches no module of the model (its layers are "
                              f"named like {targets[0]}); correct it or leave it out")


def check_budget_reachable(model: nn.Module, config: CompressionConfig) -> None:
    """Before any statistics: raise ConfigError when keep_dense and min_kept leave less than the budget to
    remove, counting parameters: the matrices kept dense keep all m·n, every other at least min_kept·m·n (no
    option keeps less). A necessary condition only (the allocator may still find the budget out of reach with
    the ranks it can choose), checked for the disk objective, the one that counts parameters."""
    from ..model.targets import target_linears

    if config.objective != "disk":
        return
    keep_dense = compile_patterns(config.keep_dense, "keep_dense")
    total = kept = 0.0
    for name, projection in target_linears(model, config.exclude).items():
        size = projection.out_features * projection.in_features
        total += size
        kept += size if any(p.search(name) for p in keep_dense) else config.min_kept * size
    if total and kept > (1 - config.budget) * total:
        raise ConfigError(
            f"the budget cannot be met under these constraints: keep_dense and min_kept keep at least "
            f"{kept / total:.1%} of the targeted parameters, so at most {1 - kept / total:.1%} can be removed, "
            f"not {config.budget:.1%}; lower --budget or relax them"
        )


def build_candidates(analysis: Analysis, config: CompressionConfig) -> list[MatrixCandidates]:
    """Every decomposed matrix with its error curve, rank range, sparse options and constraints, in model order.

    Errors are raw where the method's scale is shared by all matrices (loss units), else relative to each
    matrix's total; sparse options are rescaled the same way and dropped below config.min_kept.
    """
    keep_dense = compile_patterns(config.keep_dense, "keep_dense")
    candidates = []
    for name, dec in analysis.decompositions.items():
        m, n = dec.up_full.shape[0], dec.down_full.shape[1]
        min_rank = max(1, math.ceil(config.min_kept * m * n / (m + n)))
        scale = 1.0 if analysis.errors_comparable or float(dec.errors[0]) <= 0 else 1.0 / float(dec.errors[0])
        sparse = [dataclasses.replace(o, error=o.error * scale) for o in dec.sparse_options if o.cost >= config.min_kept * m * n]
        candidates.append(
            MatrixCandidates(
                name=name,
                shape=(m, n),
                errors=dec.errors if analysis.errors_comparable else dec.relative_errors(),
                max_rank=dec.max_rank,
                min_rank=min_rank,
                keep_dense=min_rank > dec.max_rank or any(p.search(name) for p in keep_dense),
                group=matrix_type(name),
                sparse=sparse,
            )
        )
    return candidates


def allocate_ranks(
    analysis: Analysis, config: CompressionConfig, model: nn.Module | None = None,
    problems: ProblemGroups | None = None, allocator: Allocator | None = None,
    progress: Progress = no_progress, keep: KeepFit | None = None,
) -> tuple[list[MatrixCandidates], Mapping[str, Choice]]:
    """The allocator's choice of a rank, DENSE or a sparse option for every targeted matrix under config.budget,
    the options priced by config.objective (see lrc.allocate.objective).

    model: the model the analysis decomposed (or `problems`, its weights and statistics group by group); with
    it, sparse options next to the choices that carry a first fit's error are refined and the allocation made
    again (lrc.allocate.refine). allocator: config's allocator made by the caller, to read its pricing after
    (see objective.predicted_cost); else one is made here. progress: measuring layer costs, refining.
    keep: handed the refits of the choices (see lrc.allocate.refine), for the layers to be built from.
    """
    from .knapsack import KnapsackAllocator
    from .objective import price_for
    from .refine import model_problems, refine_near_choices

    allocator = allocator or ALLOCATORS.create(config.allocator, config.allocator_options)
    candidates = build_candidates(analysis, config)
    if isinstance(allocator, KnapsackAllocator):  # the other allocators count parameters (config.validate)
        # by layer shape: refining keeps it
        pricing = price_for(config, candidates, allocator.rank_step, model, progress)
        if pricing is not None:
            allocator.price, allocator.outside = pricing.price, pricing.outside
    allocation = candidates, allocator.allocate(candidates, config.budget)
    if problems is None and model is not None:
        problems = model_problems(model, analysis.stats, config)
    if problems is None:
        return allocation
    return refine_near_choices(problems, analysis, config, allocator, allocation, progress=progress, keep=keep)
