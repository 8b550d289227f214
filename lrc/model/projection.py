"""`Projection`: one targeted matrix W (out x in) and the module that applies it, y = W x + b.

An nn.Linear stores W as it is (out x in). transformers' `Conv1D` (GPT-2) computes y = x A + b with
A = W.T stored (in x out), so its matrix is the transposed view `conv.weight.T`. A compressed projection
of either kind is replaced by a layer of lrc's own (LowRankLinear, ...) that computes the same y = W' x + b,
so the checkpoint holds factors in lrc's layout whatever the original module was; the projections kept
dense stay the original modules and are written in the original layout, which transformers loads back.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

MATRIX_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


class Projection:
    """A view of an nn.Linear or Conv1D as the matrix W (out_features x in_features) and bias b."""

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, MATRIX_MODULES):
            raise TypeError(f"a Projection wraps nn.Linear or Conv1D, not {type(module).__name__}")
        self.module = module

    @property
    def weight(self) -> torch.Tensor:
        """W (out x in): the Linear's weight, or the transpose of the Conv1D's (a view, no copy)."""
        weight = self.module.weight
        assert isinstance(weight, torch.Tensor)
        return weight.T if isinstance(self.module, Conv1D) else weight

    @property
    def bias(self) -> torch.Tensor | None:
        bias = self.module.bias
        return bias if isinstance(bias, torch.Tensor) else None

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def __repr__(self) -> str:
        return f"Projection({type(self.module).__name__}, out={self.out_features}, in={self.in_features})"
