"""SVD-LLM V2's heuristic: within each matrix type, compress matrices with larger truncation loss less."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError
from .base import ALLOCATORS, DENSE, Allocator, MatrixCandidates


@ALLOCATORS.register("svd-llm-v2")
@dataclass
class LogLossAllocator(Allocator):
    """Per matrix type, ratio c_i ∝ 1 / log(L_i), L_i = truncation loss at the uniform ratio (SVD-LLM V2).

    L_i is rescaled by the smallest loss of its type (times e) before the log, so every weight is in (0, 1]
    whatever the loss units; the type as a whole still removes the budget's fraction of its parameters.
    """

    def allocate(self, matrices: list[MatrixCandidates], budget: float) -> dict[str, int]:
        ranks = {m.name: DENSE for m in matrices}
        groups: dict[str, list[MatrixCandidates]] = {}
        for m in matrices:
            if not m.keep_dense:
                groups.setdefault(m.group, []).append(m)
        if not groups:
            raise ConfigError("every targeted matrix is marked keep-dense: nothing left to compress")
        total = sum(m.dense_params for m in matrices)
        free = sum(m.dense_params for ms in groups.values() for m in ms)
        ratio = budget * total / free
        for members in groups.values():
            losses = []
            for m in members:
                r = max(1, math.floor((1 - ratio) * m.dense_params / sum(m.shape)))
                losses.append(max(float(m.errors[min(r, len(m.errors) - 1)]), 1e-30))
            smallest = min(losses)
            weights = [1.0 / math.log(math.e * loss / smallest) for loss in losses]
            group_params = sum(m.dense_params for m in members)
            scale = ratio * group_params / sum(w * m.dense_params for w, m in zip(weights, members))
            for w, m in zip(weights, members):
                c = min(0.99, w * scale)
                rank = math.floor((1 - c) * m.dense_params / sum(m.shape))
                ranks[m.name] = min(max(rank, m.min_rank, 1), m.max_rank)
        return ranks
