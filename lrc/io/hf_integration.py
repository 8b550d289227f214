"""Loading lrc checkpoints with plain `transformers.AutoModelForCausalLM.from_pretrained` after `import lrc`.

An lrc checkpoint's config.json carries
    "quantization_config": {"quant_method": "lrc", "format_version": 2, "ranks": {module name: rank},
                            "sparse": {module name: {"kind", "rank", "nnz", "layout"}}}
and registering a transformers quantizer for "lrc" lets from_pretrained swap those nn.Linear modules for
`LowRankLinear` or a sparse layer (on the meta device, before any weight is read), so the factors load
like any weight. Before any weight is read the files are checked against that skeleton (see
lrc.load_check): a deleted factor tensor, a layer missing from the rank map, or any tensor missing or extra
is an error naming it. Format 1 (ranks only, before sparse layers existed) still loads.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import ModelLoadError
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
    from ..model.projection import MATRIX_MODULES, Projection
    from ..model.targets import replace_module

    for name in [*(sparse or {}), *ranks]:
        linear = model.get_submodule(name) if _has_module(model, name) else None
        if not isinstance(linear, MATRIX_MODULES):
            raise ModelLoadError(f"the rank map in config.json names {name}, which is not a linear layer of "
                                 f"{type(model).__name__}")
    for name in set(sparse or {}) & set(ranks):
        raise ModelLoadError(f"the rank map in config.json gives {name} both a rank and a sparse layer")
    for name, rank in ranks.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ModelLoadError(f"the rank map in config.json gives {name} rank {rank!r}; a rank is a positive integer")
    specs = {**(sparse or {}), **{name: {"kind": LowRankLinear.kind, "rank": rank} for name, rank in ranks.items()}}
    for name, spec in specs.items():
        linear = Projection(model.get_submodule(name))  # an nn.Linear, or a Conv1D seen as W = weight.T
        weight = linear.weight
        replace_module(model, name, skeleton(
            linear.in_features, linear.out_features, spec, linear.bias is not None, weight.device, weight.dtype
        ))


def fuse_shared_inputs(model: Any) -> int:
    """Fuse the first factors of each group of compressed layers that read one input (the adapter's
    shared_inputs, per block); returns the number of groups fused."""
    from ..forms.fused import fuse_down_factors
    from ..model.adapters import adapter_for

    adapter = adapter_for(model)
    stack_name, stack = adapter.layer_stack(model)
    fused = 0
    for block in stack:
        for group in adapter.shared_inputs:
            if any(any(c in name for c in "*?[") for name in group):
                continue  # per-expert groups: not fused
            layers = [block.get_submodule(name) for name in group if _has_module(block, name)]
            fused += fuse_down_factors(layers) is not None
    return fused


def copy_indices_out_of_file(model: Any) -> int:
    """A model loaded at another dtype than its files holds converted copies of the values, but its sparse
    layers' bitmasks / indices (integers, never converted) still point into the memory-mapped checkpoint,
    keeping the whole mapping (every page the conversion read) resident. Those are copied out (a few % of
    the values' bytes) so the mapping is released; returns the number of tensors copied."""
    from ..forms.fused import file_mappings
    from ..forms.sparse_matrix import SparseMatrix

    mappings = file_mappings()

    def mapped(t: Any) -> bool:
        return any(start <= t.data_ptr() < end for start, end in mappings)

    copied = 0
    for matrix in model.modules():
        if isinstance(matrix, SparseMatrix) and not mapped(matrix.values):
            for name, buffer in list(matrix.named_buffers(recurse=False)):
                if mapped(buffer):
                    setattr(matrix, name, buffer.clone())
                    copied += 1
    return copied


_BASE_CONVERSIONS_TAKE_MODEL = "model" in inspect.signature(HfQuantizer.update_weight_conversions).parameters


def _has_module(model: Any, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def save_pretrained_with_code(model: Any, save_directory: Any, *args: Any, **kwargs: Any) -> None:
    """The loaded model's `save_pretrained`: transformers' own, then lrc's modeling code next to the weights, so
    the folder loads without lrc as the output it came from does (its config.json's `auto_map` names that code).
    Where transformers wrote nothing (not the main process, a path that is a file) nothing is added; with
    `push_to_hub=True` the upload (made inside transformers' call) does not carry the code: `push_to_hub` does."""
    from .remote_code import write_remote_code

    type(model).save_pretrained(model, save_directory, *args, **kwargs)
    is_main_process = kwargs.get("is_main_process", args[0] if args else True)
    folder = Path(save_directory)
    if is_main_process and (folder / "config.json").is_file():
        write_remote_code(model, folder)


class LrcHfQuantizer(HfQuantizer):
    """Builds the low-rank skeleton before weights load and checks the files against it; nothing afterwards."""

    requires_calibration = True
    quantization_config: LrcConfig
    _prepared_model: Any = None

    def _process_model_before_weight_loading(self, model: Any, checkpoint_files: Any = None, **kwargs: Any) -> Any:
        """Swap in the factorized layers, then check the files against them before any weight is read:
        a factor tensor missing, misshapen or not in the rank map, or any other tensor missing or extra,
        is a ModelLoadError naming it (transformers would fill or drop it silently)."""
        from ..load_check import check_factor_tensors, check_skeleton_against_files, checkpoint_shapes
        from ..model.adapters import adapter_for
        from ..model.targets import skip_init_of_parents

        config = self.quantization_config
        self._prepared_model = model
        adapter = adapter_for(model)
        adapter.prepare(model)  # the structure lrc wrote: fused experts unfused
        replace_with_low_rank(model, config.ranks, config.sparse)
        skip_init_of_parents(model, [*config.ranks, *config.sparse])
        if checkpoint_files:
            adapter.leave_out_parts(model, checkpoint_shapes(checkpoint_files))  # a masked-LM BERT's absent pooler
            check_factor_tensors(model, checkpoint_files, [*config.ranks, *config.sparse])
            check_skeleton_against_files(model, checkpoint_files)
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        """Layers reading one input (the adapter's shared_inputs: q/k/v, gate/up) share one matmul for their
        first factors (see lrc.forms.fused); the memory loading freed goes back to the OS."""
        from ..forms.fused import release_freed_heap

        fuse_shared_inputs(model)
        copy_indices_out_of_file(model)
        release_freed_heap()
        model.save_pretrained = functools.partial(save_pretrained_with_code, model)  # pickles, unlike a bound method
        return model

    def update_weight_conversions(self, weight_conversions: Any, model: Any = None) -> Any:
        """Drop transformers' expert merges for the experts lrc wrote unfused. transformers 5.8-5.21 pass no
        model: it is then the one `_process_model_before_weight_loading` prepared (that runs first)."""
        from ..model.experts import drop_merges_into_unfused

        model = self._prepared_model if model is None else model
        if _BASE_CONVERSIONS_TAKE_MODEL:
            conversions = super().update_weight_conversions(weight_conversions, model)
        else:
            conversions = super().update_weight_conversions(weight_conversions)  # type: ignore[call-arg]
        return drop_merges_into_unfused(conversions, model)

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
