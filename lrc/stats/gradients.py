"""Output-gradient statistics by a backward sweep over the blocks, last to first, without a whole-model backward.

For every targeted projection y = W x we accumulate, with g_t = ∂loss/∂y_t and the model's training
objective `loss` (its adapter's: next-token cross-entropy for a causal LM, a probe of the final hidden
states for an encoder, see ModelAdapter.loss):
  Σ_t g_t g_tᵀ (m x m) where m <= full_max, else only its diagonal Σ_t g_t²,
  and, if `fisher`, the FWSVD Fisher row sums Σ_windows Σ_j (∂loss_w/∂W_ij)², with ∂loss_w/∂W = Σ_t g_t x_tᵀ.
An expert's statistics are sums over the tokens routed to it.

The sweep (per group of windows): a forward pass block by block (the layer walker, each block with its own
recorded arguments) keeps every block's input h_i; the model's own objective on the last output h_L
(final norm, head, loss: the model's forward with its blocks bypassed) gives ∂loss/∂h_L; then for
i = L-1 .. 0, block i is run again on h_i with autograd and one vector-Jacobian product takes
∂loss/∂h_{i+1} to ∂loss/∂h_i, passing ∂loss/∂y at each of its projections on the way. This is the
chain rule of the whole-model backward, factored at block boundaries: the same gradients, to round-off.
Cost: about one more forward than a whole-model backward. Memory: the statistics (m² float64 per
projection with m <= full_max), the block inputs of one group of windows ((L+1) x group x seq_len x
hidden) and one block's autograd graph for one batch; weights get no gradient (requires_grad stays False).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..distributed import ordered_partials, shard_batches
from ..factorize import OutputStats
from ..model.adapters import adapter_for
from ..model.projection import Projection
from ..stream.activations import ActivationStore
from .inputs import check_reached
from .walker import LayerWalk

# layer_done(block index, {projection name: OutputStats}): a block's statistics, final (see collect_output_stats)
LayerStatsCallback = Callable[[int, dict[str, OutputStats]], None]

PROBE_SEED = 0
"""Seed of the encoder objective's Gaussian probe: global batch b draws from a generator seeded PROBE_SEED + b."""


def probe_generator(batch: int) -> torch.Generator:
    """The encoder probe's generator for global batch `batch`: its draws depend on nothing else (world size)."""
    return torch.Generator().manual_seed(PROBE_SEED + batch)


def collect_output_stats(
    model: Any,
    windows: torch.Tensor,
    targets: dict[str, Projection],
    full_max: int = 2048,
    fisher: bool = False,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    sweep_batches: int | None = 8,
    activations: ActivationStore | None = None,
    layer_done: LayerStatsCallback | None = None,
) -> dict[str, OutputStats]:
    """{projection name: OutputStats} over `windows` (samples x seq_len), by backward sweeps over the blocks.

    batch_size: windows per forward; sweep_batches: batches whose block inputs one sweep holds at once (None:
    all, one sweep). activations: where block inputs are kept (see lrc.stream.activations). layer_done: called
    with each block's statistics as soon as they are final (in the last sweep), which are then not kept: the
    result holds only the blocks it was not called for. Each statistic is the same sum in the same batch
    order whatever the sweeps, so neither changes a value.
    """
    device = torch.device(device)
    if windows.is_inference():  # made under torch.inference_mode: autograd cannot save them (the loss's targets)
        windows = windows.clone()
    adapter = adapter_for(model)
    home = model.get_input_embeddings().weight.device
    stats: dict[str, OutputStats] = {}

    def zero_stats(projection: Projection) -> OutputStats:
        m = projection.out_features
        return OutputStats(
            gram=torch.zeros(m, m, dtype=torch.float64, device=device) if m <= full_max else None,
            diag=torch.zeros(m, dtype=torch.float64, device=device),
            fisher_rows=torch.zeros(m, dtype=torch.float64, device=device),
            tokens=0,
        )
    batches, indices, steps = shard_batches(windows, batch_size)  # this rank's share (all of them in one process)
    per_sweep = sweep_batches or max(steps, 1)
    groups = -(-steps // per_sweep)
    for g in range(groups):
        first = g * per_sweep
        group_steps = min(per_sweep, steps - first)  # every rank takes these steps, with or without a batch
        mine = batches[first:first + group_steps]
        walk = LayerWalk(model, torch.cat(mine) if mine else windows[:0], batch_size, device, activations)
        blocks = len(walk)
        hidden = [walk.inputs]  # hidden[i][b]: block i's input on batch b; hidden[L]: the last block's output
        with torch.no_grad():
            for index in range(blocks):
                with walk.placed(index):
                    boundary = walk.activations.boundary()
                    for b, h in enumerate(hidden[-1]):
                        boundary.append(walk.run(index, b, h))
                    hidden.append(boundary)
        grads = walk.activations.boundary()  # ∂loss/∂(current block's output), per batch
        for b, batch in enumerate(mine):
            last = hidden[blocks][b].detach().to(home).requires_grad_(True)
            with walk.blocks_bypassed(last), torch.enable_grad():
                loss = adapter.loss(model, batch.to(home), probe_generator(indices[first + b]))
            grads.append(torch.autograd.grad(loss, last)[0].to(device))
        del hidden[blocks]
        for index in reversed(range(blocks)):
            projections = {name: p for name, p in targets.items() if name.startswith(walk.prefix(index))}
            for name, projection in projections.items():
                stats.setdefault(name, zero_stats(projection))
            with walk.placed(index):
                hooks = _GradientHooks(projections, stats, fisher)
                try:
                    for b in range(group_steps):
                        if b < len(mine):
                            h = hidden[index][b].detach().requires_grad_(True)
                            with torch.enable_grad():
                                out = walk.run(index, b, h)
                                grads[b] = torch.autograd.grad(out, h, grads[b])[0]
                            hooks.inputs.clear()
                        for partials in ordered_partials(hooks.batch if b < len(mine) else None, device):
                            for name, partial in partials.items():
                                _add(stats[name], partial)
                        hooks.batch = {}
                finally:
                    hooks.remove()
            del hidden[index]
            if layer_done is not None and g == groups - 1:
                done = {name: stats.pop(name) for name in projections}
                check_reached(done, {name for name, s in done.items() if s.tokens > 0}, "the output-gradient pass")
                layer_done(index, {name: s.to("cpu") for name, s in done.items()})
            if progress is not None:
                progress(g * blocks + blocks - index, groups * blocks)
    if layer_done is None:
        check_reached(targets, {name for name, s in stats.items() if s.tokens > 0}, "the output-gradient pass")
    return {name: s.to("cpu") for name, s in stats.items()}


class _GradientHooks:
    """Hooks on the given projections: each output's gradient, with the input that produced it, into `batch`
    (this batch's sums per projection, added to the running sums in global batch order after the batch)."""

    def __init__(self, projections: dict[str, Projection], totals: dict[str, OutputStats], fisher: bool) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.batch: dict[str, OutputStats] = {}
        self._totals = totals
        self._handles = [p.module.register_forward_hook(self._hook(name, fisher)) for name, p in projections.items()]

    def _hook(self, name: str, fisher: bool) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.inputs[name] = args[0].detach()
            if output.requires_grad:
                output.register_hook(lambda grad: _accumulate(self._partial(name), grad, self.inputs.pop(name), fisher))

        return hook

    def _partial(self, name: str) -> OutputStats:
        """This batch's sums for `name`, started at zero, shaped like its running sums."""
        if name not in self.batch:
            total = self._totals[name]
            gram = None if total.gram is None else torch.zeros_like(total.gram)
            self.batch[name] = OutputStats(gram, torch.zeros_like(total.diag), torch.zeros_like(total.fisher_rows), 0)
        return self.batch[name]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _add(total: OutputStats, part: OutputStats) -> None:
    if total.gram is not None and part.gram is not None:
        total.gram += part.gram
    total.diag += part.diag
    total.fisher_rows += part.fisher_rows
    total.tokens += part.tokens


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
