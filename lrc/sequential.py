"""Sequential factorization: block i is fitted on the inputs produced by the already compressed blocks before it.

Two streams of hidden states go through the blocks one at a time (lrc.stats.walker, each block with its
own arguments): the original model's (X) and the compressed model's (X̂). At block i every targeted
projection W sees X in the original model and X̂ in the compressed one, and is replaced by the rank-r
factors W' that minimise the error of its *original* output:

    min ||W X - W' X̂||_F   (tokens as rows:  ||X Wᵀ - X̂ W'ᵀ||_F)

Least squares splits it: W* = W C (Ĝ + λ)⁻¹ with C = Xᵀ X̂ and Ĝ = X̂ᵀ X̂ (λ: ridge toward W), then the
method's weighted truncation of W* under Ĝ. So later blocks absorb the drift of earlier ones instead of
compounding it. Ranks come from the one-shot allocation; output-gradient weights from the one-shot pass.
Cost: three forward passes of each block (original on X, original on X̂, compressed on X̂).
Mixture-of-experts models (any block holding routed experts) are refused: the router may send a token to
different experts in the two streams, so an expert's X and X̂ are not the same tokens and C = Xᵀ X̂ has no
meaning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import CalibrationError, ConfigError
from .factorize import FactorizationMethod, InputStats, OutputStats
from .forms import LowRankLinear
from .model.experts import UnfusedExperts
from .model.projection import Projection
from .model.targets import replace_module
from .stats.walker import LayerWalk


class _Capture:
    """Forward hooks recording each projection's input for one batch; projections reading one tensor share it."""

    def __init__(self, projections: dict[str, Projection]) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.owner: dict[str, str] = {}
        self._handles = [p.module.register_forward_hook(self._hook(name)) for name, p in projections.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0]
            for other, seen in self.inputs.items():
                if seen is x:
                    self.owner[name] = other
                    return
            self.inputs[name] = x
            self.owner[name] = name

        return hook

    def flat(self) -> dict[str, torch.Tensor]:
        out = {name: x.detach().reshape(-1, x.shape[-1]).to(torch.float64) for name, x in self.inputs.items()}
        self.inputs = {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def sequential_factorize(
    model: Any,
    windows: torch.Tensor,
    targets: dict[str, Projection],
    ranks: dict[str, int],
    method: FactorizationMethod,
    outputs: dict[str, OutputStats],
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    ridge: float = 1e-3,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Replace every projection with a rank in `ranks` (rank > 0) by its sequentially fitted factors, in place.

    Returns {name: ||W X - W' X̂||_F / ||W X||_F} measured on the calibration windows.
    """
    if any(isinstance(m, UnfusedExperts) for m in model.modules()):  # a dense block of an MoE model type is fine
        raise ConfigError("sequential mode does not support mixture-of-experts models (the router may send a token "
                          "to different experts in the original and the compressed model): use one-shot mode")
    walk = LayerWalk(model, windows, batch_size, device)
    device = walk.device
    original = walk.inputs
    compressed = [h.clone() for h in original]
    errors: dict[str, float] = {}
    for index in range(len(walk)):
        projections = {name: p for name, p in targets.items()
                       if name.startswith(walk.prefix(index)) and ranks.get(name, 0) > 0}
        with walk.placed(index):
            capture = _Capture(projections)
            sums: dict[str, dict[str, torch.Tensor]] = {}
            tokens: dict[str, int] = {}
            next_original = []
            with torch.no_grad():
                for batch, (x_orig, x_comp) in enumerate(zip(original, compressed)):
                    next_original.append(walk.run(index, batch, x_orig))
                    seen = capture.flat()
                    walk.run(index, batch, x_comp)
                    seen_hat = capture.flat()
                    for owner, x in seen.items():
                        x_hat = seen_hat[owner]
                        s = sums.setdefault(owner, {})
                        for key, value in (("g", x.T @ x), ("c", x.T @ x_hat), ("gh", x_hat.T @ x_hat),
                                           ("abs", x_hat.abs().sum(0))):
                            s[key] = s[key] + value if key in s else value
                        tokens[owner] = tokens.get(owner, 0) + x.shape[0]
            shares = dict(capture.owner)
            capture.remove()
            for name, projection in projections.items():
                if name not in shares:
                    raise CalibrationError(f"no calibration token reached {name} in the sequential refit")
                new, err = _fit(projection, sums[shares[name]], tokens[shares[name]], ranks[name], method, outputs.get(name),
                                ridge, device, name)
                replace_module(model, name, new.to(device))
                errors[name] = err
            with torch.no_grad():
                compressed = [walk.run(index, batch, h) for batch, h in enumerate(compressed)]
            original = next_original
        if progress is not None:
            progress(index + 1, len(walk))
    return errors


def _fit(
    projection: Projection,
    s: dict[str, torch.Tensor],
    tokens: int,
    rank: int,
    method: FactorizationMethod,
    outputs: OutputStats | None,
    ridge: float,
    device: torch.device,
    name: str,
) -> tuple[LowRankLinear, float]:
    """Rank-`rank` factors of W* = W (C + λI)(Ĝ + λI)⁻¹ under Ĝ, and the relative original-output error."""
    w = projection.weight.detach().to(device, torch.float64)
    g, c, g_hat = s["g"], s["c"], s["gh"]
    lam = ridge * float(torch.diagonal(g_hat).mean().clamp_min(1e-30))
    eye = torch.eye(g_hat.shape[0], dtype=torch.float64, device=device)
    chol = torch.linalg.cholesky(g_hat + lam * eye)
    target = torch.cholesky_solve((w @ (c + lam * eye)).T, chol).T  # W* (m x n)
    stats = InputStats(g_hat, s["abs"], tokens)
    dec = method.decompose(target, stats, rank, name, None, outputs.to(device) if outputs is not None else None)
    up, down = dec.factors(rank)
    w_new = up.to(w) @ down.to(w)
    total = torch.einsum("ij,ij->", w @ g, w)
    err = total - 2 * torch.einsum("ij,ij->", w @ c, w_new) + torch.einsum("ij,ij->", w_new @ g_hat, w_new)
    relative = float((err.clamp_min(0) / total).sqrt()) if float(total) > 0 else 0.0
    bias = projection.bias.detach() if projection.bias is not None else None
    return LowRankLinear.from_factors(up, down, bias, dtype=projection.weight.dtype), relative
