"""Qwen3-MoE: Llama attention; each block's experts (fused in transformers) unfused into
mlp.experts.E.{gate,up,down}_proj, the Hub checkpoints' names. A block is a mixture of experts or, listed
in mlp_only_layers (or off decoder_sparse_step), a dense gated MLP: a model may be either in every block
(Qwen3-30B-A3B has no dense block). The router (mlp.gate) is not compressed."""

from . import ExpertLayout, ModelAdapter, register
from .llama import ATTENTION, GATED_MLP

EXPERTS = ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj", "mlp.experts.*.down_proj")

QWEN3_MOE = register(ModelAdapter(
    model_types=("qwen3_moe",), layers="model.layers", projections=ATTENTION, one_of=(GATED_MLP, EXPERTS),
    shared_inputs=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"),
                   ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj")),
    experts=ExpertLayout("mlp.experts"),
))
