"""`LowRankLinear`: y = up(down(x)), the drop-in replacement for a factorized nn.Linear."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .cpu_kernels import gradients_flow, linear, lowrank_linear


def parameter(module: nn.Module, name: str) -> Any:
    """module.<name> (a tensor or None), read from its parameter dict where it is there: a decoded token reads
    every factor, and nn.Module's attribute lookup costs about a microsecond each (a parametrized weight, kept
    elsewhere, is read the usual way)."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


def submodule(module: nn.Module, name: str) -> Any:
    """module.<name> for a child module, read from its module dict (see `parameter`)."""
    return module._modules[name]


def first_product(layer: nn.Module, factor: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """factor(x), taken from the group's one stacked product when the layer is fused (see fused.py); the layer's
    own product where gradients flow (the stacked weight is not the layer's parameter) and in a graph
    torch.compile traces (the group's state is Python's, checked by address). A layer whose factor is no longer
    its view of the stacked weight (the model was cast or moved) leaves the group, which is freed when the last
    one has left."""
    shared = getattr(layer, "shared_input", None)
    weight = parameter(factor, "weight")
    if shared is not None and not torch.compiler.is_compiling():
        if not shared[0].is_view_of_weight(weight, shared[1]):
            setattr(layer, "shared_input", None)  # noqa: B010  (any FUSABLE form)
        elif shared[0].takes(x) and not gradients_flow(x, weight):
            return shared[0].share(x, shared[1])
    return linear(x, weight)


class LowRankLinear(nn.Module):
    """A linear layer stored as two factors: W ≈ up.weight @ down.weight.

    down.weight: rank x in_features,  up.weight: out_features x rank,  up.bias: out_features (if any).
    Costs rank · (in + out) parameters and two small matmuls instead of in · out.
    """

    kind = "low-rank"
    shared_input: tuple[Any, int] | None = None  # (SharedInputProduct, index) once fused (see fused.py)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(
        cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None
    ) -> LowRankLinear:
        """Build from up (m x r) and down (r x n) factors, cast to `dtype` (default: up's dtype)."""
        dtype = dtype or up.dtype
        layer = cls(down.shape[1], up.shape[0], up.shape[1], bias=bias is not None, device="meta", dtype=dtype)
        layer.down.weight = nn.Parameter(down.detach().to(dtype).contiguous(), requires_grad=False)
        layer.up.weight = nn.Parameter(up.detach().to(dtype).contiguous(), requires_grad=False)
        if bias is not None:
            layer.up.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
        return layer

    @classmethod
    def skeleton(
        cls,
        in_features: int,
        out_features: int,
        spec: dict[str, Any],
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> LowRankLinear:
        """An empty layer for a checkpoint spec {"rank": r}, ready for its weights."""
        return cls(in_features, out_features, int(spec["rank"]), bias, device, dtype)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": self.rank}

    def weight_bytes(self, value_bytes: int) -> int:
        """Bytes of the two factors at `value_bytes` per value (bias excluded, as for dense)."""
        return self.rank * (self.in_features + self.out_features) * value_bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # functional calls, not the factor modules': at one token per call their hook machinery cost as much as the
        # matmul. A few bfloat16 tokens on CPU (decoding) run both products in one kernel call; otherwise two
        # products (the first shared with the layers reading the same input, see fused.py)
        down, up = submodule(self, "down"), submodule(self, "up")
        up_weight, bias = parameter(up, "weight"), parameter(up, "bias")
        y = lowrank_linear(x, parameter(down, "weight"), up_weight, bias)
        return y if y is not None else linear(first_product(self, down, x), up_weight, bias)

    def dense_weight(self) -> torch.Tensor:
        """The product up @ down (out x in), for checks against a dense reference."""
        return self.up.weight @ self.down.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
