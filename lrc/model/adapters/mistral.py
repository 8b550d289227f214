"""Mistral: the Llama layout (sliding-window attention arrives as each layer's own mask)."""

from . import ModelAdapter, register
from .llama import ATTENTION, GATED_MLP, SHARED

MISTRAL = register(ModelAdapter(model_types=("mistral",), layers="model.layers", projections=ATTENTION + GATED_MLP,
                                shared_inputs=SHARED))
