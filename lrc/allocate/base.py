"""The allocator interface: pick a rank (or dense) for every targeted matrix under a parameter budget.

Parameter accounting: a dense m x n matrix stores m n weights; rank r stores r (m + n). The budget B is
the fraction of the targeted matrices' weights to remove, so the allocation must store at most
(1 - B) Σ m n. Biases are kept as they are and are not part of the targeted count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..registry import Registry

DENSE = 0
"""Rank value that means "keep this matrix dense"."""


@dataclass
class MatrixCandidates:
    """One targeted matrix as the allocator sees it.

    errors: (min(m, n) + 1,) errors[r] = error of rank r, on the method's scale.
    max_rank: highest rank that still saves parameters; ranks 1..max_rank (or dense) are the options.
    min_rank: lowest rank allowed (from a minimum kept fraction).
    keep_dense: the user asked for this matrix to stay dense.
    group: matrix type (e.g. "self_attn.q_proj") for allocators that tie ranks within a type.
    """

    name: str
    shape: tuple[int, int]
    errors: torch.Tensor
    max_rank: int
    min_rank: int = 1
    keep_dense: bool = False
    group: str = ""

    @property
    def dense_params(self) -> int:
        return self.shape[0] * self.shape[1]

    def params(self, rank: int) -> int:
        return self.dense_params if rank == DENSE else rank * (self.shape[0] + self.shape[1])


class Allocator:
    """Base class: `allocate` returns {matrix name: rank, or DENSE}."""

    name: ClassVar[str]

    def allocate(self, matrices: list[MatrixCandidates], budget: float) -> dict[str, int]:
        raise NotImplementedError


ALLOCATORS: Registry[Allocator] = Registry("allocator")


def allowed_params(matrices: list[MatrixCandidates], budget: float) -> int:
    """Parameters the allocation may store: floor((1 - budget) · Σ m n)."""
    return int((1.0 - budget) * sum(m.dense_params for m in matrices))


def stored_params(matrices: list[MatrixCandidates], ranks: dict[str, int]) -> int:
    return sum(m.params(ranks[m.name]) for m in matrices)
