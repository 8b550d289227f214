"""ROCKET-style sparse dictionary: W ≈ S U with a dense atom projection U and a row-sparse mixing S.

In the loss-aware weighted space W̃ = P_out W P_in = Ũ Σ Ṽᵀ (see loss_aware):
1. atoms: the top k right singular vectors; coefficients C = P_out⁻¹ Ũ_k Σ_k (m x k, original output
   space), so W ≈ C Ṽ_kᵀ P_in⁻¹ is the rank-k truncation;
2. sparsify: keep the s largest |c_ij| of each row of C. With Ṽ_k orthonormal, dropping c_ij costs
   exactly c_ij² ||P_out e_i||² of weighted error, a constant factor per row, so |c_ij| ranks a row exactly;
3. refit the atoms in closed form: with S̃ = P_out S, Z = (S̃ᵀS̃ + μ I)⁻¹ S̃ᵀ W̃ (k x n, weighted input
   space), U = Z P_in⁻¹; μ = ridge · tr(S̃ᵀS̃) / k. The error ||W̃ - S̃ Z||_F² is on the same (loss) scale
   as the plain ranks' dropped σ²;
4. `reselect` rounds (alternating refits): for the refitted atoms, the least-squares coefficients
   C = W P_in Zᵀ (Z Zᵀ + μ I)⁻¹ (W P_in = P_out⁻¹ W̃), the support chosen again by |c_ij| · ||z_j|| (dropping
   c_ij costs about c_ij² ||z_j||², ROCKET's importance), step 3 again; a round is kept only if it lowers
   the error, and the rounds stop at the first that does not.
Options: for each ratio c (fraction of the dense bytes removed) and sparsity level q = k / s, the largest
k whose honest bytes (atoms k n values + the mixing's values and indices or bitmask) fit (1 - c) m n
value bytes, and at most `max_work` · m n / (m + n) atoms: a many-token forward expands the mixing and
runs k (m + n) multiply-adds per token, the dense layer m n, so with the default 1.0 no option does more
work than the matrix it replaces; `None` lets k reach min(m, n) (on SmolLM2-135M that offered gate/up
options with up to 1.2x the dense work). Per ratio the level with the least error after steps 1-3 is
chosen, then refined by the rounds. The levels default to 1.75 and 2.0: on SmolLM2-135M (layers 3 and 10) one of them was the best of
1.5 / 1.75 / 2.0 / 2.5 for most ratios, and the best of the two was within 0.2% of the best of the four on
average (2.5% at most), at half the fits.
`reselect_options`: "all" runs the rounds for every option (14 per matrix); "near-choice" (default) offers
the options with their one-shot error (an upper bound, `refined` False) and leaves the rounds to
`refine_options`, which lrc.allocate.refine calls only for the options next to the allocator's choices
(the chosen one and one on either side by cost): the same final fits where the allocation lands, for
about a quarter of the rounds; "chosen" refines only the chosen option (for a plain rank or dense, the
options just below and above its cost), allocating again until the choices stand still.
`pattern: "N:M"` makes the mixing semi-structured: in each row, N of every M consecutive atoms (M / N the
only level, k a multiple of M), the pattern torch's semi-structured sparse kernels run on GPUs (2:4); the
entries kept are the N largest |importance| of each group instead of the s largest of the row.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..errors import ConfigError
from ..forms.sparse_matrix import best_layout
from .base import SparseOption, WeightedProblem, apply_left, apply_right, sparse_option
from .loss_aware import LossAwareSVD
from .registry import METHODS

KIND = "sparse-dictionary"

Fit = tuple[torch.Tensor, torch.Tensor, float]
"""(S, Z, error): the mixing S (m x k), the weighted atoms Z (k x n), ||W̃ - P_out S Z||_F²."""


def default_ratios() -> list[float]:
    return [round(0.05 * i, 2) for i in range(1, 15)]  # 0.05 .. 0.70, as ROCKET's grid


@METHODS.register(KIND)
@dataclass
class SparseDictionary(LossAwareSVD):
    """Loss-aware weighting, then W ≈ S U: U (k x n) dense atoms, S (m x k) with s = k / q non-zeros per row."""

    offers_sparse = True
    ratios: list[float] = field(default_factory=default_ratios)
    sparsity_levels: list[float] = field(default_factory=lambda: [1.75, 2.0])
    ridge: float = 1e-6
    reselect: int = 8
    reselect_options: str = "near-choice"
    max_work: float | None = 1.0
    atom_step: int = 8  # atom counts are multiples of this: GPU (and oneDNN) matrix products want aligned sizes
    pattern: str | None = None  # "N:M": N of every M consecutive atoms per row of the mixing (see the module docstring)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.ratios or any(not 0 < c < 1 for c in self.ratios):
            raise ConfigError(f"{KIND} ratios must lie in (0, 1), got {self.ratios}")
        if not self.sparsity_levels or any(q <= 1 for q in self.sparsity_levels):
            raise ConfigError(f"{KIND} sparsity_levels (atoms per stored entry) must be > 1, got {self.sparsity_levels}")
        if self.ridge < 0:
            raise ConfigError(f"{KIND} ridge must be >= 0")
        if self.reselect < 0:
            raise ConfigError(f"{KIND} reselect (rounds) must be >= 0")
        if self.max_work is not None and not self.max_work > 0:
            raise ConfigError(f"{KIND} max_work (multiply-adds per token as a share of dense) must be > 0 or null, got {self.max_work}")
        if self.atom_step < 1:
            raise ConfigError(f"{KIND} atom_step must be >= 1, got {self.atom_step}")
        if self.reselect_options not in ("chosen", "near-choice", "all"):
            raise ConfigError(f"{KIND} reselect_options must be 'chosen', 'near-choice' or 'all', got {self.reselect_options!r}")
        self.n_of_m = semi_structured(self.pattern)
        if self.n_of_m is not None:
            kept, size = self.n_of_m
            if self.atom_step % size:
                raise ConfigError(f"{KIND} pattern {self.pattern} needs atom_step a multiple of {size}, got {self.atom_step}")
            if self.sparsity_levels not in ([1.75, 2.0], [size / kept]):
                raise ConfigError(f"{KIND} pattern {self.pattern} fixes the level at {size / kept:g} atoms per entry: "
                                  f"leave sparsity_levels out or set it to [{size / kept:g}]")

    @property
    def levels(self) -> list[float]:
        """The sparsity levels q = k / s offered: M / N alone under a pattern N:M, else `sparsity_levels`."""
        return [self.n_of_m[1] / self.n_of_m[0]] if self.n_of_m is not None else self.sparsity_levels

    @property
    def refine_neighbours(self) -> int:
        """Options refined on either side of the allocator's choice (see lrc.allocate.refine)."""
        return 0 if self.reselect_options == "chosen" else 1

    def most_atoms(self, m: int, n: int) -> int:
        """The most atoms an option may have: min(m, n), and k (m + n) <= max_work · m n."""
        if self.max_work is None:
            return min(m, n)
        return min(m, n, int(self.max_work * m * n / (m + n)))

    def sparse_options(self, problem: WeightedProblem, value_bytes: int) -> list[SparseOption]:
        m, n = problem.weight.shape
        shapes: dict[float, list[tuple[int, int]]] = {}
        for c in self.ratios:
            for q in self.levels:
                k, s = atoms_within(m, n, q, int((1 - c) * m * n * value_bytes), value_bytes, self.most_atoms(m, n),
                                    self.atom_step)
                if k >= 1:
                    shapes.setdefault(c, []).append((k, s))
        if not shapes:
            return []
        coefficients = self._coefficients(problem, max(k for pairs in shapes.values() for k, _ in pairs))
        total = weighted_energy(problem)
        data = input_weighted(problem) if self.reselect else None
        errors: dict[tuple[int, int], float] = {}
        offered: dict[tuple[int, int], SparseOption] = {}
        for pairs in shapes.values():  # per ratio, the level with the least error (step 3), then the rounds (step 4)
            fits = {}
            for k, s in pairs:
                if (k, s) not in errors:
                    fits[(k, s)] = self._select_and_refit(problem, coefficients[:, :k], coefficients[:, :k], s, total)
                    errors[(k, s)] = fits[(k, s)][2]
            k, s = min(pairs, key=errors.__getitem__)  # the first of equal errors
            if (k, s) in offered:
                continue
            option = sparse_option(KIND, k, m * s, k * n * value_bytes, (m, k), value_bytes, errors[(k, s)])
            if data is not None and self.reselect_options != "all":
                option = replace(option, refined=False)  # the rounds run if the allocator's choice comes near
            elif data is not None:
                start = fits.get((k, s)) or self._select_and_refit(problem, coefficients[:, :k], coefficients[:, :k], s, total)
                option = replace(option, error=self._rounds(problem, start, s, total, data)[2])
            offered[(k, s)] = option
        return list(offered.values())

    def refine_options(self, problem: WeightedProblem,
                       options: list[SparseOption]) -> list[tuple[SparseOption, dict[str, torch.Tensor] | None]]:
        """Each option with the error after the rounds (step 4), refined=True, and that fit's factors: what
        `sparse_layer` returns for it (None without rounds, where the options' errors are already final)."""
        if not self.reselect:
            return [(replace(o, refined=True), None) for o in options]
        refined: list[tuple[SparseOption, dict[str, torch.Tensor] | None]] = []
        data, total = input_weighted(problem), weighted_energy(problem)
        for option in options:
            mixing, z, error = self._final_fit(problem, option, data, total)
            refined.append((replace(option, error=error, refined=True), self._factors(problem, mixing, z)))
        return refined

    def sparse_layer(self, problem: WeightedProblem, option: SparseOption) -> dict[str, torch.Tensor]:
        """{"mixing": S (m x k, zeros off the support), "atoms": U (k x n)} in the original space."""
        mixing, z, _ = self._final_fit(problem, option, input_weighted(problem), weighted_energy(problem))
        return self._factors(problem, mixing, z)

    def _final_fit(self, problem: WeightedProblem, option: SparseOption, data: torch.Tensor, total: float) -> Fit:
        """Steps 1-4 for one option, its coefficients computed at its own k (the same bits whatever other
        options are fitted with it): the fit its layer is built from, its error the option's refined error.
        data: input_weighted(problem); total: weighted_energy(problem)."""
        coefficients = self._coefficients(problem, option.rank)
        return self._fit(problem, coefficients, option.nnz // problem.weight.shape[0], total, data)

    @staticmethod
    def _factors(problem: WeightedProblem, mixing: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """A fit's layer factors: the mixing S as it is, the atoms U = Z P_in⁻¹ (original input space)."""
        return {"mixing": mixing, "atoms": apply_right(z, problem.in_weights[1])}

    @staticmethod
    def _coefficients(problem: WeightedProblem, k: int) -> torch.Tensor:
        """C = P_out⁻¹ Ũ_k Σ_k (m x k)."""
        return apply_left(problem.out_weights[1], problem.weighted_coefficients(k))

    def _fit(
        self, problem: WeightedProblem, coefficients: torch.Tensor, s: int, total: float, data: torch.Tensor
    ) -> Fit:
        """(S, Z, ||W̃ - P_out S Z||_F²): steps 2-3, then the `reselect` rounds of step 4 (data = W P_in)."""
        return self._rounds(problem, self._select_and_refit(problem, coefficients, coefficients, s, total), s, total, data)

    def _rounds(self, problem: WeightedProblem, start: Fit, s: int, total: float, data: torch.Tensor) -> Fit:
        """Step 4 from the fit `start`: at most `reselect` rounds, stopping at the first that does not lower the error."""
        best = start
        for _ in range(self.reselect):
            z = best[1]
            c = ridge_solve(z @ z.T, z @ data.T, self.ridge).T  # C = W P_in Zᵀ (Z Zᵀ + μ I)⁻¹ (m x k)
            candidate = self._select_and_refit(problem, c, c * z.norm(dim=1), s, total)
            if candidate[2] >= best[2]:
                break
            best = candidate
        return best

    def _select_and_refit(
        self, problem: WeightedProblem, values: torch.Tensor, importance: torch.Tensor, s: int, total: float
    ) -> Fit:
        """(S, Z, error): S keeps `values` (m x k) at the s largest |importance| of each row; Z the ridge refit."""
        mask = row_top_mask(importance, s) if self.n_of_m is None else group_top_mask(importance, *self.n_of_m)
        mixing = torch.where(mask, values, torch.zeros((), dtype=values.dtype))
        weighted_mixing = apply_left(problem.out_weights[0], mixing)  # S̃ = P_out S
        gram = weighted_mixing.T @ weighted_mixing
        rhs = weighted_mixing.T @ problem.weighted
        z = ridge_solve(gram, rhs, self.ridge)
        # ||W̃ - S̃ Z||² = ||W̃||² - 2 <Z, S̃ᵀW̃> + <Z, S̃ᵀS̃ Z>
        error = total - 2 * float((z * rhs).sum()) + float((z * (gram @ z)).sum())
        return mixing, z, max(error, 0.0)


def row_top_mask(importance: torch.Tensor, s: int) -> torch.Tensor:
    """Boolean mask (m x k) of the s largest |importance| of each row: the entries `topk` would pick.

    The s-th largest value of a row (kthvalue, about half topk's time here) is a threshold that keeps
    exactly s entries unless the row has ties at it; such rows (rare in float64) take topk's choice.
    """
    a = importance.abs()
    k = a.shape[1]
    if s >= k:
        return torch.ones_like(a, dtype=torch.bool)
    mask = a >= a.kthvalue(k - s + 1, dim=1, keepdim=True).values
    tied = (mask.sum(dim=1) != s).nonzero().flatten()
    if tied.numel():
        rows = torch.zeros((tied.numel(), k), dtype=torch.bool, device=a.device)
        mask[tied] = rows.scatter_(1, a[tied].topk(s, dim=1).indices, True)
    return mask


def semi_structured(pattern: str | None) -> tuple[int, int] | None:
    """"N:M" -> (N, M) with 0 < N < M; None for no pattern."""
    if pattern is None:
        return None
    kept, _, size = pattern.partition(":")
    if not (kept.isdigit() and size.isdigit() and 0 < int(kept) < int(size)):
        raise ConfigError(f"{KIND} pattern must be 'N:M' with 0 < N < M (e.g. '2:4'), got {pattern!r}")
    return int(kept), int(size)


def group_top_mask(importance: torch.Tensor, kept: int, size: int) -> torch.Tensor:
    """Boolean mask (m x k, k a multiple of `size`) of the `kept` largest |importance| in each group of `size`
    consecutive columns of each row (topk's choice within the group)."""
    m, k = importance.shape
    groups = importance.abs().reshape(m, k // size, size)
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=importance.device)
    return mask.scatter_(2, groups.topk(kept, dim=2).indices, True).reshape(m, k)


def input_weighted(problem: WeightedProblem) -> torch.Tensor:
    """W P_in = P_out⁻¹ W̃ (m x n), the target of the rounds' coefficient fits."""
    return apply_right(problem.weight, problem.in_weights[0])


def weighted_energy(problem: WeightedProblem) -> float:
    """||W̃||²_F, the weighted matrix's squared norm: the fits' errors are relative to it."""
    return float(problem.weighted.square().sum())


def ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """(G + μ I)⁻¹ R for a k x k Gram G, μ = ridge · tr(G) / k (a tiny floor keeps G + μ I invertible)."""
    k = gram.shape[0]
    mu = ridge * float(gram.diagonal().sum()) / k + 1e-300
    return torch.linalg.solve(gram + mu * torch.eye(k, dtype=gram.dtype, device=gram.device), rhs)


def atoms_within(m: int, n: int, level: float, budget_bytes: int, value_bytes: int, most: int,
                 step: int = 1) -> tuple[int, int]:
    """(k, s): the most atoms k <= `most`, a multiple of `step`, s = round(k / level) >= 1, whose bytes fit
    `budget_bytes`; (0, 0) if none."""

    def cost(k: int) -> int:
        s = max(1, round(k / level))
        return k * n * value_bytes + best_layout(m, k, m * s, value_bytes)[1]

    low, high = 0, most // step  # in units of `step` atoms
    while low < high:  # largest k with cost(k) <= budget (cost grows with k)
        mid = (low + high + 1) // 2
        if cost(mid * step) <= budget_bytes:
            low = mid
        else:
            high = mid - 1
    k = low * step
    return (k, max(1, round(k / level))) if k >= 1 else (0, 0)
