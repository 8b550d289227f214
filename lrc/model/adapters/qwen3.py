"""Qwen3: the Llama layout with q/k norms inside the attention (not projections)."""

from . import ModelAdapter, register
from .llama import ATTENTION, GATED_MLP, SHARED

QWEN3 = register(ModelAdapter(model_types=("qwen3",), layers="model.layers", projections=ATTENTION + GATED_MLP,
                              shared_inputs=SHARED))
