"""Uniform allocation: every compressible matrix loses the same fraction c of its parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError
from .base import ALLOCATORS, DENSE, Allocator, MatrixCandidates


@ALLOCATORS.register("uniform")
@dataclass
class UniformAllocator(Allocator):
    """rank = floor((1 - c) m n / (m + n)) for each matrix, with c = B · Σ_all m n / Σ_compressible m n.

    c equals the budget B unless some matrices must stay dense; then the others give up more so that the
    targeted total still loses at least B.
    """

    def allocate(self, matrices: list[MatrixCandidates], budget: float) -> dict[str, int]:
        total = sum(m.dense_params for m in matrices)
        free = [m for m in matrices if not m.keep_dense]
        free_total = sum(m.dense_params for m in free)
        if not free:
            raise ConfigError("every targeted matrix is marked keep-dense: nothing left to compress")
        ratio = budget * total / free_total
        if ratio >= 1.0:
            raise ConfigError(
                f"budget {budget} cannot be met: the matrices allowed to shrink hold only "
                f"{free_total / total:.1%} of the targeted parameters"
            )
        ranks = {m.name: DENSE for m in matrices}
        for m in free:
            rank = math.floor((1.0 - ratio) * m.dense_params / (m.shape[0] + m.shape[1]))
            ranks[m.name] = min(max(rank, m.min_rank, 1), m.max_rank) if m.max_rank >= 1 else DENSE
        return ranks
