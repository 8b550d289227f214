"""`ModelAdapter`: what lrc needs to know about one architecture, stated as data.

- the layer stack: the nn.ModuleList of decoder (or encoder) blocks, walked one block at a time;
- the projections to compress in each block, as layer-relative names (`*` matches one expert index);
  embeddings and the LM head sit outside the blocks and are never targeted, so tied embeddings stay tied;
- which projections read one tensor (q/k/v, gate/up): they share one input Gram. Declared here for
  the reader and checked by the tests; at run time sharing is found by tensor identity;
- fused projections (Phi-3 qkv_proj, gate_up_proj; GPT-2 c_attn; GPT-NeoX query_key_value) are one
  matrix each, as the checkpoint stores them: one rank for the stacked q/k/v;
- how a non-nn.Linear projection maps to a matrix: see `Projection` (GPT-2 Conv1D: W = weight.T);
- mixture-of-experts blocks: `experts` names the fused expert modules, unfused at load into one
  nn.Linear per expert matrix (see lrc.model.experts); `one_of` the forms a block's MLP may take (a dense
  MLP, an experts block), as a model may be mixture-of-experts in every block, in some or in none;
- routers are never targeted: the adapters do not name them (transformers' routers hold a bare weight,
  not an nn.Linear), and the generic fallback skips an nn.Linear with one output (Qwen2-MoE's
  shared_expert_gate) or one per routed expert (a router): a few logits, nothing to save by factorizing
  them, and their error changes the routing;
- the training objective of the output-gradient statistics (`loss`) and, from it, the model class:
  a causal LM's next-token loss through its own head, or for an encoder (loaded with AutoModel, no task
  head, nothing random) a Gaussian probe of its final hidden states;
- how to run one layer with the arguments the full model passes it needs nothing per architecture:
  the layer walker records each layer's own call (lrc.stats.walker).
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import ModelLoadError
from ...forms import CompressedLinear
from ..experts import UnfusedExperts, is_fused_experts, unfuse_experts
from ..projection import MATRIX_MODULES, Projection

CAUSAL_LM = "causal-lm"
HIDDEN_STATES = "hidden-states"


@dataclass(frozen=True)
class ExpertLayout:
    """Where a block keeps fused experts, and the names of each expert's (gate, up, down) projections once unfused."""

    path: str
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelAdapter:
    """One architecture (or several sharing a layout), keyed by config.model_type.

    layers: dotted path of the block stack in the model that `auto_class` loads; None: search for the one
    nn.ModuleList of num_hidden_layers blocks (the generic fallback).
    projections: fnmatch patterns of layer-relative module names to compress ("*": every nn.Linear/Conv1D).
    one_of: alternative sets of patterns (a dense MLP, an experts block), also compressed: every block holds
    the whole of at least one, and a set may be held by no block (a model MoE in every block, or in none).
    shared_inputs: groups of projections reading one tensor (fused projections are one matrix: see the adapters).
    objective: CAUSAL_LM or HIDDEN_STATES (see `loss`). experts: fused mixture-of-experts modules, if any.
    unused_heads: name prefixes of task heads a checkpoint may carry that `auto_class` does not build (an
    encoder's masked-LM or classifier head): not loaded, so not written to the output; never filled at random.
    optional_parts: (module name, from_pretrained flag) of parts `auto_class` builds by default that a
    checkpoint may lack (BERT's pooler in a masked-LM checkpoint): built only when the checkpoint has its tensors.
    """

    model_types: tuple[str, ...]
    layers: str | None
    projections: tuple[str, ...] = ("*",)
    one_of: tuple[tuple[str, ...], ...] = ()
    shared_inputs: tuple[tuple[str, ...], ...] = ()
    objective: str = CAUSAL_LM
    experts: ExpertLayout | None = None
    unused_heads: tuple[str, ...] = ()
    optional_parts: tuple[tuple[str, str], ...] = ()

    def build_flags(self, tensor_names: Iterable[str]) -> dict[str, bool]:
        """from_pretrained flags that leave out the optional parts the checkpoint has no tensors for."""
        names = list(tensor_names)
        return {flag: False for part, flag in self.optional_parts if not any(f"{part}." in n for n in names)}

    def left_out_flags(self, model: nn.Module) -> dict[str, bool]:
        """The flags that build `model` as it is: those of the optional parts it was built without (set to None)."""
        return {flag: False for part, flag in self.optional_parts if getattr(model, part, ...) is None}

    def leave_out_parts(self, model: nn.Module, tensor_names: Iterable[str]) -> None:
        """Set to None the optional parts of a model already built that the checkpoint has no tensors for, as
        their flag would have built it (a loader that cannot pass the flag: transformers' own from_pretrained)."""
        flags = self.build_flags(tensor_names)
        for part, flag in self.optional_parts:
            if flag in flags and isinstance(getattr(model, part, None), nn.Module):
                setattr(model, part, None)

    @property
    def name(self) -> str:
        return self.model_types[0] if self.model_types else "generic"

    @property
    def auto_class(self) -> str:
        """The transformers auto class that loads the model without any randomly initialised head."""
        return "AutoModelForCausalLM" if self.objective == CAUSAL_LM else "AutoModel"

    def layer_stack(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        """(dotted path, the nn.ModuleList of blocks)."""
        if self.layers is None:
            return _search_layer_stack(model)
        try:
            stack = model.get_submodule(self.layers)
        except AttributeError:
            stack = None
        if not isinstance(stack, nn.ModuleList) or len(stack) == 0:
            raise ModelLoadError(
                f"{type(model).__name__} (model_type {self.name}) has no layer stack at {self.layers!r}, where lrc's "
                f"{self.name} adapter looks for it"
            )
        return self.layers, stack

    @property
    def patterns(self) -> tuple[str, ...]:
        """Every pattern of a projection to compress: `projections`, then those of each `one_of` set."""
        return self.projections + tuple(p for group in self.one_of for p in group)

    def targets(self, model: nn.Module) -> dict[str, Projection]:
        """{full module name: Projection} of every projection named by `projections` or `one_of`, in module order.

        Every pattern of `projections` must match in some layer, every layer must hold a match and the whole
        of one `one_of` set, else ModelLoadError; a projection lrc already compressed (`--stream` builds one
        block at a time) counts as held, but is not a target. Fused experts the adapter does not unfuse stay
        dense: a warning (shown once).
        """
        stack_name, stack = self.layer_stack(model)
        found: dict[str, Projection] = {}
        matched: set[str] = set()
        patterns = self.patterns
        skip = _routers(model) if self.layers is None else None
        fused: list[str] = []
        for index, layer in enumerate(stack):
            in_layer: set[str] = set()
            compressed_layers: list[str] = []
            for sub_name, module in layer.named_modules():
                if not sub_name or any(sub_name.startswith(c + ".") for c in compressed_layers):
                    continue  # the factors inside an lrc layer are not projections of the model
                if self.experts is None and is_fused_experts(module):
                    fused.append(f"{stack_name}.{index}.{sub_name}")
                compressed = isinstance(module, CompressedLinear)
                if compressed:
                    compressed_layers.append(sub_name)
                elif not isinstance(module, MATRIX_MODULES) or (skip and skip(module)):
                    continue
                hits = [p for p in patterns if fnmatch.fnmatchcase(sub_name, p)]
                if hits:
                    in_layer.update(hits)
                    if not compressed:
                        found[f"{stack_name}.{index}.{sub_name}"] = Projection(module)
            if self.layers is None:
                continue
            if not in_layer:
                raise ModelLoadError(
                    f"layer {index} of {stack_name} in {type(model).__name__} holds no nn.Linear or Conv1D "
                    f"named {', '.join(patterns)} (lrc's {self.name} adapter)"
                )
            if self.one_of and not any(set(group) <= in_layer for group in self.one_of):
                forms = " nor ".join(", ".join(group) for group in self.one_of)
                raise ModelLoadError(
                    f"layer {index} of {stack_name} in {type(model).__name__} holds "
                    f"{'neither' if len(self.one_of) > 1 else 'not all of'} {forms} as nn.Linear or Conv1D "
                    f"(lrc's {self.name} adapter)"
                )
            matched |= in_layer
        missing = [p for p in self.projections if p not in matched]
        if missing and self.layers is not None:
            raise ModelLoadError(
                f"no nn.Linear or Conv1D named {', '.join(missing)} in the {len(stack)} layers of {stack_name} "
                f"in {type(model).__name__} (lrc's {self.name} adapter)"
            )
        if fused:
            config: Any = getattr(model, "config", None)
            blocks = f"{len(fused)} block{'s' if len(fused) > 1 else ''}, first {fused[0]}"
            warnings.warn(
                f"lrc: {type(model).__name__} (model_type {getattr(config, 'model_type', '?')!r}) keeps its fused "
                f"experts dense ({blocks}): lrc's {self.name} adapter does not unfuse them into one nn.Linear per "
                "expert matrix, so only the other projections are compressed",
                stacklevel=2,
            )
        return found

    def prepare(self, model: nn.Module) -> None:
        """Bring a freshly built or loaded model into the structure lrc works on: unfuse its experts (idempotent).

        Works on the meta device too (transformers calls it through lrc's loader before reading weights).
        """
        if self.experts is None:
            return
        stack_name, stack = self.layer_stack(model)
        for index, layer in enumerate(stack):
            try:
                module = layer.get_submodule(self.experts.path)
            except AttributeError:
                continue  # a dense block among the mixture-of-experts blocks
            if isinstance(module, UnfusedExperts) or not is_fused_experts(module):
                continue
            where = f"{stack_name}.{index}.{self.experts.path}"
            parent, _, child = self.experts.path.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child,
                    unfuse_experts(module, self.experts.names, where))

    def forward_inputs(self, batch: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments of one plain forward pass on `batch` (no key/value cache for a causal LM)."""
        return {"input_ids": batch, "use_cache": False} if self.objective == CAUSAL_LM else {"input_ids": batch}

    def loss(self, model: nn.Module, batch: torch.Tensor, probe: torch.Generator) -> torch.Tensor:
        """The scalar whose gradients at each projection's output are the output-gradient statistics.

        CAUSAL_LM: Σ_t cross-entropy of token t+1 given tokens ≤ t, through the model's own LM head.
        HIDDEN_STATES (an encoder with no task head): Σ_t εᵀ_t h_t, h_t the final hidden state (float32),
        ε_t ~ N(0, I) drawn from `probe` (on the CPU, one generator per global batch). At a projection's output y this gives
        g = Jᵀ ε with J = ∂h/∂y, so E[g gᵀ] = Jᵀ J: the Gauss-Newton matrix of the squared distance
        ½ Σ_t ||h_t − h_t(dense)||² to the dense model's hidden states, i.e. the Fisher of h ~ N(h_dense, I).
        (The squared distance itself has zero gradient at the dense model, which is where statistics are taken.)
        """
        if self.objective == CAUSAL_LM:
            logits = model(**self.forward_inputs(batch)).logits[:, :-1].float()
            return nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
        hidden = model(**self.forward_inputs(batch)).last_hidden_state.float()
        epsilon = torch.randn(hidden.shape, generator=probe, dtype=torch.float32).to(hidden.device)
        return (hidden * epsilon).sum()


ROUTED_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
"""Config fields that give the number of routed experts, a router's number of outputs."""


def _routers(model: nn.Module) -> Callable[[nn.Module], bool]:
    """The test the generic fallback skips an nn.Linear by: one output (a per-token scalar gate), or one per
    routed expert (a router)."""
    config: Any = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    counts = {getattr(text_config, field, None) for field in ROUTED_EXPERT_COUNTS}
    outputs = {1} | {c for c in counts if isinstance(c, int) and c > 1}

    def skip(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and module.out_features in outputs

    return skip


def _search_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The one outermost nn.ModuleList of num_hidden_layers blocks (generic fallback)."""
    config: Any = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    count = getattr(text_config, "num_hidden_layers", None)
    model_type = getattr(config, "model_type", "?")
    found: list[str] = []
    for name, module in model.named_modules():
        if (isinstance(module, nn.ModuleList) and len(module) > 0 and (count is None or len(module) == count)
                and not any(name.startswith(outer + ".") for outer in found)):
            found.append(name)
    if len(found) != 1:
        what = "none" if not found else f"{len(found)}: {', '.join(found)}"
        raise ModelLoadError(
            f"lrc has no adapter for model_type {model_type!r} and cannot tell its layer stack: it searched "
            f"{type(model).__name__} for one nn.ModuleList of num_hidden_layers={count} blocks and found {what}"
        )
    stack = model.get_submodule(found[0])
    assert isinstance(stack, nn.ModuleList)
    return found[0], stack
