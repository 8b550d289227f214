"""Gemma 2: the Llama projections; layers alternate sliding-window and full attention (config.layer_types),
so each layer gets its own mask, which the layer walker records per layer."""

from . import ModelAdapter, register
from .llama import ATTENTION, GATED_MLP, SHARED

GEMMA2 = register(ModelAdapter(model_types=("gemma2",), layers="model.layers", projections=ATTENTION + GATED_MLP,
                               shared_inputs=SHARED))
