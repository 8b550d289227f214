"""Layer-by-layer calibration: statistics of every targeted linear's input, one decoder layer at a time.

The inputs of decoder layer 0 are captured once; then for each layer i: run it on its inputs with hooks that
accumulate Σ x xᵀ (float64) per linear, hand the statistics to a callback, and keep the layer's outputs, which become layer i+1's inputs. Only the current layer is moved
to the compute device; live memory is one layer plus the hidden states (samples x seq_len x hidden) plus
the statistics of that layer. Linears that read the same tensor (q/k/v, gate/up) share one Gram.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..factorize import InputStats
from ..targets import decoder_layers

# callback(layer index, layer module, {linear name: stats}, {linear name: name of the linear whose stats it shares})
LayerCallback = Callable[[int, nn.Module, dict[str, InputStats], dict[str, str]], None]


class _StopForward(Exception):
    pass


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def capture_first_layer_inputs(
    model: nn.Module, windows: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Run the model up to decoder layer 0 for each batch; return its hidden-state inputs and keyword args."""
    _, layers = decoder_layers(model)
    inputs: list[torch.Tensor] = []
    kwargs_list: list[dict[str, Any]] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append(hidden.detach())
        kwargs_list.append({k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")})
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in windows.split(batch_size):
                with contextlib.suppress(_StopForward):
                    model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    return inputs, kwargs_list


class _StatsHooks:
    """Forward hooks accumulating input statistics of the given linears of one layer."""

    def __init__(self, linears: dict[str, nn.Linear]) -> None:
        self.stats: dict[str, InputStats] = {}
        self.shares: dict[str, str] = {}
        self._seen: list[tuple[torch.Tensor, str]] = []
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in linears.items()]

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


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def calibrate_layerwise(
    model: nn.Module,
    windows: torch.Tensor,
    targets: dict[str, nn.Linear],
    callback: LayerCallback,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Run the layer-by-layer calibration pass, calling `callback` once per decoder layer with its statistics."""
    device = torch.device(device)
    stack_name, layers = decoder_layers(model)
    hidden_states, kwargs_list = capture_first_layer_inputs(model, windows, batch_size)
    hidden_states = [h.to(device) for h in hidden_states]
    kwargs_list = [to_device(kw, device) for kw in kwargs_list]
    for index, layer in enumerate(layers):
        prefix = f"{stack_name}.{index}."
        linears = {name: m for name, m in targets.items() if name.startswith(prefix)}
        home = next(layer.parameters()).device
        layer.to(device)
        hooks = _StatsHooks(linears)
        outputs = []
        with torch.no_grad():
            for hidden, kwargs in zip(hidden_states, kwargs_list):
                outputs.append(run_layer(layer, hidden, kwargs))
                hooks.end_batch()
        hooks.remove()
        callback(index, layer, hooks.stats, hooks.shares)
        del hooks
        hidden_states = outputs
        layer.to(home)
        if progress is not None:
            progress(index + 1, len(layers))
