"""Output-gradient statistics: one backward pass per calibration window over the whole model.

For every targeted linear y = W x we accumulate, with g_t = ∂loss/∂y_t and loss = Σ_t cross-entropy_t:
  Σ_t g_t g_tᵀ (m x m) where m <= full_max, else only its diagonal Σ_t g_t²,
  and, if `fisher`, the FWSVD Fisher row sums Σ_windows Σ_j (∂loss_w/∂W_ij)², with ∂loss_w/∂W = Σ_t g_t x_tᵀ.
Weights get no gradient (requires_grad stays False); the graph starts at the embedding output.
Cost: one forward + backward per window over the full model, so memory holds the model plus one window's
activations (batch_size windows at a time), and the statistics: m² float64 per linear with m <= full_max.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..factorize import OutputStats


def collect_output_stats(
    model: Any,
    windows: torch.Tensor,
    targets: dict[str, nn.Linear],
    full_max: int = 2048,
    fisher: bool = False,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, OutputStats]:
    """{linear name: OutputStats} from forward + backward passes over `windows` (samples x seq_len)."""
    device = torch.device(device)
    home = next(model.parameters()).device
    model.to(device)
    stats: dict[str, OutputStats] = {}
    for name, linear in targets.items():
        m = linear.out_features
        stats[name] = OutputStats(
            gram=torch.zeros(m, m, dtype=torch.float64, device=device) if m <= full_max else None,
            diag=torch.zeros(m, dtype=torch.float64, device=device),
            fisher_rows=torch.zeros(m, dtype=torch.float64, device=device),
            tokens=0,
        )
    inputs: dict[str, torch.Tensor] = {}

    def forward_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            inputs[name] = args[0].detach()
            if output.requires_grad:
                output.register_hook(lambda grad: _accumulate(stats[name], grad, inputs.pop(name), fisher))

        return hook

    handles = [module.register_forward_hook(forward_hook(name)) for name, module in targets.items()]
    embed = model.get_input_embeddings()
    handles.append(embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    try:
        batches = windows.split(batch_size)
        for i, batch in enumerate(batches):
            batch = batch.to(device)
            with torch.enable_grad():
                logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
                loss = nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
                )
                loss.backward()
            inputs.clear()
            if progress is not None:
                progress(i + 1, len(batches))
    finally:
        for handle in handles:
            handle.remove()
        model.to(home)
    return {name: s.to("cpu") for name, s in stats.items()}


def _accumulate(stats: OutputStats, grad: torch.Tensor, x: torch.Tensor, fisher: bool) -> None:
    """Add one batch's output gradients (batch x seq x m) and inputs (batch x seq x n) to `stats`.

    Products over one batch are taken in float32 and summed in float64: the gradient statistics only
    weight the output space, so they need less precision than the input Gram.
    """
    g = grad.detach().float()
    flat = g.reshape(-1, g.shape[-1])
    if stats.gram is not None:
        stats.gram += (flat.T @ flat).double()
    stats.diag += flat.square().sum(0).double()
    if fisher:
        for w in range(g.shape[0]):  # per window: ∂loss_w/∂W = g_wᵀ x_w (m x n)
            stats.fisher_rows += (g[w].T @ x[w].float()).square().sum(1).double()
    stats.tokens += flat.shape[0]
