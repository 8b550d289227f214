"""GPT-2: transformers' Conv1D projections (weights stored in x out: W = weight.T); c_attn is fused q/k/v."""

from . import ModelAdapter, register

GPT2 = register(ModelAdapter(
    model_types=("gpt2",), layers="transformer.h",
    projections=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
))
