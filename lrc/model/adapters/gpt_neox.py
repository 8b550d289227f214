"""GPT-NeoX (Pythia): fused query_key_value; attention and MLP read two different norms of one input
(parallel residual), so no two projections share an input."""

from . import ModelAdapter, register

GPT_NEOX = register(ModelAdapter(
    model_types=("gpt_neox",), layers="gpt_neox.layers",
    projections=("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
))
