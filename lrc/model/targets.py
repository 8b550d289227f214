"""The targeted projections of a model and module surgery on them, through the model's adapter."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from ..errors import ConfigError, ModelLoadError
from .adapters import adapter_for
from .projection import Projection


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted path, nn.ModuleList) of the model's block stack, as its adapter finds it."""
    return adapter_for(model).layer_stack(model)


def target_linears(model: nn.Module, exclude: list[str] | None = None) -> dict[str, Projection]:
    """{full module name: Projection} of every projection the adapter targets, minus `exclude` regexes.

    Embeddings and the LM head sit outside the layer stack and are never targeted.
    """
    found = adapter_for(model).targets(model)
    patterns = [re.compile(p) for p in exclude or []]
    kept = {name: p for name, p in found.items() if not any(pattern.search(name) for pattern in patterns)}
    if not kept:
        stack_name, stack = decoder_layers(model)
        raise ModelLoadError(
            f"nothing to compress in {type(model).__name__}: no torch.nn.Linear or Conv1D projection inside the "
            f"{len(stack)} layers of {stack_name!r}" + (f" after excluding {exclude}" if exclude else "")
        )
    return kept


def quantization_method(config: Any) -> str | None:
    """config.json's quantization_config.quant_method ("bitsandbytes", "gptq", "lrc", ...), None without one."""
    quantization = getattr(config, "quantization_config", None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
    return None if method is None else str(getattr(method, "value", method))


def check_not_compressed(spec: str, config: Any, model: nn.Module | None = None) -> None:
    """ConfigError when the model `spec` (its transformers config, and the model when built) already holds layers
    compressed by lrc (an lrc output, or a model an earlier compress changed in place): a second pass would
    target the layers left dense only, and its rank map would list those alone."""
    from ..forms import LAYER_FORMS

    forms = tuple(LAYER_FORMS.get(kind) for kind in LAYER_FORMS.names())
    count = 0 if model is None else sum(isinstance(module, forms) for module in model.modules())
    if count or quantization_method(config) == "lrc":
        raise ConfigError(
            f"{spec} is already compressed by lrc: compress the model it was made from (lrc.compress changes a model "
            f"it is given in place), or its dense form, written by `lrc export {spec} --dense -o DIR`"
        )


def warn_left_out_heads(spec: str, config: Any, tensor_names: Any) -> None:
    """A warning when the checkpoint `spec` carries a task head the class lrc compresses does not have (a BERT
    masked-LM or classifier head, loaded as BertModel): the output has no head."""
    import warnings

    adapter = adapter_for(config)
    heads = sorted(n for n in tensor_names if adapter.unused_heads and n.startswith(adapter.unused_heads))
    if heads:
        shown = ", ".join(heads[:3]) + (f" and {len(heads) - 3} more" if len(heads) > 3 else "")
        architectures = getattr(config, "architectures", None) or ["model with a task head"]
        warnings.warn(f"lrc: {spec} is a {architectures[0]}: lrc compresses its base model, and the output has no "
                      f"task head ({shown} left out); load it with {adapter.auto_class}, or fine-tune a new head "
                      "on it", stacklevel=2)


def matrix_type(name: str) -> str:
    """The module name without its layer index, e.g. 'model.layers.3.self_attn.q_proj' -> 'self_attn.q_proj'."""
    return re.sub(r"^.*?\.\d+\.", "", name)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the submodule called `name` (e.g. 'model.layers.0.mlp.up_proj') is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def skip_init_of_parents(model: nn.Module, names: list[str]) -> None:
    """Tell transformers not to initialise the parents of the projections lrc replaced.

    While loading, transformers runs each module's `_init_weights`, and some reach for a child's weight
    by name (GPT-2: attn.c_proj.weight), which an lrc layer (factors, no `weight`) does not have. Every
    tensor of these modules comes from the checkpoint, so skipping their initialisation loses nothing.
    """
    for name in names:
        parent = name.rpartition(".")[0]
        parent_module: Any = model.get_submodule(parent)
        parent_module._is_hf_initialized = True
