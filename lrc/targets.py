"""Finding what to compress by walking modules: the decoder layer stack and the nn.Linear layers inside it."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from .errors import ModelLoadError


def decoder_layers(model: Any) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the decoder blocks: the first one with num_hidden_layers entries."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    count = getattr(text_config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (count is None or len(module) == count):
            return name, module
    raise ModelLoadError(
        f"no decoder layer stack found in {type(model).__name__} "
        f"(searched for an nn.ModuleList of num_hidden_layers={count} blocks)"
    )


def target_linears(model: nn.Module, exclude: list[str] | None = None) -> dict[str, nn.Linear]:
    """{full module name: nn.Linear} for every nn.Linear inside the decoder layers, minus `exclude` regexes.

    Embeddings and lm_head sit outside the decoder layers and are never targeted.
    """
    stack_name, stack = decoder_layers(model)
    patterns = [re.compile(p) for p in exclude or []]
    found: dict[str, nn.Linear] = {}
    for index, layer in enumerate(stack):
        for sub_name, module in layer.named_modules():
            full = f"{stack_name}.{index}.{sub_name}"
            if isinstance(module, nn.Linear) and not any(p.search(full) for p in patterns):
                found[full] = module
    if not found:
        raise ModelLoadError(
            f"nothing to compress in {type(model).__name__}: no torch.nn.Linear module inside the "
            f"{len(stack)} decoder layers of {stack_name!r}"
            + (f" after excluding {exclude}" if exclude else "")
        )
    return found


def matrix_type(name: str) -> str:
    """The module name without its layer index, e.g. 'model.layers.3.self_attn.q_proj' -> 'self_attn.q_proj'."""
    return re.sub(r"^.*?\.\d+\.", "", name)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the submodule called `name` (e.g. 'model.layers.0.mlp.up_proj') is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
