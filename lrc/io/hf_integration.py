"""Loading lrc checkpoints with plain `transformers.AutoModelForCausalLM.from_pretrained` after `import lrc`.

An lrc checkpoint's config.json carries
    "quantization_config": {"quant_method": "lrc", "format_version": 2, "ranks": {module name: rank},
                            "sparse": {module name: {"kind", "rank", "nnz", "layout"}}}
and registering a transformers quantizer for "lrc" lets from_pretrained swap those nn.Linear modules for
`LowRankLinear` or a sparse layer (on the meta device, before any weight is read), so the factors load
like any weight. Format 1 (ranks only, before sparse layers existed) still loads.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..forms.lowrank import LowRankLinear

QUANT_METHOD = "lrc"
FORMAT_VERSION = 2
READS = (1, 2)


class LrcConfig(QuantizationConfigMixin):
    """The layer map of an lrc checkpoint, as transformers sees it: ranks, and sparse layer specs."""

    def __init__(
        self,
        ranks: dict[str, int] | None = None,
        format_version: int = FORMAT_VERSION,
        sparse: dict[str, dict[str, Any]] | None = None,
        **kwargs: Any,
    ):
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]
        self.format_version = format_version
        self.ranks = dict(ranks or {})
        self.sparse = dict(sparse or {})
        if format_version not in READS:
            raise ValueError(f"lrc checkpoint format {format_version} is not supported (this lrc reads {READS})")

    def to_dict(self) -> dict[str, Any]:
        out = {"quant_method": QUANT_METHOD, "format_version": self.format_version, "ranks": dict(self.ranks)}
        return out | ({"sparse": dict(self.sparse)} if self.sparse else {})


def replace_with_low_rank(model: Any, ranks: dict[str, int], sparse: dict[str, dict[str, Any]] | None = None) -> None:
    """Swap each named nn.Linear for a LowRankLinear of the given rank, or the sparse layer its spec
    describes, with the same device and dtype."""
    from ..forms import skeleton
    from ..model.projection import Projection
    from ..model.targets import replace_module

    for name, spec in (sparse or {}).items():
        linear = Projection(model.get_submodule(name))  # an nn.Linear, or a Conv1D seen as W = weight.T
        weight = linear.weight
        replace_module(model, name, skeleton(
            linear.in_features, linear.out_features, spec, linear.bias is not None, weight.device, weight.dtype
        ))
    for name, rank in ranks.items():
        linear = Projection(model.get_submodule(name))  # an nn.Linear, or a Conv1D seen as W = weight.T
        weight = linear.weight
        layer = LowRankLinear(
            linear.in_features,
            linear.out_features,
            rank,
            bias=linear.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        replace_module(model, name, layer)


class LrcHfQuantizer(HfQuantizer):
    """Builds the low-rank skeleton before weights load; nothing to do afterwards."""

    requires_calibration = True
    quantization_config: LrcConfig

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        from ..model.adapters import adapter_for
        from ..model.targets import skip_init_of_parents

        adapter_for(model).prepare(model)  # the structure lrc wrote: fused experts unfused
        replace_with_low_rank(model, self.quantization_config.ranks, self.quantization_config.sparse)
        skip_init_of_parents(model, [*self.quantization_config.ranks, *self.quantization_config.sparse])
        return model

    def update_weight_conversions(self, weight_conversions: Any, model: Any) -> Any:
        from ..model.experts import drop_merges_into_unfused

        return drop_merges_into_unfused(super().update_weight_conversions(weight_conversions, model), model)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def register() -> None:
    """Register the "lrc" quantization method with transformers (idempotent)."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(LrcConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LrcHfQuantizer)
