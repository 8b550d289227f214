"""OPT: q/k/v/out_proj attention and fc1/fc2 MLP (all with biases) under model.decoder.layers."""

from . import ModelAdapter, register

OPT = register(ModelAdapter(
    model_types=("opt",), layers="model.decoder.layers",
    projections=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    shared_inputs=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),),
))
