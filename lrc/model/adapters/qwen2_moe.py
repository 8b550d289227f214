"""Qwen2-MoE: Qwen2 attention (q/k/v biases); a mixture-of-experts block holds the routed experts (fused in
transformers) unfused into mlp.experts.E.{gate,up,down}_proj, the Hub checkpoints' names, and a shared
expert (mlp.shared_expert.{gate,up,down}_proj) every token goes through. A block listed in mlp_only_layers
(or off decoder_sparse_step) has a dense gated MLP instead; a model may be either in every block. Not
compressed: the router (mlp.gate) and the shared expert's scalar gate (mlp.shared_expert_gate, hidden -> 1):
a few logits, nothing to save, and their error changes the routing."""

from . import ExpertLayout, ModelAdapter, register
from .llama import ATTENTION, GATED_MLP
from .qwen3_moe import EXPERTS

SHARED_EXPERT = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj")

QWEN2_MOE = register(ModelAdapter(
    model_types=("qwen2_moe",), layers="model.layers", projections=ATTENTION,
    one_of=(GATED_MLP, EXPERTS + SHARED_EXPERT),
    shared_inputs=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"),
                   ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"),
                   ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")),
    experts=ExpertLayout("mlp.experts"),
))
