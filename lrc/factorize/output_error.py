"""Exact relative output error ||(W - W_r) X||_F / ||W X||_F of every rank r of a decomposition."""

from __future__ import annotations

import torch

from .base import Decomposition


def relative_output_errors(weight: torch.Tensor, gram: torch.Tensor, dec: Decomposition) -> torch.Tensor:
    """(max_rank + 1,) errors; entry r uses the first r factor pairs, computed from G = X Xᵀ in float64.

    With A = up (m x k), B = downᵀ (n x k), W_r = Σ_{i<r} a_i b_iᵀ:
      ||(W - W_r) X||² = tr(W G Wᵀ) - 2 Σ_{i<r} a_iᵀ W G b_i + Σ_{i,j<r} (a_iᵀ a_j)(b_iᵀ G b_j),
    so all ranks come from prefix sums of one k x k matrix, without forming any W_r.
    """
    w = weight.to(torch.float64)
    g = gram.to(device=w.device, dtype=torch.float64)
    a = dec.up_full.to(w)
    b = dec.down_full.to(w).T
    gb = g @ b
    total = torch.einsum("ij,ij->", w @ g, w)
    cross = torch.einsum("mi,mi->i", a, w @ gb)
    pair = (a.T @ a) * (b.T @ gb)
    square = pair.cumsum(0).cumsum(1).diagonal()
    err = torch.cat([total.reshape(1), total - 2 * cross.cumsum(0) + square])
    if float(total) <= 0:
        return torch.zeros_like(err).cpu()
    return (err.clamp_min(0) / total).sqrt().cpu()
