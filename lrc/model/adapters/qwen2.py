"""Qwen2: the Llama layout; q/k/v carry biases."""

from . import ModelAdapter, register
from .llama import ATTENTION, GATED_MLP, SHARED

QWEN2 = register(ModelAdapter(model_types=("qwen2",), layers="model.layers", projections=ATTENTION + GATED_MLP,
                              shared_inputs=SHARED))
