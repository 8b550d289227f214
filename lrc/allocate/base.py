"""The allocator interface: pick a rank (or dense) for every targeted matrix under a parameter budget.

Parameter accounting: a dense m x n matrix stores m n weights; rank r stores r (m + n); a sparse option
(from a sparse-plus-low-rank method) costs its real bytes, values and indices or bitmask, expressed in
parameter-equivalents at the value dtype (⌈bytes / value bytes⌉). The budget B is the fraction of the
targeted matrices' weights (equivalently, bytes) to remove, so the allocation must store at most
(1 - B) Σ m n. Biases are kept as they are and are not part of the targeted count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..factorize.base import SparseOption
from ..registry import Registry

DENSE = 0
"""Rank value that means "keep this matrix dense"."""

Choice = int | SparseOption
"""What an allocator picks for one matrix: a rank, DENSE, or one of the matrix's sparse options."""


@dataclass
class MatrixCandidates:
    """One targeted matrix as the allocator sees it.

    errors: (min(m, n) + 1,) errors[r] = error of rank r, on the method's scale.
    max_rank: highest rank that still saves parameters; ranks 1..max_rank (or dense) are the options.
    min_rank: lowest rank allowed (from a minimum kept fraction).
    keep_dense: the user asked for this matrix to stay dense.
    group: matrix type (e.g. "self_attn.q_proj") for allocators that tie ranks within a type.
    sparse: sparse-plus-low-rank options (error on the same scale as `errors`); only the knapsack uses them.
    """

    name: str
    shape: tuple[int, int]
    errors: torch.Tensor
    max_rank: int
    min_rank: int = 1
    keep_dense: bool = False
    group: str = ""
    sparse: list[SparseOption] = field(default_factory=list)

    @property
    def dense_params(self) -> int:
        return self.shape[0] * self.shape[1]

    def params(self, choice: Choice) -> int:
        """Cost of a choice in parameter-equivalents."""
        if isinstance(choice, SparseOption):
            return choice.cost
        return self.dense_params if choice == DENSE else choice * (self.shape[0] + self.shape[1])


class Allocator:
    """Base class: `allocate` returns {matrix name: rank, DENSE, or a sparse option}."""

    name: ClassVar[str]

    def allocate(self, matrices: list[MatrixCandidates], budget: float) -> Mapping[str, Choice]:
        raise NotImplementedError


ALLOCATORS: Registry[Allocator] = Registry("allocator")


def allowed_params(matrices: list[MatrixCandidates], budget: float) -> int:
    """Parameters the allocation may store: floor((1 - budget) · Σ m n)."""
    return int((1.0 - budget) * sum(m.dense_params for m in matrices))


def stored_params(matrices: list[MatrixCandidates], ranks: Mapping[str, Choice]) -> int:
    return sum(m.params(ranks[m.name]) for m in matrices)
