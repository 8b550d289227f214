"""Gradient-weighted methods: FWSVD (Fisher row weights) and lrc's loss-aware SVD (both sides weighted)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError, NumericalError
from .base import FactorizationMethod, InputStats, OutputStats, Weighting
from .registry import METHODS
from .whitening import check_damping, cholesky_whitener


def _require(stats: OutputStats | None, method: str) -> OutputStats:
    if stats is None:
        raise NumericalError(f"method {method} needs output-gradient statistics, none were collected")
    return stats


@METHODS.register("fwsvd")
@dataclass
class FisherWeightedSVD(FactorizationMethod):
    """FWSVD: SVD of diag(√d) W, d = row sums of the empirical Fisher of W (Hsu et al. 2022)."""

    needs_gradients = True

    def out_weighting(self, stats: OutputStats | None) -> Weighting:
        d = _require(stats, "fwsvd").fisher_rows.to(torch.float64)
        root = d.clamp_min(1e-12 * float(d.max().clamp_min(1e-30))).sqrt()
        return root, 1.0 / root


@METHODS.register("loss-aware")
@dataclass
class LossAwareSVD(FactorizationMethod):
    """SVD of A^½ W L, A = E[g gᵀ] (output gradients), L Lᵀ = E[x xᵀ]: dropped σ² ∝ loss increase.

    With the Kronecker-factored (K-FAC) Fisher, the second-order loss increase of a change ΔW is
    proportional to ||A^½ ΔW L||_F², with one constant for every matrix of the model, so a global
    allocator compares the errors of different matrices directly. output: "full" uses A where the output dimension is at most
    the collection's full_max (else falls back to its diagonal); "diag" always uses diag(A).
    """

    errors_comparable = True
    needs_gradients = True
    damping: float = 1e-6
    output: str = "full"
    output_damping: float = 1e-6

    def __post_init__(self) -> None:
        if self.output not in ("full", "diag"):
            raise ConfigError(f"loss-aware output must be 'full' or 'diag', got {self.output!r}")
        check_damping(self.damping)
        check_damping(self.output_damping, "output_damping")

    def in_weighting(self, stats: InputStats) -> Weighting:
        return cholesky_whitener(stats.gram / max(stats.tokens, 1), self.damping)

    def out_weighting(self, stats: OutputStats | None) -> Weighting:
        """P_out = Rᵀ with R Rᵀ = A (Cholesky): ||Rᵀ ΔW L||_F = ||A^½ ΔW L||_F, at a fraction of eigh's cost."""
        out = _require(stats, "loss-aware")
        tokens = max(out.tokens, 1)
        if self.output == "full" and out.gram is not None:
            chol, chol_inv = cholesky_whitener(out.gram / tokens, self.output_damping)
            return chol.T, chol_inv.T
        d = out.diag.to(torch.float64) / tokens
        root = d.clamp_min(self.output_damping * float(d.mean().clamp_min(1e-30))).sqrt()
        return root, 1.0 / root
