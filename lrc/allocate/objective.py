"""What the budget counts: the price of each option the knapsack weighs, by what the user is constrained by.

- `disk`: bytes on disk, in parameter-equivalents (m n dense, r (m + n) at rank r, a sparse option's
  stored bytes / value bytes): the budget B removes B of the targeted matrices' weights.
- `memory`: bytes the layer holds in memory after a forward pass (its stored tensors plus whatever the
  form keeps to run: a sparse layer's kernel copy), measured per shape (see layer_costs).
- `latency`: seconds of one forward pass of `latency_tokens` tokens through the layer on the run's
  device, at the written dtype and the current thread count, measured per shape (see layer_costs).
  The budget B makes the whole forward pass B faster, the pass that generate() makes (the head computes
  the last position's logits only, `logits_to_keep=1`, where the model takes it): the time outside the
  targeted matrices (attention, norms, embeddings, the head) is measured in the dense model (`layer_costs.time_outside`,
  as a share s of the targeted layers' time there) and priced at s Σ dense price, so with T = Σ dense
  price the constraint is Σ price + s T ≤ (1 − B)(1 + s) T.
Every option's price is its own measurement; for disk and memory Σ price ≤ (1 − B) Σ dense price.
With several processes, rank 0 measures and every rank prices by its numbers (the same allocation).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import ConfigError
from ..factorize.base import SparseOption
from ..progress import Progress, no_progress
from .base import DENSE, Allocator, Choice, MatrixCandidates
from .layer_costs import DENSE_KIND, LayerCostTable, LayerShape, sample_ranks, time_outside

if TYPE_CHECKING:
    from ..config import CompressionConfig

OBJECTIVES = ("disk", "memory", "latency")
LATENCY_NEEDS_MODEL = "objective latency times the whole model's forward pass: it needs the model in memory (not --stream)"
Price = Callable[[MatrixCandidates, Choice], float]


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")


def layer_shape(matrix: MatrixCandidates, choice: Choice) -> LayerShape:
    """The layer a choice becomes for this matrix (m x n)."""
    from ..forms import LowRankLinear

    m, n = matrix.shape
    if isinstance(choice, SparseOption):
        return LayerShape(choice.kind, m, n, choice.rank, choice.nnz, choice.layout)
    if choice == DENSE:
        return LayerShape(DENSE_KIND, m, n)
    return LayerShape(LowRankLinear.kind, m, n, int(choice))


def disk_price(matrix: MatrixCandidates, choice: Choice) -> float:
    return float(matrix.params(choice))


def measured_price(table: LayerCostTable, what: str) -> Price:
    """The price from a measured table: `what` = "seconds" or "resident_bytes"."""
    def price(matrix: MatrixCandidates, choice: Choice) -> float:
        shape = layer_shape(matrix, choice)
        return table.seconds(shape) if what == "seconds" else table.resident_bytes(shape)

    return price


@dataclass
class Pricing:
    """What the knapsack weighs: each option's price, and the price of the rest of the model (see module doc)."""

    price: Price
    outside: float = 0.0


def predicted_cost(allocator: Allocator, matrices: list[MatrixCandidates], choices: Mapping[str, Choice],
                   objective: str) -> dict[str, float | str] | None:
    """What the allocation costs by the allocator's measured prices, as a fraction of the dense model's:
    (Σ price(choice) + outside) / (Σ price(dense) + outside), with the outside share (latency). None where
    the allocator priced parameters (disk: the report's params already say it)."""
    from .knapsack import KnapsackAllocator

    if not isinstance(allocator, KnapsackAllocator) or allocator.price is None:
        return None
    price = allocator.price
    dense = sum(price(m, DENSE) for m in matrices)
    chosen = sum(price(m, choices[m.name]) for m in matrices)
    predicted: dict[str, float | str] = {
        "counts": {"latency": "forward time, whole model", "memory": "resident bytes, targeted layers"}.get(objective, objective),
        "fraction_of_dense": round((chosen + allocator.outside) / (dense + allocator.outside), 4),
    }
    if objective == "latency":
        predicted["targeted_layers_fraction"] = round(chosen / dense, 4)
        predicted["outside_share"] = round(allocator.outside / dense, 4)  # outside time / targeted layers' time
    return predicted


def outside_share(model: nn.Module, names: list[str], tokens: int) -> float:
    """The dense model's forward time outside the modules `names`, as a share of theirs (one forward of
    `tokens` random tokens, logits of the last position only as generate() computes them; names that are
    not modules count as outside)."""
    from ..model.adapters import adapter_for

    present = [name for name in names if _is_module(model, name)]
    device = next(model.parameters()).device
    vocab = int(model.config.vocab_size)  # type: ignore[union-attr, arg-type]  # a transformers model
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    inputs = adapter_for(model).forward_inputs(ids)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        inputs["logits_to_keep"] = 1
    inside, outside = time_outside(model, present, lambda: model(**inputs))
    return outside / inside


def _is_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def price_for(config: CompressionConfig, matrices: list[MatrixCandidates], rank_step: int,
              model: nn.Module | None = None, progress: Progress = no_progress) -> Pricing | None:
    """The pricing of config.objective, its table filled for every option of `matrices` (None for disk); for
    latency, `model` (dense, in memory) gives the time outside the targeted matrices. progress: the
    measuring of shapes not in the cached table yet (LayerCostTable.fill)."""
    from ..distributed import from_main
    from ..forms import LowRankLinear
    from ..io.checkpoint import DTYPES

    check_objective(config.objective)
    if config.objective == "disk":
        return None
    if config.objective == "latency" and model is None:
        raise ConfigError(LATENCY_NEEDS_MODEL)
    table = LayerCostTable(config.device, DTYPES[config.dtype or "float32"], config.latency_tokens)
    shapes: list[LayerShape] = []
    ranks: dict[tuple[int, int], set[int]] = {}  # every candidate low rank of each (m, n) shape; a sample is measured
    for m in matrices:
        choices: list[Choice] = [DENSE]
        if not m.keep_dense:
            ranks.setdefault(m.shape, set()).update(r for r in range(rank_step, m.max_rank + 1, rank_step) if r >= m.min_rank)
            choices += [o for o in m.sparse if o.cost < m.dense_params]
        shapes += [layer_shape(m, c) for c in choices]
    shapes += [LayerShape(LowRankLinear.kind, *shape, r) for shape, rs in ranks.items() for r in sample_ranks(list(rs))]

    def measure() -> tuple[dict[str, dict[str, float]], float]:
        table.fill(shapes, progress)
        share = 0.0
        if config.objective == "latency" and model is not None:
            share = outside_share(model, [m.name for m in matrices], config.latency_tokens)
        return table.entries, share

    table.entries, share = from_main(measure)
    price = measured_price(table, "seconds" if config.objective == "latency" else "resident_bytes")
    return Pricing(price, share * sum(price(m, DENSE) for m in matrices))
