"""Sequential factorization: layer i is fitted on the inputs produced by the already compressed layers before it.

Two streams of hidden states go through the decoder layer by layer: the original model's (X) and the
compressed model's (X̂). At layer i every targeted linear W sees X in the original model and X̂ in the
compressed one, and is replaced by the rank-r factors W' that minimise the error of its *original* output:

    min ||W X - W' X̂||_F   (tokens as rows:  ||X Wᵀ - X̂ W'ᵀ||_F)

Least squares splits it: W* = W C (Ĝ + λ)⁻¹ with C = Xᵀ X̂ and Ĝ = X̂ᵀ X̂ (λ: ridge toward W), then the
method's weighted truncation of W* under Ĝ. So later layers absorb the drift of earlier ones instead of
compounding it. Ranks come from the one-shot allocation; output-gradient weights from the one-shot pass.
Cost: three forward passes of each layer (original on X, original on X̂, compressed on X̂).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .calibration.layerwise import capture_first_layer_inputs, run_layer, to_device
from .factorize import FactorizationMethod, InputStats, OutputStats
from .forms import LowRankLinear
from .targets import decoder_layers, replace_module


class _Capture:
    """Forward hooks recording each linear's input for one batch; linears reading one tensor share it."""

    def __init__(self, linears: dict[str, nn.Linear]) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.owner: dict[str, str] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in linears.items()]

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
    targets: dict[str, nn.Linear],
    ranks: dict[str, int],
    method: FactorizationMethod,
    outputs: dict[str, OutputStats],
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    ridge: float = 1e-3,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Replace every linear with a rank in `ranks` (rank > 0) by its sequentially fitted factors, in place.

    Returns {name: ||W X - W' X̂||_F / ||W X||_F} measured on the calibration windows.
    """
    device = torch.device(device)
    stack_name, layers = decoder_layers(model)
    hidden, kwargs_list = capture_first_layer_inputs(model, windows, batch_size)
    original = [h.to(device) for h in hidden]
    compressed = [h.clone() for h in original]
    kwargs_list = [to_device(kw, device) for kw in kwargs_list]
    errors: dict[str, float] = {}
    for index, layer in enumerate(layers):
        prefix = f"{stack_name}.{index}."
        linears = {name: m for name, m in targets.items() if name.startswith(prefix) and ranks.get(name, 0) > 0}
        home = next(layer.parameters()).device
        layer.to(device)
        capture = _Capture(linears)
        sums: dict[str, dict[str, torch.Tensor]] = {}
        tokens = 0
        next_original = []
        with torch.no_grad():
            for x_orig, x_comp, kwargs in zip(original, compressed, kwargs_list):
                next_original.append(run_layer(layer, x_orig, kwargs))
                seen = capture.flat()
                run_layer(layer, x_comp, kwargs)
                seen_hat = capture.flat()
                for owner, x in seen.items():
                    x_hat = seen_hat[owner]
                    s = sums.setdefault(owner, {})
                    for key, value in (("g", x.T @ x), ("c", x.T @ x_hat), ("gh", x_hat.T @ x_hat),
                                       ("abs", x_hat.abs().sum(0))):
                        s[key] = s[key] + value if key in s else value
                tokens += x_orig.shape[0] * x_orig.shape[1]
        shares = dict(capture.owner)
        capture.remove()
        for name, linear in linears.items():
            s = sums[shares[name]]
            new, err = _fit(linear, s, tokens, ranks[name], method, outputs.get(name), ridge, device, name)
            replace_module(model, name, new.to(device))
            errors[name] = err
        with torch.no_grad():
            compressed = [run_layer(layer, h, kw) for h, kw in zip(compressed, kwargs_list)]
        original = next_original
        layer.to(home)
        if progress is not None:
            progress(index + 1, len(layers))
    return errors


def _fit(
    linear: nn.Linear,
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
    w = linear.weight.detach().to(device, torch.float64)
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
    bias = linear.bias.detach() if linear.bias is not None else None
    return LowRankLinear.from_factors(up, down, bias, dtype=linear.weight.dtype), relative
