"""OLMoE: Llama attention (q_norm / k_norm on the projections' outputs, not targeted); each block's experts
(fused in transformers, Qwen3-MoE's layout) unfused into mlp.experts.E.{gate,up,down}_proj, the Hub
checkpoints' names. Every block is an experts block. The router (mlp.gate) is not compressed."""

from . import ExpertLayout, ModelAdapter, register
from .llama import ATTENTION
from .qwen3_moe import EXPERTS

OLMOE = register(ModelAdapter(
    model_types=("olmoe",), layers="model.layers", projections=ATTENTION + EXPERTS,
    shared_inputs=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                   ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj")),
    experts=ExpertLayout("mlp.experts"),
))
