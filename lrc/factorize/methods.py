"""The published factorization methods (see docs/methods.md): plain SVD, ASVD, SVD-LLM, SVD-LLM V2."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import FactorizationMethod, InputStats
from .registry import METHODS
from .whitening import check_damping, cholesky_whitener, eigen_whitener


@METHODS.register("svd")
@dataclass
class PlainSVD(FactorizationMethod):
    """Truncated SVD of W itself: minimises ||W - W'||_F, blind to the data."""

    weighs_data = False


@METHODS.register("asvd")
@dataclass
class ActivationScaledSVD(FactorizationMethod):
    """ASVD: SVD of W diag(s^α), s = mean |x| per input channel (Yuan et al. 2023)."""

    alpha: float = 0.5

    def in_weighting(self, stats: InputStats) -> tuple[torch.Tensor, torch.Tensor]:
        mean_abs = stats.abs_sum.to(torch.float64) / max(stats.tokens, 1)
        scale = mean_abs.clamp_min(1e-6 * float(mean_abs.max().clamp_min(1e-30))).pow(self.alpha)
        return scale, 1.0 / scale


@METHODS.register("svd-llm")
@dataclass
class CholeskyWhitenedSVD(FactorizationMethod):
    """SVD-LLM: SVD of W L with L Lᵀ = X Xᵀ (+ damping); dropped σ² = squared output error on the data."""

    damping: float = 1e-6

    def __post_init__(self) -> None:
        check_damping(self.damping)

    def in_weighting(self, stats: InputStats) -> tuple[torch.Tensor, torch.Tensor]:
        return cholesky_whitener(stats.gram / max(stats.tokens, 1), self.damping)


@METHODS.register("svd-llm-v2")
@dataclass
class EigenWhitenedSVD(FactorizationMethod):
    """SVD-LLM V2: SVD of W Q Λ^½ from X Xᵀ = Q Λ Qᵀ, eigenvalues floored at `floor` · λ_max."""

    floor: float = 1e-8

    def in_weighting(self, stats: InputStats) -> tuple[torch.Tensor, torch.Tensor]:
        return eigen_whitener(stats.gram / max(stats.tokens, 1), self.floor)
