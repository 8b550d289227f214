"""Energy allocation: one global threshold on each matrix's singular-value spectrum, searched to meet the budget.

mode "welore" (WeLore 2024, data-free shape): normalise each matrix's singular values to
s_i = (σ_i - σ_min) / (σ_max - σ_min) and keep the ranks with s_i >= τ.
mode "fraction" (the classic form): keep the smallest r whose retained energy Σ_{i<r} σ_i² is at least
e · Σ σ_i², i.e. relative error errors[r] / errors[0] <= 1 - e.
A matrix whose kept rank would not save parameters (above its break-even rank) stays dense. The global
threshold is found by bisection: the least-destructive threshold whose allocation fits the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import ALLOCATORS, DENSE, Allocator, MatrixCandidates, allowed_params, stored_params


def _kept_rank_welore(m: MatrixCandidates, tau: float) -> int:
    sq = (m.errors[:-1] - m.errors[1:]).clamp_min(0)
    sigma = sq.sqrt()
    span = float(sigma.max() - sigma.min())
    normalised = (sigma - sigma.min()) / span if span > 0 else torch.ones_like(sigma)
    return int((normalised >= tau).sum())


def _kept_rank_fraction(m: MatrixCandidates, energy: float) -> int:
    total = float(m.errors[0])
    if total <= 0:
        return 1
    relative = m.errors / total
    ok = (relative <= 1.0 - energy + 1e-12).nonzero()
    return int(ok[0]) if ok.numel() else len(relative) - 1


@ALLOCATORS.register("energy")
@dataclass
class EnergyAllocator(Allocator):
    """One global spectral threshold (WeLore-normalised σ, or retained-energy fraction), bisected to the budget."""

    mode: str = "welore"

    def __post_init__(self) -> None:
        if self.mode not in ("welore", "fraction"):
            raise ConfigError(f"energy mode must be 'welore' or 'fraction', got {self.mode!r}")

    def _ranks(self, matrices: list[MatrixCandidates], level: float) -> dict[str, int]:
        ranks = {}
        for m in matrices:
            if m.keep_dense:
                ranks[m.name] = DENSE
                continue
            if self.mode == "welore":  # higher tau keeps fewer ranks
                kept = _kept_rank_welore(m, level)
            else:  # higher level keeps more energy; invert so that higher level = fewer ranks
                kept = _kept_rank_fraction(m, 1.0 - level)
            kept = max(kept, m.min_rank, 1)
            ranks[m.name] = DENSE if kept > m.max_rank else kept
        return ranks

    def allocate(self, matrices: list[MatrixCandidates], budget: float) -> dict[str, int]:
        allowed = allowed_params(matrices, budget)
        lo, hi = 0.0, 1.0  # level 1 keeps the fewest ranks
        if stored_params(matrices, self._ranks(matrices, hi)) > allowed:
            raise ConfigError(f"budget {budget} cannot be met by the energy allocator with these constraints")
        for _ in range(50):
            mid = (lo + hi) / 2
            if stored_params(matrices, self._ranks(matrices, mid)) <= allowed:
                hi = mid
            else:
                lo = mid
        return self._ranks(matrices, hi)
