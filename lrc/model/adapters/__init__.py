"""Model adapters, one registry keyed by config.model_type; anything else gets the generic fallback.

Adding an architecture is one small file in this folder that calls `register(ModelAdapter(...))`
(every module here is imported when the registry is first used).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from ...errors import ModelLoadError
from .base import CAUSAL_LM, HIDDEN_STATES, ExpertLayout, ModelAdapter

GENERIC = ModelAdapter(model_types=(), layers=None)
"""Unknown model types: the one nn.ModuleList of num_hidden_layers blocks, every nn.Linear/Conv1D in it,
a causal-LM objective; fused experts stay dense."""

_ADAPTERS: dict[str, ModelAdapter] = {}
_loaded = False


def register(adapter: ModelAdapter) -> ModelAdapter:
    for model_type in adapter.model_types:
        if model_type in _ADAPTERS:
            raise ValueError(f"model_type {model_type!r} already has an adapter")
        _ADAPTERS[model_type] = adapter
    return adapter


def _load_all() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for info in pkgutil.iter_modules(__path__):
            if info.name != "base":
                importlib.import_module(f"{__name__}.{info.name}")


def adapter_for(model_or_config: Any) -> ModelAdapter:
    """The adapter of a model, or of a config, by its model_type (GENERIC when none is registered; an encoder
    without an adapter is refused, see `check_not_an_encoder`)."""
    _load_all()
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", "")
    if model_type in _ADAPTERS:
        return _ADAPTERS[model_type]
    check_not_an_encoder(config)
    return GENERIC


def check_not_an_encoder(config: Any) -> None:
    """ModelLoadError for an encoder with no adapter of its own: a model_type transformers has a masked-LM class
    for (ELECTRA, XLM-R, DistilBERT, ...) whose config does not make it a decoder (`is_decoder`). The generic
    adapter would load it through its causal-LM class, where it has one, and that class still attends to later
    tokens: statistics of a next-token loss the model can read the answer of."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", "")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        encoders = sorted(t for t, a in _ADAPTERS.items() if a.objective == HIDDEN_STATES)
        raise ModelLoadError(
            f"model_type {model_type} is an encoder (or encoder-decoder) and lrc has no adapter for it: lrc "
            f"compresses decoders and the encoders {', '.join(encoders)} (an adapter in lrc/model/adapters names "
            "another's layers)"
        )


def registered() -> dict[str, ModelAdapter]:
    """{model_type: adapter} of every registered architecture."""
    _load_all()
    return dict(_ADAPTERS)


__all__ = ["CAUSAL_LM", "GENERIC", "HIDDEN_STATES", "ExpertLayout", "ModelAdapter", "adapter_for", "register", "registered"]
