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

from ..errors import CalibrationError
from ..factorize import InputStats
from ..model.projection import Projection
from ..stream.activations import ActivationStore
from .walker import LayerWalk

# callback(layer index, layer module, {projection name: stats}, {projection name: name of the one whose stats it shares})
LayerCallback = Callable[[int, nn.Module, dict[str, InputStats], dict[str, str]], None]


class _StatsHooks:
    """Forward hooks accumulating input statistics of the given projections of one block."""

    def __init__(self, projections: dict[str, Projection]) -> None:
        self.stats: dict[str, InputStats] = {}
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
            if name in self.stats:
                s = self.stats[name]
                s.gram += gram
                s.abs_sum += abs_sum
                s.tokens += flat.shape[0]
            else:
                self.stats[name] = InputStats(gram, abs_sum, flat.shape[0])

        return hook

    def end_batch(self) -> None:
        self._seen.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


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

    activations: where the hidden states between blocks are kept (in memory by default; see lrc.stream.activations).
    """
    walk = LayerWalk(model, windows, batch_size, device, activations)
    hidden = walk.inputs
    for index in range(len(walk)):
        projections = {name: p for name, p in targets.items() if name.startswith(walk.prefix(index))}
        with walk.placed(index) as layer:
            hooks = _StatsHooks(projections)
            outputs = walk.activations.boundary()
            with torch.no_grad():
                for batch, h in enumerate(hidden):
                    outputs.append(walk.run(index, batch, h))
                    hooks.end_batch()
            hooks.remove()
            check_reached(projections, set(hooks.stats) | set(hooks.shares), "the statistics pass")
            callback(index, layer, hooks.stats, hooks.shares)
        hidden = outputs


def check_reached(projections: dict[str, Any], reached: set[str], where: str) -> None:
    """CalibrationError naming the first projection no calibration token reached."""
    for name in projections:
        if name not in reached:
            raise CalibrationError(
                f"no calibration token reached {name} in {where} (an expert the router never picked?): its "
                "matrix would be fitted to nothing; use more calibration samples, or list it under `exclude` in a "
                "recipe to leave it as it is"
            )
