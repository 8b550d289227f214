"""The error-versus-size curve an allocator trades on, kept in the report for `lrc report --plot`.

For kept fractions k of the targeted parameters (k = 1 - budget) on a grid, the summed error
Σ_matrices error(choice) of what the allocator picks within k · Σ m n, on the scale it allocated on (the
method's weighted squared error, or relative errors for methods whose errors do not compare across
matrices). The knapsack gives the exact least error at every k from one DP over the full capacity
(KnapsackAllocator.least_errors); any other allocator is run at each budget of the grid, and its point
sits at the fraction it really kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from ..factorize.base import SparseOption
from .base import DENSE, Allocator, Choice, MatrixCandidates, stored_params

KEPT_GRID = [round(0.05 * i, 2) for i in range(1, 21)]
"""0.05, 0.10, ..., 1.0: twenty points of kept fraction."""


def choice_error(matrix: MatrixCandidates, choice: Choice) -> float:
    """The allocator's error of one choice: errors[rank], the sparse option's error, 0 for dense."""
    if isinstance(choice, SparseOption):
        return choice.error
    return 0.0 if choice == DENSE else float(matrix.errors[choice])


def allocation_curve(
    allocator: Allocator,
    matrices: list[MatrixCandidates],
    choices: Mapping[str, Choice],
    grid: list[float] = KEPT_GRID,
) -> dict[str, Any]:
    """{kept_fraction: [...], error: [...], chosen: {kept_fraction, error}}; `choices` is the run's allocation.

    error[i] is None where nothing fits within kept_fraction[i]; numbers are rounded to 6 significant digits.
    """
    total = sum(m.dense_params for m in matrices)
    least_errors = getattr(allocator, "least_errors", None)
    kept: list[float] = []
    errors: list[float | None] = []
    if least_errors is not None:
        kept, errors = list(grid), least_errors(matrices, list(grid))
    else:
        for k in grid:
            if not 0 < k < 1:
                continue
            try:
                picked = allocator.allocate(matrices, 1 - k)
            except ConfigError:
                kept.append(k)
                errors.append(None)
                continue
            kept.append(stored_params(matrices, picked) / total)
            errors.append(sum(choice_error(m, picked[m.name]) for m in matrices))
    chosen_error = sum(choice_error(m, choices[m.name]) for m in matrices)
    return {
        "kept_fraction": [round(k, 4) for k in kept],
        "error": [None if e is None else _round(e) for e in errors],
        "chosen": {"kept_fraction": round(stored_params(matrices, choices) / total, 4), "error": _round(chosen_error)},
    }


def _round(value: float) -> float:
    return float(f"{value:.6g}")
