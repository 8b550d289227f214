"""Linear layers with a sparse factor: the two sparse-plus-low-rank families.

- `SparseDictionaryLinear`: W ≈ S U. U (k x in, dense) projects the input onto k atoms; S (out x k) mixes
  them with a few non-zeros per output row:  y = S (U x) + b.
- `LowRankSparseLinear`: W ≈ up @ down + R, a rank-r factorization plus a sparse residual R (out x in):
  y = up (down x) + R x + b.
Both keep their sparse factor as a `SparseMatrix`, so the state dict stores values and indices (or a
bitmask) only; `weight_bytes` is what the checkpoint holds for the layer's weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .cpu_kernels import linear, lowrank_linear
from .lowrank import first_product, parameter, submodule
from .sparse_matrix import SparseMatrix, layout_bytes


class _SparseFactorLinear(nn.Module):
    kind: str
    in_features: int
    out_features: int
    rank: int
    bias: nn.Parameter | None

    @classmethod
    def skeleton(
        cls,
        in_features: int,
        out_features: int,
        spec: dict[str, Any],
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> _SparseFactorLinear:
        """An empty layer for a checkpoint spec {"kind", "rank", "nnz", "layout"}, ready for its weights."""
        build: Any = cls  # each subclass takes (in, out, rank, nnz, layout, bias, device, dtype)
        return build(in_features, out_features, int(spec["rank"]), int(spec["nnz"]), spec["layout"], bias, device, dtype)

    def spec(self) -> dict[str, Any]:
        sparse = self.sparse_factor()
        return {"kind": self.kind, "rank": self.rank, "nnz": sparse.nnz, "layout": sparse.layout}

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, device: torch.device | str | None,
                 dtype: torch.dtype | None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None

    def _set_bias(self, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)

    def dense_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def sparse_factor(self) -> SparseMatrix:
        raise NotImplementedError

    def weight_bytes(self, value_bytes: int) -> int:
        """Bytes the weight takes when values are stored at `value_bytes` each (bias excluded, as for dense)."""
        dense_values = sum(p.numel() for name, p in self.named_parameters() if name != "bias" and not name.endswith("values"))
        sparse = self.sparse_factor()
        return dense_values * value_bytes + layout_bytes(sparse.layout, sparse.rows, sparse.cols, sparse.nnz, value_bytes)


class SparseDictionaryLinear(_SparseFactorLinear):
    """y = mixing(atoms(x)) + bias;  atoms.weight: k x in (dense),  mixing: out x k sparse."""

    kind = "sparse-dictionary"
    shared_input: tuple[Any, int] | None = None  # (SharedInputProduct, index) once fused (see fused.py)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        nnz: int,
        layout: str,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, rank, bias, device, dtype)
        self.atoms = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.mixing = SparseMatrix(out_features, rank, nnz, layout, device=device, dtype=dtype)

    @classmethod
    def from_factors(
        cls,
        mixing: torch.Tensor,
        atoms: torch.Tensor,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        layout: str | None = None,
    ) -> SparseDictionaryLinear:
        """From mixing (out x k, zeros where not stored) and atoms (k x in), cast to `dtype`."""
        dtype = dtype or atoms.dtype
        sparse = SparseMatrix.from_dense(mixing.to(dtype), mixing != 0, layout)
        layer = cls(atoms.shape[1], mixing.shape[0], atoms.shape[0], sparse.nnz, sparse.layout, bias is not None, "meta", dtype)
        layer.atoms.weight = nn.Parameter(atoms.detach().to(dtype).contiguous(), requires_grad=False)
        layer.mixing = sparse
        layer._set_bias(bias, dtype)
        return layer

    @classmethod
    def from_named_factors(
        cls, factors: dict[str, torch.Tensor], bias: torch.Tensor | None, dtype: torch.dtype, layout: str | None
    ) -> SparseDictionaryLinear:
        """From a method's factors {"mixing", "atoms"} (see FactorizationMethod.sparse_layer)."""
        return cls.from_factors(factors["mixing"].cpu(), factors["atoms"].cpu(), bias, dtype, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # no module call per factor, and one kernel call for both products when decoding (see LowRankLinear)
        atoms, mixing = submodule(self, "atoms"), submodule(self, "mixing")
        y = mixing.after_dense(parameter(atoms, "weight"), x)
        if y is None:
            y = mixing.forward(first_product(self, atoms, x))
        bias = parameter(self, "bias")
        return y if bias is None else y + bias

    def dense_weight(self) -> torch.Tensor:
        return self.mixing.to_dense() @ self.atoms.weight

    def sparse_factor(self) -> SparseMatrix:
        return self.mixing

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, atoms={self.rank}"


class LowRankSparseLinear(_SparseFactorLinear):
    """y = up(down(x)) + residual(x) + bias;  down: r x in, up: out x r, residual: out x in sparse."""

    kind = "low-rank-sparse"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        nnz: int,
        layout: str,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, rank, bias, device, dtype)
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.residual = SparseMatrix(out_features, in_features, nnz, layout, device=device, dtype=dtype)

    @classmethod
    def from_factors(
        cls,
        up: torch.Tensor,
        down: torch.Tensor,
        residual: torch.Tensor,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        layout: str | None = None,
    ) -> LowRankSparseLinear:
        """From up (out x r), down (r x in) and residual (out x in, zeros where not stored)."""
        dtype = dtype or up.dtype
        sparse = SparseMatrix.from_dense(residual.to(dtype), residual != 0, layout)
        layer = cls(down.shape[1], up.shape[0], up.shape[1], sparse.nnz, sparse.layout, bias is not None, "meta", dtype)
        layer.down.weight = nn.Parameter(down.detach().to(dtype).contiguous(), requires_grad=False)
        layer.up.weight = nn.Parameter(up.detach().to(dtype).contiguous(), requires_grad=False)
        layer.residual = sparse
        layer._set_bias(bias, dtype)
        return layer

    @classmethod
    def from_named_factors(
        cls, factors: dict[str, torch.Tensor], bias: torch.Tensor | None, dtype: torch.dtype, layout: str | None
    ) -> LowRankSparseLinear:
        """From a method's factors {"up", "down", "residual"} (see FactorizationMethod.sparse_layer)."""
        return cls.from_factors(factors["up"].cpu(), factors["down"].cpu(), factors["residual"].cpu(), bias, dtype, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = parameter(submodule(self, "down"), "weight"), parameter(submodule(self, "up"), "weight")
        low_rank = lowrank_linear(x, down, up)  # one kernel call when decoding (see LowRankLinear)
        y = submodule(self, "residual").forward(x) + (low_rank if low_rank is not None else linear(linear(x, down), up))
        bias = parameter(self, "bias")
        return y if bias is None else y + bias

    def dense_weight(self) -> torch.Tensor:
        return self.up.weight @ self.down.weight + self.residual.to_dense()

    def sparse_factor(self) -> SparseMatrix:
        return self.residual

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
