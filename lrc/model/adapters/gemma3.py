"""Gemma 3 text models: as Gemma 2, and local layers also use their own rotary embedding (local vs global
rope base), passed per layer like the masks. The multimodal `gemma3` (vision tower + text) has no adapter."""

from . import ModelAdapter, register
from .llama import ATTENTION, GATED_MLP, SHARED

GEMMA3 = register(ModelAdapter(model_types=("gemma3_text",), layers="model.layers", projections=ATTENTION + GATED_MLP,
                               shared_inputs=SHARED))
