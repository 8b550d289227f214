"""The factorization interface: one weighted SVD per matrix gives the factors and the error of every rank.

Every method decomposes a weighted matrix  W̃ = P_out · W · P_in  (W is m x n, out x in) as  W̃ = U Σ Vᵀ.
A rank-r factorization is  W ≈ up @ down  with  up = P_out⁻¹ U_r Σ_r  (m x r)  and  down = V_rᵀ P_in⁻¹  (r x n),
and its weighted squared error is  || P_out (W - up @ down) P_in ||_F² = Σ_{i>r} σ_i²  (Eckart-Young).
So one decomposition yields the error of every candidate rank, and allocators never decompose again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import NumericalError


@dataclass
class InputStats:
    """Statistics of one linear layer's input, sums over `tokens` calibration tokens.

    gram: Σ_t x_t x_tᵀ (n x n, float64), the input Gram X Xᵀ.
    abs_sum: Σ_t |x_t| (n, float64), for activation-aware scaling.
    """

    gram: torch.Tensor
    abs_sum: torch.Tensor
    tokens: int

    def to(self, device: torch.device | str) -> InputStats:
        return InputStats(self.gram.to(device), self.abs_sum.to(device), self.tokens)


@dataclass
class OutputStats:
    """Statistics of the loss gradient g = ∂loss/∂y at one linear layer's output y, over `tokens` tokens.

    gram: Σ_t g_t g_tᵀ (m x m, float64), or None where only the diagonal is kept (large m).
    diag: Σ_t g_t² (m,), always present.
    fisher_rows: Σ_windows Σ_j (∂loss_w/∂W_ij)² (m,), the row sums of the empirical Fisher (FWSVD).
    """

    gram: torch.Tensor | None
    diag: torch.Tensor
    fisher_rows: torch.Tensor
    tokens: int

    def to(self, device: torch.device | str) -> OutputStats:
        gram = self.gram.to(device) if self.gram is not None else None
        return OutputStats(gram, self.diag.to(device), self.fisher_rows.to(device), self.tokens)


@dataclass(frozen=True)
class SparseOption:
    """A sparse-plus-low-rank way to store one matrix, offered next to the plain ranks.

    kind: the layer family ("sparse-dictionary" or "low-rank-sparse"); rank: atoms k or rank r;
    nnz: stored entries of the sparse factor; layout: its storage layout (see lrc.sparse_matrix);
    bytes: everything the layer stores for the weight (dense factor, values, indices or bitmask) at the
    value dtype; cost: bytes in parameter-equivalents, ⌈bytes / value_bytes⌉, the allocator's unit;
    error: weighted squared error on the method's scale (the same as Decomposition.errors);
    refined: False when `error` is that of a first fit the method can still improve (an upper bound), which
    `refine_options` replaces by the final fit's error (see lrc.allocate.refine).
    """

    kind: str
    rank: int
    nnz: int
    layout: str
    bytes: int
    cost: int
    error: float
    refined: bool = True

    @property
    def key(self) -> tuple[str, int, int]:
        """What makes two options of one matrix the same fit: (kind, rank, nnz)."""
        return self.kind, self.rank, self.nnz

    def describe(self) -> str:
        return f"{self.kind} rank {self.rank}, {self.nnz} sparse entries ({self.layout})"


def best_per_ratio(
    shapes: dict[float, list[tuple[int, int]]], fitted: dict[tuple[int, int], SparseOption]
) -> list[SparseOption]:
    """Per ratio, the option with the least error among that ratio's candidate shapes (each offered once)."""
    offered: list[SparseOption] = []
    for pairs in shapes.values():
        best = min((fitted[p] for p in pairs), key=lambda o: o.error)
        if best not in offered:
            offered.append(best)
    return offered


def sparse_option(kind: str, rank: int, nnz: int, dense_bytes: int, shape: tuple[int, int], value_bytes: int,
                  error: float) -> SparseOption:
    """A SparseOption whose sparse factor (shape rows x cols, nnz entries) takes its cheaper layout."""
    from ..forms.sparse_matrix import best_layout

    layout, sparse_bytes = best_layout(shape[0], shape[1], nnz, value_bytes)
    nbytes = dense_bytes + sparse_bytes
    return SparseOption(kind, rank, nnz, layout, nbytes, -(-nbytes // value_bytes), error)


@dataclass
class Decomposition:
    """Factors of one matrix, kept up to `max_rank`, and the weighted error of every rank.

    up_full: m x max_rank,  down_full: max_rank x n  (rank r uses the first r columns / rows).
    errors: (min(m, n) + 1,) float64, errors[r] = weighted squared error of rank r = Σ_{i>r} σ_i².
    sparse_options: further options from sparse-plus-low-rank methods (empty for pure low rank).
    """

    up_full: torch.Tensor
    down_full: torch.Tensor
    errors: torch.Tensor
    sparse_options: list[SparseOption] = field(default_factory=list)

    @property
    def max_rank(self) -> int:
        return self.up_full.shape[1]

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 < rank <= self.max_rank:
            raise ValueError(f"rank {rank} outside 1..{self.max_rank}")
        return self.up_full[:, :rank].contiguous(), self.down_full[:rank].contiguous()

    def relative_errors(self) -> torch.Tensor:
        """errors / errors[0]: the fraction of the weighted energy each rank loses (0 at full rank)."""
        total = self.errors[0]
        return self.errors / total if total > 0 else torch.zeros_like(self.errors)


Weighting = tuple[torch.Tensor | None, torch.Tensor | None]
"""(P, P⁻¹): a full matrix, a vector (diagonal) or None (identity)."""


def breakeven_rank(m: int, n: int) -> int:
    """Largest rank whose factors r (m + n) still store fewer parameters than the dense m n."""
    return max(0, (m * n - 1) // (m + n))


class FactorizationMethod:
    """Base class: subclasses give the two weightings; `decompose` does the rest.

    `in_weighting` returns (P_in, P_in⁻¹), `out_weighting` (P_out, P_out⁻¹); each may be a full matrix,
    a vector (a diagonal) or None (identity).
    errors_comparable: whether errors are on one scale across matrices (loss units), so a global
    allocator may compare them raw; otherwise allocators use relative errors.
    offers_sparse: whether `sparse_options` offers sparse-plus-low-rank options (only the knapsack uses them).
    weighs_data: whether the factorization depends on the calibration statistics (plain SVD's does not: the
    checks that the calibration determines them do not apply, and more data would not change it).
    """

    name: ClassVar[str]
    errors_comparable: ClassVar[bool] = False
    needs_gradients: ClassVar[bool] = False
    offers_sparse: ClassVar[bool] = False
    weighs_data: ClassVar[bool] = True

    def in_weighting(self, stats: InputStats) -> Weighting:
        return None, None

    def out_weighting(self, stats: OutputStats | None) -> Weighting:
        return None, None

    def weighted_problem(
        self,
        weight: torch.Tensor,
        stats: InputStats,
        module_name: str = "matrix",
        in_weights: Weighting | None = None,
        outputs: OutputStats | None = None,
    ) -> WeightedProblem:
        """W̃ = P_out W P_in in float64 and its singular values / vectors.

        in_weights: a precomputed `in_weighting(stats)`, for linears that share one input (q/k/v, gate/up).
        outputs: output-gradient statistics, for methods with needs_gradients.
        """
        w = weight.to(torch.float64)
        if not torch.isfinite(w).all():
            raise NumericalError(f"weight of {module_name} contains NaN or Inf")
        try:
            p_in, p_in_inv = in_weights if in_weights is not None else self.in_weighting(stats)
            p_out, p_out_inv = self.out_weighting(outputs)
        except NumericalError as exc:
            raise NumericalError(f"{module_name}: {exc}") from None
        weighted = apply_left(p_out, apply_right(w, p_in))
        sq, basis = _singular_pairs(weighted, module_name)
        return WeightedProblem(module_name, w, weighted, (p_in, p_in_inv), (p_out, p_out_inv), sq, basis)

    def decompose(
        self,
        weight: torch.Tensor,
        stats: InputStats,
        max_rank: int,
        module_name: str = "matrix",
        in_weights: Weighting | None = None,
        outputs: OutputStats | None = None,
        value_bytes: int = 4,
    ) -> Decomposition:
        """Weighted SVD of `weight` (m x n), factors kept up to `max_rank`, plus any sparse options.

        value_bytes: bytes per stored value in the output checkpoint (sparse options' byte costs use it).
        """
        problem = self.weighted_problem(weight, stats, module_name, in_weights, outputs)
        # errors[r] = sum_{i >= r} sigma_i^2 (0-based), i.e. what rank r drops
        tail = torch.flip(torch.cumsum(torch.flip(problem.sq, [0]), 0), [0])
        errors = torch.cat([tail, tail.new_zeros(1)])
        up, down = problem.low_rank(max(1, min(max_rank, problem.sq.numel())))
        return Decomposition(
            up.to(torch.float32).cpu(), down.to(torch.float32).cpu(), errors.cpu(), self.sparse_options(problem, value_bytes)
        )

    def sparse_options(self, problem: WeightedProblem, value_bytes: int) -> list[SparseOption]:
        """Options beyond plain ranks (sparse-plus-low-rank methods override this); none by default."""
        return []

    @property
    def refine_neighbours(self) -> int:
        """Unrefined options on either side of the allocator's choice that lrc.allocate.refine refines."""
        return 1

    def refine_options(self, problem: WeightedProblem,
                       options: list[SparseOption]) -> list[tuple[SparseOption, dict[str, torch.Tensor] | None]]:
        """The options (of this problem's matrix) with their final errors, refined=True, each with the factors
        `sparse_layer` would return for it where the refit computed them (else None); as given by default."""
        return [(option, None) for option in options]

    def sparse_layer(self, problem: WeightedProblem, option: SparseOption) -> dict[str, torch.Tensor]:
        """The factors of a chosen sparse option, in the original space (float64), by factor name."""
        raise NotImplementedError(f"method {self.name} offers no sparse options")


@dataclass
class WeightedProblem:
    """One matrix in its weighted space: W̃ = P_out W P_in = Ũ Σ Ṽᵀ.

    weight: W (m x n, float64); weighted: W̃; in_weights = (P_in, P_in⁻¹), out_weights = (P_out, P_out⁻¹);
    sq: σ² descending (min(m, n)); basis: Ṽ (n x n) when m >= n, else Ũ (m x m).
    """

    name: str
    weight: torch.Tensor
    weighted: torch.Tensor
    in_weights: Weighting
    out_weights: Weighting
    sq: torch.Tensor
    basis: torch.Tensor

    def weighted_coefficients(self, k: int) -> torch.Tensor:
        """Ũ_k Σ_k (m x k): W̃ projected on its top k right singular vectors, W̃ Ṽ_k."""
        if self.weighted.shape[0] >= self.weighted.shape[1]:
            return self.weighted @ self.basis[:, :k]
        return self.basis[:, :k] * self.sq[:k].sqrt()

    def low_rank(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) in the original space: up = P_out⁻¹ Ũ_k Σ_k (m x k), down = Ṽ_kᵀ P_in⁻¹ (k x n)."""
        p_in_inv, p_out_inv = self.in_weights[1], self.out_weights[1]
        if self.weighted.shape[0] >= self.weighted.shape[1]:  # basis = right singular vectors V
            v = self.basis[:, :k]
            up = apply_left(p_out_inv, self.weighted @ v)
            down = apply_right(v.T, p_in_inv)
        else:  # basis = left singular vectors U
            u = self.basis[:, :k]
            up = apply_left(p_out_inv, u)
            down = apply_right(u.T @ self.weighted, p_in_inv)  # = Σ_k V_kᵀ P_in⁻¹
        if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
            raise NumericalError(f"factors of {self.name} are not finite (singular weighting?)")
        return up, down

    def with_weight(self, weight: torch.Tensor) -> WeightedProblem:
        """The same weighting applied to another m x n matrix (e.g. W minus a sparse part), decomposed anew."""
        weighted = self.to_weighted(weight)
        sq, basis = _singular_pairs(weighted, self.name)
        return WeightedProblem(self.name, weight.to(self.weight), weighted, self.in_weights, self.out_weights, sq, basis)

    def to_weighted(self, delta: torch.Tensor) -> torch.Tensor:
        """P_out Δ P_in, for an m x n Δ in the original space."""
        return apply_left(self.out_weights[0], apply_right(delta.to(self.weighted), self.in_weights[0]))


def _singular_pairs(a: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ² descending, singular vectors) of `a` from the eigendecomposition of its smaller Gram.

    For m x n `a` with m >= n: eigh(aᵀa) gives σ² and V (n x n); otherwise eigh(a aᵀ) gives σ² and U.
    In float64 this is exact to ~1e-16 σ_max² per value, several times faster than a full SVD, and the
    factors it leads to (a V, or Uᵀ a) need no division by σ.
    """
    gram = a.T @ a if a.shape[0] >= a.shape[1] else a @ a.T
    try:
        evals, evecs = torch.linalg.eigh(gram)
    except RuntimeError as exc:  # LinAlgError subclasses RuntimeError
        raise NumericalError(f"eigendecomposition of {name} failed: {exc}") from None
    if not torch.isfinite(evals).all():
        raise NumericalError(f"decomposition of {name} produced non-finite singular values")
    return evals.flip(0).clamp_min(0), evecs.flip(1)


def apply_right(x: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    """x @ P, P a matrix, a diagonal vector or None."""
    if p is None:
        return x
    return x * p if p.dim() == 1 else x @ p


def apply_left(p: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """P @ x, P a matrix, a diagonal vector or None."""
    if p is None:
        return x
    return p[:, None] * x if p.dim() == 1 else p @ x
