"""Rank allocators, registered by name in ALLOCATORS (one module each)."""

from . import energy as _energy  # noqa: F401  (each module registers its allocator)
from . import knapsack as _knapsack  # noqa: F401
from . import svd_llm_v2 as _svd_llm_v2  # noqa: F401
from . import uniform as _uniform  # noqa: F401
from .base import ALLOCATORS, DENSE, Allocator, Choice, MatrixCandidates, allowed_params, stored_params
from .candidates import (
    allocate_ranks,
    build_candidates,
    check_budget_reachable,
    check_patterns_match,
    compile_patterns,
)

__all__ = ["ALLOCATORS", "DENSE", "Allocator", "Choice", "MatrixCandidates", "allocate_ranks", "allowed_params", "build_candidates",
           "check_budget_reachable", "check_patterns_match", "compile_patterns", "stored_params"]
