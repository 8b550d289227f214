"""Phi-3: fused qkv_proj (q, k, v stacked: (q + 2 kv) x hidden) and gate_up_proj (2 inter x hidden).

Each fused projection is one matrix, factorized with one rank, as the checkpoint stores it; the layer's
forward splits its output as before."""

from . import ModelAdapter, register

PHI3 = register(ModelAdapter(
    model_types=("phi3",), layers="model.layers",
    projections=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
))
