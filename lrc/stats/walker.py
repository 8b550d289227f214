"""The layer walker: a model's blocks run one at a time on calibration batches, each with its own arguments.

Construction runs the model once per batch with every block's forward replaced by a recorder that keeps
the block's call (positional and keyword arguments, minus the hidden states) and passes the hidden
states through unchanged; the last recorder stops the forward, so neither the blocks nor the head run.
`run(i, b, hidden)` later calls block i exactly as the full model calls it on batch b: its own attention
mask (sliding-window or full, Gemma 2/3), its own position embeddings (local or global rope, Gemma 3),
its own everything else. Replaying one block's arguments for all blocks is wrong wherever blocks differ.

The model must hand each block the very tensor the previous block returned; a model that changes the
hidden states between blocks, or skips a block, cannot be walked block by block and is refused.
Memory: the layer-0 inputs (samples x seq_len x hidden) and the recorded arguments, each tensor moved to
the compute device once however many blocks share it (masks, position embeddings).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError
from ..model.adapters import adapter_for
from ..stream.activations import ActivationStore
from ..stream.shards import streamed_blocks


class _StopForward(Exception):
    pass


# one block call: (hidden state passed by keyword?, positional args after the hidden state, keyword args)
_Call = tuple[bool, tuple[Any, ...], dict[str, Any]]


class LayerWalk:
    """The blocks of `model` over `windows` (samples x seq_len token ids) in batches of `batch_size`.

    inputs: layer 0's input hidden states per batch, on `device` (a boundary of `activations`, a plain list by
    default). stack_name, layers: the block stack.
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device | str,
                 activations: ActivationStore | None = None) -> None:
        self.device = torch.device(device)
        adapter = adapter_for(model)
        self.stack_name, self.layers = adapter.layer_stack(model)
        self.activations = activations or ActivationStore()
        self._streamed = streamed_blocks(model)
        self.inputs = self.activations.boundary()
        self._calls: list[list[_Call]] = [[] for _ in self.layers]  # [layer][batch]
        memo: dict[int, Any] = {}
        self.tuple_outputs: bool | None = None  # whether the model reads a block's output as (hidden, ...)
        for batch in windows.split(batch_size) if windows.shape[0] else ():  # no windows: no batch
            hidden, calls, self.tuple_outputs = _record_batch(model, self.stack_name, self.layers,
                                                              adapter.forward_inputs(batch), self.tuple_outputs)
            self.inputs.append(hidden.to(self.device))
            for per_layer, call in zip(self._calls, calls):
                kw, args, kwargs = call
                per_layer.append((kw, _to_device(args, self.device, memo), _to_device(kwargs, self.device, memo)))

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def batches(self) -> int:
        return len(self.inputs)

    def prefix(self, index: int) -> str:
        """Module-name prefix of block `index`, e.g. 'model.layers.3.'."""
        return f"{self.stack_name}.{index}."

    @contextlib.contextmanager
    def placed(self, index: int) -> Iterator[nn.Module]:
        """Block `index` on the compute device for the duration, then back where it was (a streamed model's
        block is read from its shards and released after: lrc.stream.shards)."""
        layer = self._streamed.load(index) if self._streamed else self.layers[index]
        home = next(layer.parameters()).device
        layer.to(self.device)
        try:
            yield layer
        finally:
            layer.to(home)
            if self._streamed:
                self._streamed.release(index)

    def run(self, index: int, batch: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block `index` on `hidden` with the arguments the full model passes it on batch `batch`."""
        by_keyword, args, kwargs = self._calls[index][batch]
        layer = self.layers[index]
        out = layer(*args, hidden_states=hidden, **kwargs) if by_keyword else layer(hidden, *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    @contextlib.contextmanager
    def blocks_bypassed(self, last_output: torch.Tensor) -> Iterator[None]:
        """While open, the model's forward skips its blocks and continues from `last_output`.

        Every block but the last returns its hidden states unchanged, the last returns `last_output`: a
        forward of the model then computes only what lies around the blocks (embeddings, which nothing
        uses, then the final norm, the head and the loss) on the last block's output `last_output`.
        """
        last = len(self.layers) - 1

        def bypass(index: int) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                hidden = last_output if index == last else (args[0] if args else kwargs["hidden_states"])
                return (hidden,) if self.tuple_outputs else hidden

            return forward

        with _forwards_replaced(self.layers, bypass):
            yield


def _record_batch(
    model: nn.Module, stack_name: str, layers: nn.ModuleList, inputs: dict[str, Any], tuple_outputs: bool | None
) -> tuple[torch.Tensor, list[_Call], bool]:
    """(layer 0's input hidden states, every block's call, tuple_outputs) for one batch, without running any block.

    tuple_outputs: whether the model reads a block's output as a tuple (hidden, ...) (Falcon, Bloom, MPT take
    `outputs[0]`) rather than the hidden states themselves; None: found out here, bare first (a model that
    indexes a bare tensor reads its first row, and the record fails), then as a tuple."""
    if tuple_outputs is not None:
        return (*_record(model, stack_name, layers, inputs, tuple_outputs), tuple_outputs)
    try:
        return (*_record(model, stack_name, layers, inputs, False), False)
    except Exception as bare_failed:
        try:
            return (*_record(model, stack_name, layers, inputs, True), True)
        except Exception:
            raise bare_failed from None


def _record(
    model: nn.Module, stack_name: str, layers: nn.ModuleList, inputs: dict[str, Any], tuple_outputs: bool
) -> tuple[torch.Tensor, list[_Call]]:
    """_record_batch's record, each block returning its input as (hidden,) when `tuple_outputs`."""
    calls: list[_Call] = []
    passed: list[torch.Tensor] = []

    def recorder(index: int) -> Any:
        def record(*args: Any, **kwargs: Any) -> Any:
            by_keyword = not args
            hidden = kwargs.pop("hidden_states") if by_keyword else args[0]
            if index != len(calls):
                raise ModelLoadError(f"{stack_name}.{index} was called out of order by the model's forward")
            if index > 0 and hidden is not passed[-1]:
                raise ModelLoadError(
                    f"block {index} of {stack_name} does not receive block {index - 1}'s output: the model changes "
                    "the hidden states between blocks, so lrc cannot run it block by block"
                )
            calls.append((by_keyword, tuple(args[1:]), dict(kwargs)))
            passed.append(hidden)
            if index == len(layers) - 1:
                raise _StopForward
            return (hidden,) if tuple_outputs else hidden

        return record

    with _forwards_replaced(layers, recorder), torch.no_grad(), contextlib.suppress(_StopForward):
        model(**inputs)
    if len(calls) != len(layers):
        raise ModelLoadError(
            f"the model's forward called {len(calls)} of the {len(layers)} blocks of {stack_name}; lrc cannot run "
            "it block by block"
        )
    return passed[0].detach(), calls


@contextlib.contextmanager
def _forwards_replaced(layers: nn.ModuleList, forward_for: Callable[[int], Any]) -> Iterator[None]:
    """Every block's forward replaced by `forward_for(index)` for the duration, then restored as it was."""
    wrapped = [layer.__dict__.get("forward") for layer in layers]  # a forward some library set on the instance
    for index, layer in enumerate(layers):
        layer.forward = forward_for(index)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for layer, previous in zip(layers, wrapped):
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous


def _to_device(value: Any, device: torch.device, memo: dict[int, Any]) -> Any:
    """`value` with every tensor inside moved to `device`, each distinct tensor once (memo: id -> moved)."""
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = (value, value.detach().to(device))  # keep the source alive so its id stays unique
        return memo[id(value)][1]
    if isinstance(value, tuple):
        return tuple(_to_device(v, device, memo) for v in value)
    if isinstance(value, list):
        return [_to_device(v, device, memo) for v in value]
    if isinstance(value, dict):
        return {k: _to_device(v, device, memo) for k, v in value.items()}
    return value
