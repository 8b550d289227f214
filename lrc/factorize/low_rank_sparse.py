"""Low rank plus a sparse residual: W ≈ up @ down + R, R holding the residual's most important entries.

In the loss-aware weighted space W̃ = P_out W P_in (see loss_aware):
1. up @ down: the rank-r truncation of W̃, mapped back (as for plain `loss-aware`);
2. R: with A = P_outᵀP_out, G = P_in P_inᵀ and the residual E = W - up @ down, the weighted error of a
   correction R is f(R) = ||P_out (E - R) P_in||_F², whose gradient at R = 0 is -2 A E G. One entry (i, j)
   alone, at its best value F_ij = (A E G)_ij / (a_i g_j) (a = diag A, g = diag G), lowers f by
   F_ij² a_i g_j; R keeps the nnz entries with the largest such gain, with values α F_ij, α = the exact
   line search <Ẽ, R̃> / ||R̃||² over R̃ = P_out R P_in, so f(R) <= f(0) always. (With diagonal weights
   F = E: the published "largest weighted residual entries".)
3. error: f(R), exact, on the same (loss) scale as the plain ranks' dropped σ².
When a chosen option is built, the low-rank part is refitted in closed form to the rank-r truncation of
P_out (W - R) P_in (Eckart-Young), which can only lower the error the allocator saw.
Options: for each ratio c (fraction of the dense bytes removed) and residual share ρ (fraction of the
option's bytes spent on R: values and indices or bitmask), the largest nnz that fits ρ (1 - c) m n value
bytes, and the largest rank that fits the rest; per ratio the share with the least error is offered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..forms.sparse_matrix import best_layout
from .base import SparseOption, WeightedProblem, apply_left, apply_right, best_per_ratio, sparse_option
from .loss_aware import LossAwareSVD
from .registry import METHODS
from .sparse_dictionary import default_ratios

KIND = "low-rank-sparse"


@METHODS.register(KIND)
@dataclass
class LowRankSparse(LossAwareSVD):
    """Loss-aware weighting, then W ≈ up @ down + R with R sparse (unstructured, importance in output space)."""

    offers_sparse = True
    ratios: list[float] = field(default_factory=default_ratios)
    residual_shares: list[float] = field(default_factory=lambda: [0.15, 0.3])

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.ratios or any(not 0 < c < 1 for c in self.ratios):
            raise ConfigError(f"{KIND} ratios must lie in (0, 1), got {self.ratios}")
        if not self.residual_shares or any(not 0 < r < 1 for r in self.residual_shares):
            raise ConfigError(f"{KIND} residual_shares must lie in (0, 1), got {self.residual_shares}")

    def sparse_options(self, problem: WeightedProblem, value_bytes: int) -> list[SparseOption]:
        m, n = problem.weight.shape
        shapes: dict[float, list[tuple[int, int]]] = {}
        for c in self.ratios:
            for share in self.residual_shares:
                budget = int((1 - c) * m * n * value_bytes)
                nnz = entries_within(m, n, int(share * budget), value_bytes)
                rank = (budget - best_layout(m, n, nnz, value_bytes)[1]) // (value_bytes * (m + n))
                if nnz >= 1 and rank >= 1:
                    shapes.setdefault(c, []).append((min(rank, min(m, n)), nnz))
        if not shapes:
            return []
        up, down = problem.low_rank(max(r for pairs in shapes.values() for r, _ in pairs))
        fitted: dict[tuple[int, int], SparseOption] = {}
        for rank, nnz in sorted({pair for pairs in shapes.values() for pair in pairs}):
            _, error = sparse_correction(problem, problem.weight - up[:, :rank] @ down[:rank], nnz)
            fitted[(rank, nnz)] = sparse_option(KIND, rank, nnz, rank * (m + n) * value_bytes, (m, n), value_bytes, error)
        return best_per_ratio(shapes, fitted)

    def sparse_layer(self, problem: WeightedProblem, option: SparseOption) -> dict[str, torch.Tensor]:
        """{"up", "down", "residual"} in the original space; the low rank refitted to W - R."""
        up, down = problem.low_rank(option.rank)
        residual, _ = sparse_correction(problem, problem.weight - up @ down, option.nnz)
        up, down = problem.with_weight(problem.weight - residual).low_rank(option.rank)
        return {"up": up, "down": down, "residual": residual}


def sparse_correction(problem: WeightedProblem, residual: torch.Tensor, nnz: int) -> tuple[torch.Tensor, float]:
    """(R with nnz non-zeros, ||P_out (E - R) P_in||_F²) for the residual E (m x n), as in the module doc."""
    (p_in, _), (p_out, _) = problem.in_weights, problem.out_weights
    weighted = problem.to_weighted(residual)  # Ẽ = P_out E P_in
    gradient = apply_left(_transpose(p_out), apply_right(weighted, _transpose(p_in)))  # A E G
    m, n = residual.shape
    a = _diag_gram(p_out, m, rows=False, like=residual)
    g = _diag_gram(p_in, n, rows=True, like=residual)
    scale = (a[:, None] * g[None, :]).clamp_min(1e-300)
    best = gradient / scale
    keep = (gradient.square() / scale).flatten().topk(nnz).indices
    correction = torch.zeros_like(residual).flatten()
    correction[keep] = best.flatten()[keep]
    correction = correction.view_as(residual)
    weighted_correction = problem.to_weighted(correction)
    norm = float(weighted_correction.square().sum())
    alpha = float((weighted * weighted_correction).sum()) / norm if norm > 0 else 0.0
    error = float((weighted - alpha * weighted_correction).square().sum())
    return alpha * correction, error


def _transpose(p: torch.Tensor | None) -> torch.Tensor | None:
    return p.T if p is not None and p.dim() == 2 else p


def entries_within(m: int, n: int, budget_bytes: int, value_bytes: int) -> int:
    """The most non-zeros of an m x n sparse matrix whose cheaper layout fits `budget_bytes` (0 if none)."""
    low, high = 0, m * n
    while low < high:
        mid = (low + high + 1) // 2
        if best_layout(m, n, mid, value_bytes)[1] <= budget_bytes:
            low = mid
        else:
            high = mid - 1
    return low


def _diag_gram(p: torch.Tensor | None, size: int, rows: bool, like: torch.Tensor) -> torch.Tensor:
    """Squared norms of P's columns (rows=False: ||P e_i||²) or rows (rows=True: ||e_jᵀ P||²)."""
    if p is None:
        return torch.ones(size, dtype=like.dtype, device=like.device)
    if p.dim() == 1:
        return p.square()
    return p.square().sum(1 if rows else 0)
