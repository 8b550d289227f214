"""What the budget counts: the price of each option the knapsack weighs, by what the user is constrained by.

- `disk`: bytes on disk, in parameter-equivalents (m n dense, r (m + n) at rank r, a sparse option's
  stored bytes / value bytes): the budget B removes B of the targeted matrices' weights.
- `memory`: bytes the layer holds in memory after a forward pass (its stored tensors plus whatever the
  form keeps to run: a sparse layer's kernel copy), measured per shape (see layer_costs).
- `latency`: seconds of one forward pass of `latency_tokens` tokens through the layer on the run's
  device, at the written dtype and the current thread count, measured per shape (see layer_costs):
  the budget B makes the targeted matrices B faster together (attention, norms, embeddings and the head
  are not targeted and keep their time).
Every option's price is its own measurement, so Σ price ≤ (1 − B) Σ dense price is the constraint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..factorize.base import SparseOption
from .base import DENSE, Choice, MatrixCandidates
from .layer_costs import DENSE_KIND, LayerCostTable, LayerShape

if TYPE_CHECKING:
    from ..config import CompressionConfig

OBJECTIVES = ("disk", "memory", "latency")
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


def price_for(config: CompressionConfig, matrices: list[MatrixCandidates], rank_step: int) -> Price | None:
    """The price of config.objective, its table filled for every option of `matrices` (None for disk)."""
    from ..io.checkpoint import DTYPES

    check_objective(config.objective)
    if config.objective == "disk":
        return None
    table = LayerCostTable(config.device, DTYPES[config.dtype or "float32"], config.latency_tokens)
    shapes = []
    for m in matrices:
        choices: list[Choice] = [DENSE]
        if not m.keep_dense:
            choices += [r for r in range(rank_step, m.max_rank + 1, rank_step) if r >= m.min_rank]
            choices += [o for o in m.sparse if o.cost < m.dense_params]
        shapes += [layer_shape(m, c) for c in choices]
    table.fill(shapes)
    return measured_price(table, "seconds" if config.objective == "latency" else "resident_bytes")
