"""`SparseMatrix`: a sparse rows x cols matrix stored compactly, and what that storage costs in bytes.

Two layouts, whichever stores fewer bytes for the given non-zero count:
- "csr":     values (nnz,), col_indices (nnz,) int16 (int32 when cols > 32767), row_offsets (rows + 1,) int32;
             bytes = nnz · (value_bytes + index_bytes) + 4 (rows + 1).
- "bitmask": values (nnz,) in row-major order of the set bits, bitmask (rows, ⌈cols / 8⌉) uint8, bit j % 8
             of byte j // 8 set where column j is non-zero; bytes = nnz · value_bytes + rows ⌈cols / 8⌉.
An index costs as much as a bfloat16 value, so the bitmask wins once more than 1/16 of the slots are
non-zero. Every tensor is in the state dict, so the checkpoint holds exactly what `layout_bytes` counts
(plus the safetensors header).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

LAYOUTS = ("csr", "bitmask")
# Above this many tokens per call a dense matmul on the densified matrix beats torch's CSR kernel
# (measured on SmolLM2-135M's shapes, 2 CPU threads: the crossover lies between 128 and 512 tokens).
SPARSE_KERNEL_MAX_TOKENS = 256


def index_dtype(cols: int) -> torch.dtype:
    return torch.int16 if cols <= torch.iinfo(torch.int16).max else torch.int32


def layout_bytes(layout: str, rows: int, cols: int, nnz: int, value_bytes: int) -> int:
    """Bytes a `layout` stores for `nnz` non-zeros of a rows x cols matrix, values at `value_bytes` each."""
    if layout == "csr":
        return nnz * (value_bytes + index_dtype(cols).itemsize) + 4 * (rows + 1)
    if layout == "bitmask":
        return nnz * value_bytes + rows * math.ceil(cols / 8)
    raise ValueError(f"unknown sparse layout {layout!r} (use one of {LAYOUTS})")


def best_layout(rows: int, cols: int, nnz: int, value_bytes: int) -> tuple[str, int]:
    """(layout, bytes) of the cheaper layout for this many non-zeros."""
    return min(((layout, layout_bytes(layout, rows, cols, nnz, value_bytes)) for layout in LAYOUTS), key=lambda x: x[1])


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool (rows, cols) -> uint8 (rows, ⌈cols / 8⌉), bit j % 8 of byte j // 8 = mask[:, j]."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, math.ceil(cols / 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask.to(torch.uint8)
    weights = (1 << torch.arange(8, device=mask.device)).to(torch.uint8)
    return (padded.view(rows, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of pack_bits: uint8 (rows, ⌈cols / 8⌉) -> bool (rows, cols)."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :cols].bool()


def csr_to_dense(csr: torch.Tensor) -> torch.Tensor:
    """A torch CSR matrix as a dense one; a flat scatter, several times faster than torch's to_dense on CPU."""
    rows, cols = csr.shape
    crow = csr.crow_indices()
    row_ids = torch.repeat_interleave(torch.arange(rows, device=crow.device), (crow[1:] - crow[:-1]).long())
    flat = torch.zeros(rows * cols, dtype=csr.dtype, device=csr.device)
    return flat.index_put_((row_ids * cols + csr.col_indices(),), csr.values()).view(rows, cols)


class SparseMatrix(nn.Module):
    """A rows x cols matrix with `nnz` stored entries, in the "csr" or "bitmask" layout (see module doc).

    `to_dense()` rebuilds the matrix (zeros included); `forward(h)` = h @ Sᵀ, h (..., cols) -> (..., rows),
    runs a sparse matmul on a torch CSR copy of the stored entries (int32 indices, built on first use and
    rebuilt whenever the stored tensors change or move) for up to SPARSE_KERNEL_MAX_TOKENS tokens, and a
    dense matmul on the densified matrix for more tokens or where torch has no sparse kernel (half
    precision on CPU).
    """

    col_indices: torch.Tensor
    row_offsets: torch.Tensor
    bitmask: torch.Tensor

    def __init__(
        self,
        rows: int,
        cols: int,
        nnz: int,
        layout: str,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown sparse layout {layout!r} (use one of {LAYOUTS})")
        self.rows, self.cols, self.nnz, self.layout = rows, cols, nnz, layout
        self.values = nn.Parameter(torch.empty(nnz, device=device, dtype=dtype), requires_grad=False)
        if layout == "csr":
            self.register_buffer("col_indices", torch.zeros(nnz, dtype=index_dtype(cols), device=device))
            self.register_buffer("row_offsets", torch.zeros(rows + 1, dtype=torch.int32, device=device))
        else:
            self.register_buffer("bitmask", torch.zeros(rows, math.ceil(cols / 8), dtype=torch.uint8, device=device))
        self._csr: tuple[tuple[object, ...], torch.Tensor] | None = None  # (state key, CSR copy), not saved

    @classmethod
    def from_dense(cls, dense: torch.Tensor, mask: torch.Tensor, layout: str | None = None) -> SparseMatrix:
        """Store dense[mask] (rows x cols); layout None picks the cheaper one at dense's dtype."""
        rows, cols = dense.shape
        nnz = int(mask.sum())
        layout = layout or best_layout(rows, cols, nnz, dense.element_size())[0]
        matrix = cls(rows, cols, nnz, layout, device=dense.device, dtype=dense.dtype)
        matrix.values.data = dense[mask].contiguous()  # boolean indexing is row-major, as both layouts need
        if layout == "csr":
            matrix.col_indices = mask.nonzero()[:, 1].to(index_dtype(cols))
            offsets = torch.zeros(rows + 1, dtype=torch.int64, device=dense.device)
            offsets[1:] = mask.sum(1).cumsum(0)
            matrix.row_offsets = offsets.to(torch.int32)
        else:
            matrix.bitmask = pack_bits(mask)
        return matrix

    def mask(self) -> torch.Tensor:
        """bool (rows, cols): where the stored entries are."""
        if self.layout == "bitmask":
            return unpack_bits(self.bitmask, self.cols)
        mask = torch.zeros(self.rows, self.cols, dtype=torch.bool, device=self.values.device)
        mask[self.row_ids(), self.col_indices.long()] = True
        return mask

    def row_ids(self) -> torch.Tensor:
        counts = (self.row_offsets[1:] - self.row_offsets[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.rows, device=counts.device), counts)

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.rows, self.cols, dtype=self.values.dtype, device=self.values.device)
        if self.layout == "bitmask":
            dense[unpack_bits(self.bitmask, self.cols)] = self.values
        else:
            dense[self.row_ids(), self.col_indices.long()] = self.values
        return dense

    def stored_bytes(self) -> int:
        """Bytes of every tensor this matrix stores (values, indices or bitmask, offsets)."""
        return sum(t.numel() * t.element_size() for t in [self.values, *self.buffers()])

    def to_torch_csr(self) -> torch.Tensor:
        """The stored entries as a torch sparse CSR tensor (rows x cols, int32 indices)."""
        if self.layout == "csr":
            crow, col = self.row_offsets.to(torch.int32), self.col_indices.to(torch.int32)
        else:
            mask = unpack_bits(self.bitmask, self.cols)
            crow = torch.zeros(self.rows + 1, dtype=torch.int32, device=mask.device)
            crow[1:] = mask.sum(1).cumsum(0)
            col = mask.nonzero()[:, 1].to(torch.int32)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(crow, col, self.values.detach(), size=(self.rows, self.cols), check_invariants=False)

    def has_sparse_kernel(self) -> bool:
        return self.values.device.type != "cpu" or self.values.dtype in (torch.float32, torch.float64)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.has_sparse_kernel():
            return nn.functional.linear(h, self.to_dense())
        csr = self.cached_csr()
        tokens = h.numel() // self.cols
        if tokens > SPARSE_KERNEL_MAX_TOKENS:  # compute bound: densify once, one dense matmul
            return nn.functional.linear(h, csr_to_dense(csr))
        out = csr @ h.reshape(tokens, self.cols).T  # (rows, tokens)
        return out.T.reshape(*h.shape[:-1], self.rows)

    def cached_csr(self) -> torch.Tensor:
        """`to_torch_csr()`, kept until the stored tensors change (in place, by load or by a move)."""
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in [self.values, *self.buffers()])
        if self._csr is None or self._csr[0] != key:
            self._csr = (key, self.to_torch_csr())
        return self._csr[1]

    def extra_repr(self) -> str:
        return f"rows={self.rows}, cols={self.cols}, nnz={self.nnz}, layout={self.layout}"
