"""Input statistics of every targeted projection, one block at a time (through the layer walker).

For each block i: run it on its inputs (batch by batch, with the arguments the full model passes it)
with hooks that accumulate Σ x xᵀ (float64) and Σ |x| per projection, hand the statistics to a
callback, and keep the block's outputs, which become block i+1's inputs. Only the current block is moved
to the compute device; live memory is one block plus the hidden states (samples x seq_len x hidden) plus
the statistics of that block. Projections that read the same tensor (q/k/v, gate/up, one expert's gate
and up) share one Gram. An expert's statistics are sums over the tokens routed to it; a projection that
no calibration token reaches (an expert the router never picks) is an error, never an empty Gram.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..distributed import merged_over_ranks, ordered_partials, shard_batches
from ..errors import CalibrationError
from ..factorize import InputStats
from ..model.projection import Projection
from ..stream.activations import ActivationStore
from .walker import LayerWalk

# callback(layer index, layer module, {projection name: stats}, {projection name: name of the one whose stats it shares})
LayerCallback = Callable[[int, nn.Module, dict[str, InputStats], dict[str, str]], None]


class _StatsHooks:
    """Forward hooks accumulating input statistics of the given projections of one block."""

    def __init__(self, projections: dict[str, Projection], device: torch.device | str) -> None:
        self.stats: dict[str, InputStats] = {}
        self._batch: dict[str, InputStats] = {}  # this batch's sums, added to `stats` at end_batch
        self._device = device
        self.shares: dict[str, str] = {}
        self._seen: list[tuple[torch.Tensor, str]] = []
        self._handles = [p.module.register_forward_hook(self._hook(name)) for name, p in projections.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0]
            for seen, owner in self._seen:
                if seen is x:
                    self.shares[name] = owner
                    return
            self._seen.append((x, name))
            flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            gram = flat.T @ flat
            abs_sum = flat.abs().sum(0)
            if name in self._batch:
                _add(self._batch[name], InputStats(gram, abs_sum, flat.shape[0]))
            else:
                self._batch[name] = InputStats(gram, abs_sum, flat.shape[0])

        return hook

    def end_batch(self, ran: bool = True) -> None:
        """Add this batch's sums to the running sums; over torch.distributed every rank's batch of this step,
        in global batch order (lrc.distributed.ordered_partials). ran: whether this rank ran a batch."""
        self._seen.clear()
        for partials in ordered_partials(self._batch if ran else None, self._device):
            for name, partial in partials.items():
                if name in self.stats:
                    _add(self.stats[name], partial)
                else:
                    self.stats[name] = partial
        self._batch = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _add(total: InputStats, part: InputStats) -> None:
    total.gram += part.gram
    total.abs_sum += part.abs_sum
    total.tokens += part.tokens


def collect_input_stats(
    model: nn.Module,
    windows: torch.Tensor,
    targets: dict[str, Projection],
    callback: LayerCallback,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    activations: ActivationStore | None = None,
) -> None:
    """Run the block-by-block statistics pass, calling `callback` once per block with its statistics.

    Over torch.distributed each rank runs its share of the batches (lrc.distributed.shard_batches); the
    statistics handed to `callback` are the sums over all windows, the same bytes on every rank.
    activations: where the hidden states between blocks are kept (in memory by default; see lrc.stream.activations).
    """
    batches, _, steps = shard_batches(windows, batch_size)
    walk = LayerWalk(model, torch.cat(batches) if batches else windows[:0], batch_size, device, activations)
    hidden = walk.inputs
    for index in range(len(walk)):
        projections = {name: p for name, p in targets.items() if name.startswith(walk.prefix(index))}
        with walk.placed(index) as layer:
            hooks = _StatsHooks(projections, device)
            outputs = walk.activations.boundary()
            with torch.no_grad():
                for batch, h in enumerate(hidden):
                    outputs.append(walk.run(index, batch, h))
                    hooks.end_batch()
            for _ in range(steps - len(hidden)):  # other ranks' last batches
                hooks.end_batch(ran=False)
            hooks.remove()
            shares = merged_over_ranks(hooks.shares)
            check_reached(projections, set(hooks.stats) | set(shares), "the statistics pass")
            callback(index, layer, hooks.stats, shares)
        hidden = outputs


def check_reached(projections: dict[str, Any], reached: set[str], where: str) -> None:
    """CalibrationError naming the first projection no calibration token reached."""
    for name in projections:
        if name not in reached:
            if ".experts." in name:
                why, advice = "an expert the router never picked?", "use more calibration samples, or list it"
            else:  # Mamba's dt_proj: its weight is read by the block's own code, the module never called
                why, advice = "the block reads its weight without calling it", "list it"
            raise CalibrationError(
                f"no calibration token reached {name} in {where} ({why}): its matrix would be fitted to nothing; "
                f"{advice} under `exclude` in a recipe to leave it as it is"
            )
