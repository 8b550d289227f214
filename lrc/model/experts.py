"""Mixture-of-experts blocks: transformers' fused expert weights, unfused into one nn.Linear per matrix.

transformers stores the experts of a block as two 3-D parameters, gate_up_proj (E x 2I x H, the gate rows
first, then the up rows) and down_proj (E x H x I), applied with functional calls that no module hook
sees. lrc replaces such a module by `UnfusedExperts`: E `ExpertMLP`s with nn.Linear gate, up and down
projections holding exactly those slices, and the same routing loop as transformers' eager forward:
each expert runs on the tokens routed to it, its output scaled by the routing weight and added into the
token's output. So every expert matrix is an ordinary projection: its input statistics are sums over the
tokens routed to that expert only, and a compressed expert is a LowRankLinear like any other. The unfused
names are those of the architecture's Hub checkpoints, so a dense checkpoint written from an unfused
model loads with transformers' own conversions.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), its three projections named as `names` = (gate, up, down)."""

    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module, act_fn: nn.Module,
                 names: tuple[str, str, str]) -> None:
        super().__init__()
        self.names = names
        for name, module in zip(names, (gate, up, down)):
            self.add_module(name, module)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, name) for name in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class UnfusedExperts(nn.ModuleList):
    """A drop-in for a fused experts module: forward(hidden (T x H), top_k_index (T x k), top_k_weights (T x k))."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        count = len(self)
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            routed = nn.functional.one_hot(top_k_index, num_classes=count + 1).permute(2, 1, 0)  # (E+1) x k x T
            hit = torch.greater(routed.sum(dim=(-1, -2)), 0).nonzero()
        for index in hit[:, 0].tolist():
            if index == count:  # the padding slot some routers use for dropped tokens
                continue
            top_k_pos, token_idx = torch.where(routed[index])
            out = self[index](hidden_states[token_idx]) * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


def is_fused_experts(module: nn.Module) -> bool:
    gate_up = getattr(module, "gate_up_proj", None)
    return isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3


def unfuse_experts(module: nn.Module, names: tuple[str, str, str], where: str) -> UnfusedExperts:
    """The UnfusedExperts equal to a fused experts module (its weights copied, on its device and dtype)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    act_fn = getattr(module, "act_fn", None)
    plain = (not getattr(module, "is_transposed", False) and not getattr(module, "has_bias", False)
             and getattr(module, "gate_up_proj_bias", None) is None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3
            and down.dim() == 3 and isinstance(act_fn, nn.Module) and plain
            and gate_up.shape[0] == down.shape[0] and gate_up.shape[1] == 2 * down.shape[2]
            and gate_up.shape[2] == down.shape[1]):
        raise ModelLoadError(
            f"{where} ({type(module).__name__}) is not the fused expert layout lrc unfuses: gate_up_proj "
            "(experts x 2·inter x hidden) and down_proj (experts x hidden x inter) without biases, and act_fn"
        )
    experts, inter = down.shape[0], down.shape[2]
    result = UnfusedExperts()
    for e in range(experts):
        linears = []
        for weight in (gate_up[e, :inter], gate_up[e, inter:], down[e]):
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
            linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=gate_up.requires_grad)
            linears.append(linear)
        result.append(ExpertMLP(linears[0], linears[1], linears[2], act_fn, names))
    return result


def drop_merges_into_unfused(conversions: list[Any], model: nn.Module) -> list[Any]:
    """transformers' checkpoint conversions without the merges into parameters `model` no longer has.

    transformers merges per-expert checkpoint tensors (experts.E.gate_proj.weight, ...) into the fused
    3-D parameters when it loads. After unfusing, those parameters are gone and the per-expert tensors
    load under their own names, so a merge whose plain-name target matches no parameter is dropped.
    """
    from transformers.core_model_loading import WeightConverter

    names = [name for name, _ in model.named_parameters()]

    def needed(conversion: Any) -> bool:
        if not isinstance(conversion, WeightConverter):
            return True
        targets = [str(t).strip(".") for t in conversion._original_target_patterns]
        if any(re.search(r"[^\w.]", t) for t in targets):
            return True  # a regex target: not one of the expert merges
        return any(t in name for t in targets for name in names)

    return [c for c in conversions if needed(c)]
