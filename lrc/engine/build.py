"""From allocation to layers: each chosen rank or sparse option becomes its layer form, swapped into the model."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..allocate import DENSE, Choice, MatrixCandidates, allocate_ranks
from ..config import CompressionConfig
from ..device import resolve_device
from ..errors import ConfigError
from ..factorize import METHODS, SparseOption
from ..forms import LAYER_FORMS, LowRankLinear, LowRankSparseLinear, SparseDictionaryLinear, skeleton
from ..model.projection import Projection
from ..model.targets import replace_module, target_linears
from ..progress import Progress, no_progress
from ..sequential import sequential_factorize
from ..sources import LoadedModel
from .jobs import Analysis, value_bytes


@dataclass
class MatrixResult:
    """What happened to one targeted matrix.

    kind: "dense" or a layer form ("low-rank", "sparse-dictionary", "low-rank-sparse");
    rank: the rank (or atoms), DENSE (0) when kept dense; params: cost in parameter-equivalents (values,
    plus index bytes / value bytes for sparse layers); nnz, layout: the sparse factor's entries and layout.
    """

    name: str
    shape: tuple[int, int]
    rank: int
    params: int
    rel_error: float  # ||(W - W') X||_F / ||W X||_F on the calibration data
    kind: str = "low-rank"
    nnz: int = 0
    layout: str = ""

    def spec(self) -> dict[str, object]:
        """The layer spec a checkpoint records for this matrix (see lrc.forms)."""
        if self.kind == LowRankLinear.kind:
            return {"kind": self.kind, "rank": self.rank}
        return {"kind": self.kind, "rank": self.rank, "nnz": self.nnz, "layout": self.layout}


class KeptFiles(Protocol):
    """Where a streamed run keeps its refitted layers (lrc.stream.layer_store.LayerStore): files keyed by the
    weights, statistics and method options the fits came from, so a file left by an earlier run is the same fit."""

    def save_kept(self, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None: ...

    def load_kept(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None: ...


class KeptLayers:
    """Sparse layers built from the refits of the allocator's choices (lrc.allocate.refine's `keep`), at most
    one per matrix (its latest), for `apply` to swap in where the final choice is that option: its final fit,
    minutes for a wide matrix, made once. In memory (up to the chosen sparse layers' bytes until `apply` takes
    them), or in `files` (a streamed run: a layer's tensors, its option and spec in the metadata)."""

    def __init__(self, files: KeptFiles | None = None) -> None:
        self.files = files
        self.layers: dict[str, tuple[tuple[str, int, int], SparseDictionaryLinear | LowRankSparseLinear]] = {}

    def keep(self, name: str, option: SparseOption, factors: dict[str, torch.Tensor], linear: Projection) -> None:
        bias = linear.bias.detach() if linear.bias is not None else None
        layer = build_sparse_layer(option, factors, bias, linear.weight.dtype)
        if self.files is None:
            self.layers[name] = (option.key, layer)
        else:
            self.files.save_kept(name, layer.state_dict(), {"option": list(option.key), "spec": layer.spec()})

    def take(self, name: str, option: SparseOption,
             linear: Projection) -> SparseDictionaryLinear | LowRankSparseLinear | None:
        """The layer kept for `name` if it was built for `option` (None otherwise); in memory it is kept no longer."""
        if self.files is None:
            found = self.layers.pop(name, None)
            return found[1] if found is not None and found[0] == option.key else None
        stored = self.files.load_kept(name)
        if stored is None or stored[1].get("option") != list(option.key):
            return None
        layer = skeleton(linear.in_features, linear.out_features, stored[1]["spec"], linear.bias is not None, "cpu",
                         linear.weight.dtype)
        layer.load_state_dict(stored[0])
        assert isinstance(layer, (SparseDictionaryLinear, LowRankSparseLinear))
        return layer

    def drop(self) -> None:
        """Forget the layers in memory not taken (choices that moved to a rank or dense); files stay."""
        self.layers.clear()


def apply(
    loaded: LoadedModel,
    analysis: Analysis,
    config: CompressionConfig,
    progress: Progress = no_progress,
    allocation: tuple[list[MatrixCandidates], Mapping[str, Choice]] | None = None,
    kept: KeptLayers | None = None,
) -> tuple[list[MatrixResult], dict[str, float]]:
    """Swap the allocated linears for their compressed forms, in place (one-shot or sequential).

    allocation: `allocate_ranks(analysis, config)` if the caller already made it, else it is made here.
    kept: the layers built while refining that allocation (else, when allocated here, those of this allocation);
    a chosen sparse option without one is fitted here (the same bits).
    Returns the per-matrix results and timings (allocation_s when allocated here, sequential_s in sequential mode).
    """
    timing = {}
    targets = target_linears(loaded.model, config.exclude)
    if allocation is None:
        t = time.perf_counter()
        kept = KeptLayers()  # sparse options near the choices refined, the choices' fits kept
        allocation = allocate_ranks(analysis, config, loaded.model, progress=progress, keep=kept.keep)
        timing["allocation_s"] = time.perf_counter() - t
    candidates, choices = allocation
    if config.sequential:
        ranks = {name: choice for name, choice in choices.items() if isinstance(choice, int)}
        if len(ranks) < len(choices):
            raise ConfigError("sequential mode supports plain ranks only, not sparse options")
        t = time.perf_counter()
        errors = sequential_factorize(
            loaded.model, analysis.stats.windows, targets, ranks, METHODS.create(config.method, config.method_options),
            analysis.stats.outputs, config.batch_size, resolve_device(config.device),
            progress=lambda done, total: progress("sequential refit", done, total),
        )
        timing["sequential_s"] = time.perf_counter() - t
        return [_result(c, ranks[c.name], errors.get(c.name, 0.0)) for c in candidates], timing
    results = []
    method = METHODS.create(config.method, config.method_options)
    device = resolve_device(config.device)
    for done, c in enumerate(candidates, 1):
        choice = choices[c.name]
        linear = targets[c.name]
        bias = linear.bias.detach() if linear.bias is not None else None
        if isinstance(choice, SparseOption):
            inp = analysis.stats.input_of(c.name).to(device)
            layer = kept.take(c.name, choice, linear) if kept is not None else None
            if layer is None:
                outputs = analysis.stats.outputs.get(c.name)
                problem = method.weighted_problem(
                    linear.weight.detach().to(device), inp, c.name, None, outputs.to(device) if outputs else None
                )
                layer = build_sparse_layer(choice, method.sparse_layer(problem, choice), bias, linear.weight.dtype)
            replace_module(loaded.model, c.name, layer)
            error = relative_output_error(linear.weight.detach(), layer.dense_weight().detach(), inp.gram)
            sparse = layer.sparse_factor()  # the layer as built: its real entry count and bytes
            cost = -(-layer.weight_bytes(value_bytes(config, linear)) // value_bytes(config, linear))
            results.append(MatrixResult(c.name, c.shape, layer.rank, cost, error, choice.kind, sparse.nnz, sparse.layout))
        elif choice != DENSE:
            up, down = analysis.decompositions[c.name].factors(choice)
            replace_module(loaded.model, c.name, LowRankLinear.from_factors(up, down, bias, dtype=linear.weight.dtype))
            results.append(_result(c, choice, float(analysis.output_errors[c.name][choice])))
        else:
            results.append(_result(c, DENSE, 0.0))
        progress("build layers", done, len(candidates))  # a sparse layer's final fit: minutes at 8192 x 2048
    if kept is not None:
        kept.drop()
    return results, timing


def _result(candidate: MatrixCandidates, choice: int, rel_error: float) -> MatrixResult:
    kind = "dense" if choice == DENSE else LowRankLinear.kind
    return MatrixResult(candidate.name, candidate.shape, choice, candidate.params(choice), rel_error, kind)


def build_sparse_layer(
    option: SparseOption, factors: dict[str, torch.Tensor], bias: torch.Tensor | None, dtype: torch.dtype
) -> SparseDictionaryLinear | LowRankSparseLinear:
    """The layer of the option's form from the method's factors (see the method's sparse_layer)."""
    form: type[SparseDictionaryLinear] | type[LowRankSparseLinear] = LAYER_FORMS.get(option.kind)
    return form.from_named_factors(factors, bias, dtype, option.layout)


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """||(W - W') X||_F / ||W X||_F = sqrt(tr(Δ G Δᵀ) / tr(W G Wᵀ)), G = X Xᵀ, in float64."""
    g = gram.to(device=weight.device, dtype=torch.float64)
    w = weight.to(torch.float64)
    delta = w - approx.to(w)
    total = float(((w @ g) * w).sum())
    return math.sqrt(max(float(((delta @ g) * delta).sum()), 0.0) / total) if total > 0 else 0.0
