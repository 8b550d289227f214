"""Whitening transforms S with S Sᵀ = G (the input Gram), so that ||ΔW X||_F = ||ΔW S||_F."""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError, NumericalError


def cholesky_whitener(gram: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, L⁻¹) with L Lᵀ = G + λ I, L lower triangular; λ = damping · mean(diag G), raised 10x on failure.

    G is often singular (dead channels); SVD-LLM shifts it until Cholesky succeeds. We start at `damping`
    and multiply by 10 up to 1e-1 (or the damping asked, if larger), then give up with an error (never a
    silent NaN).
    """
    g = gram.to(torch.float64)
    n = g.shape[0]
    scale = float(torch.diagonal(g).mean().clamp_min(1e-30))
    eye = torch.eye(n, dtype=g.dtype, device=g.device)
    lam, last = damping, max(damping, 1e-1)
    while True:
        chol, info = torch.linalg.cholesky_ex(g + lam * scale * eye)
        if int(info) == 0:
            inv = torch.linalg.solve_triangular(chol, eye, upper=False)
            return chol, inv
        if lam >= last:
            raise NumericalError(f"Cholesky of the input Gram failed even with damping {lam:g}")
        lam = min(lam * 10 if lam > 0 else 1e-10, last)


def check_damping(value: float, name: str = "damping") -> None:
    """A method's damping option: a finite number >= 0 (a fraction of the Gram's mean diagonal)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ConfigError(f"{name} must be a number >= 0 (a fraction of the input Gram's mean diagonal), got {value!r}")


def eigen_whitener(gram: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q Λ^½, Λ^-½ Qᵀ) from G = Q Λ Qᵀ, eigenvalues floored at floor · λ_max (robust to singular G)."""
    g = gram.to(torch.float64)
    evals, evecs = torch.linalg.eigh(g)
    top = float(evals.max().clamp_min(1e-30))
    evals = evals.clamp_min(floor * top)
    root = evals.sqrt()
    return evecs * root, (evecs / root).T
