"""Qwen3-MoE: Llama attention; each block's experts (fused in transformers) unfused into
mlp.experts.E.{gate,up,down}_proj, the Hub checkpoints' names. Blocks listed in mlp_only_layers keep a
dense gated MLP. The router (mlp.gate) is not compressed."""

from . import ExpertLayout, ModelAdapter, register
from .llama import ATTENTION, GATED_MLP

QWEN3_MOE = register(ModelAdapter(
    model_types=("qwen3_moe",), layers="model.layers",
    projections=ATTENTION + GATED_MLP + ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj", "mlp.experts.*.down_proj"),
    shared_inputs=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"),
                   ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj")),
    experts=ExpertLayout("mlp.experts"),
))
