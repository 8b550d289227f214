"""Mixtral: Llama attention; each block's experts unfused into mlp.experts.E.{w1 (gate), w3 (up), w2 (down)},
the Hub checkpoints' names. The router (mlp.gate) is not compressed."""

from . import ExpertLayout, ModelAdapter, register
from .llama import ATTENTION

MIXTRAL = register(ModelAdapter(
    model_types=("mixtral",), layers="model.layers",
    projections=ATTENTION + ("mlp.experts.*.w1", "mlp.experts.*.w3", "mlp.experts.*.w2"),
    shared_inputs=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.experts.*.w1", "mlp.experts.*.w3")),
    experts=ExpertLayout("mlp.experts", names=("w1", "w3", "w2")),
))
