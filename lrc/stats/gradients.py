"""Output-gradient statistics: one backward pass per calibration batch over the whole model.

For every targeted projection y = W x we accumulate, with g_t = ∂loss/∂y_t and the model's training
objective `loss` (its adapter's: next-token cross-entropy for a causal LM, a probe of the final hidden
states for an encoder, see ModelAdapter.loss):
  Σ_t g_t g_tᵀ (m x m) where m <= full_max, else only its diagonal Σ_t g_t²,
  and, if `fisher`, the FWSVD Fisher row sums Σ_windows Σ_j (∂loss_w/∂W_ij)², with ∂loss_w/∂W = Σ_t g_t x_tᵀ.
An expert's statistics are sums over the tokens routed to it. Weights get no gradient (requires_grad
stays False); the graph starts at the embedding output.
Cost: one forward + backward per batch over the full model, so memory holds the model plus one batch's
activations, and the statistics: m² float64 per projection with m <= full_max.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..factorize import OutputStats
from ..model.adapters import adapter_for
from ..model.projection import Projection
from .inputs import check_reached

PROBE_SEED = 0
"""Seed of the encoder objective's Gaussian probe (drawn in batch order)."""


def collect_output_stats(
    model: Any,
    windows: torch.Tensor,
    targets: dict[str, Projection],
    full_max: int = 2048,
    fisher: bool = False,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, OutputStats]:
    """{projection name: OutputStats} from forward + backward passes over `windows` (samples x seq_len)."""
    device = torch.device(device)
    adapter = adapter_for(model)
    home = next(model.parameters()).device
    model.to(device)
    stats: dict[str, OutputStats] = {}
    for name, projection in targets.items():
        m = projection.out_features
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

    handles = [p.module.register_forward_hook(forward_hook(name)) for name, p in targets.items()]
    embed = model.get_input_embeddings()
    handles.append(embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    probe = torch.Generator().manual_seed(PROBE_SEED)
    try:
        batches = windows.split(batch_size)
        for i, batch in enumerate(batches):
            with torch.enable_grad():
                adapter.loss(model, batch.to(device), probe).backward()
            inputs.clear()
            if progress is not None:
                progress(i + 1, len(batches))
    finally:
        for handle in handles:
            handle.remove()
        model.to(home)
    check_reached(targets, {name for name, s in stats.items() if s.tokens > 0}, "the output-gradient pass")
    return {name: s.to("cpu") for name, s in stats.items()}


def _accumulate(stats: OutputStats, grad: torch.Tensor, x: torch.Tensor, fisher: bool) -> None:
    """Add one batch's output gradients (... x m) and inputs (... x n) to `stats`.

    Products over one batch are taken in float32 and summed in float64: the gradient statistics only
    weight the output space, so they need less precision than the input Gram. An expert sees one flat list
    of the batch's routed tokens (tokens x m): its Fisher sums are per batch, per window at batch_size 1.
    """
    g = grad.detach().float()
    flat = g.reshape(-1, g.shape[-1])
    if stats.gram is not None:
        stats.gram += (flat.T @ flat).double()
    stats.diag += flat.square().sum(0).double()
    if fisher:
        windows = g if g.dim() == 3 else g[None]
        xs = x if x.dim() == 3 else x[None]
        for w in range(windows.shape[0]):  # per window: ∂loss_w/∂W = g_wᵀ x_w (m x n)
            stats.fisher_rows += (windows[w].T @ xs[w].float()).square().sum(1).double()
    stats.tokens += flat.shape[0]
