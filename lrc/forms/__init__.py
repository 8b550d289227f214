"""Layer forms: the modules a compressed linear becomes, one registry entry per form.

Every form is an nn.Module class with
  kind: its name in the registry and in the checkpoint's layer map;
  skeleton(in_features, out_features, spec, bias, device, dtype): an empty layer for a checkpoint spec;
  spec(): that spec ({"kind", "rank", ...}), recorded in config.json;
  weight_bytes(value_bytes): bytes of its stored weight tensors (bias excluded);
  dense_weight(): the out x in matrix it computes, for checks against a dense reference.
Adding a form is one class registered here; loading, writing, verification and byte counts follow.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..registry import Registry
from .lowrank import LowRankLinear
from .sparse_linear import LowRankSparseLinear, SparseDictionaryLinear
from .sparse_matrix import SparseMatrix

LAYER_FORMS: Registry[Any] = Registry("layer form")
for _form in (LowRankLinear, SparseDictionaryLinear, LowRankSparseLinear):
    LAYER_FORMS.register(_form.kind)(_form)

CompressedLinear = LowRankLinear | SparseDictionaryLinear | LowRankSparseLinear


def skeleton(
    in_features: int,
    out_features: int,
    spec: dict[str, Any],
    bias: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> CompressedLinear:
    """The empty layer of the form `spec["kind"]` (default low-rank) for a checkpoint's layer spec."""
    kind = spec.get("kind", LowRankLinear.kind)
    if kind not in LAYER_FORMS.names():
        raise ValueError(f"unknown layer form {kind!r} (this lrc knows {LAYER_FORMS.names()})")
    return LAYER_FORMS.get(kind).skeleton(in_features, out_features, spec, bias, device, dtype)


def count_params(model: nn.Module) -> int:
    """Parameters stored once each (a tied embedding / lm_head counts once); a compressed layer's weight
    counts as ⌈its bytes (values, indices or bitmask) / bytes of one value⌉, the parameter-equivalents
    the report and the allocator use."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    for layer in model.modules():
        if isinstance(layer, (SparseDictionaryLinear, LowRankSparseLinear)):
            values = sum(p.numel() for name, p in layer.named_parameters() if name != "bias")
            vb = layer.sparse_factor().values.element_size()
            total += -(-layer.weight_bytes(vb) // vb) - values
    return total


__all__ = [
    "LAYER_FORMS", "CompressedLinear", "LowRankLinear", "LowRankSparseLinear", "SparseDictionaryLinear", "SparseMatrix",
    "count_params", "skeleton",
]
