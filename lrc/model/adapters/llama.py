"""Llama-style decoders: q/k/v/o attention and a gated (gate/up/down) MLP under model.layers."""

from . import ModelAdapter, register

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
GATED_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SHARED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))

LLAMA = register(ModelAdapter(model_types=("llama",), layers="model.layers", projections=ATTENTION + GATED_MLP,
                              shared_inputs=SHARED))
