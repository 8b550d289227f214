"""SparseMatrix: both layouts rebuild the same matrix, and store exactly the bytes layout_bytes counts."""

from __future__ import annotations

import math

import pytest
import torch

from lrc.forms.sparse_matrix import (
    SPARSE_KERNEL_MAX_TOKENS,
    SparseMatrix,
    best_layout,
    layout_bytes,
    pack_bits,
    unpack_bits,
)


def random_sparse(rows: int, cols: int, density: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) < density
    return torch.randn(rows, cols, generator=g) * mask, mask


@pytest.mark.parametrize("cols", [1, 7, 8, 13, 64])
def test_bits_round_trip(cols):
    mask = torch.rand(5, cols, generator=torch.Generator().manual_seed(cols)) < 0.4
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (5, math.ceil(cols / 8))
    assert torch.equal(unpack_bits(packed, cols), mask)


@pytest.mark.parametrize("layout", ["csr", "bitmask"])
@pytest.mark.parametrize("density", [0.02, 0.3])
def test_layouts_rebuild_the_matrix_and_count_their_bytes(layout, density):
    dense, mask = random_sparse(37, 50, density)
    matrix = SparseMatrix.from_dense(dense, mask, layout)
    assert matrix.nnz == int(mask.sum())
    assert torch.equal(matrix.to_dense(), dense)
    assert torch.equal(matrix.mask(), mask)
    assert matrix.stored_bytes() == layout_bytes(layout, 37, 50, matrix.nnz, 4)
    h = torch.randn(3, 50)
    torch.testing.assert_close(matrix(h), h @ dense.T)


@pytest.mark.parametrize("layout", ["csr", "bitmask"])
@pytest.mark.parametrize("tokens", [1, SPARSE_KERNEL_MAX_TOKENS + 1])  # the CSR kernel, then the densified matmul
def test_forward_matches_the_dense_product_on_both_paths(layout, tokens):
    dense, mask = random_sparse(37, 50, 0.3, seed=tokens)
    matrix = SparseMatrix.from_dense(dense, mask, layout)
    h = torch.randn(2, tokens, 50)
    torch.testing.assert_close(matrix(h), h @ dense.T)
    torch.testing.assert_close(matrix(h[0, :1].T.contiguous().T), h[0, :1] @ dense.T)  # a non-contiguous input


def test_forward_follows_changed_values_and_half_precision():
    dense, mask = random_sparse(20, 30, 0.3, seed=5)
    matrix = SparseMatrix.from_dense(dense, mask, "csr")
    h = torch.randn(4, 30)
    matrix(h)  # builds the cached CSR copy
    matrix.values.data.mul_(3)  # in place: the cache must notice
    torch.testing.assert_close(matrix(h), h @ (3 * dense).T)
    other = SparseMatrix.from_dense(-dense, mask, "csr")
    matrix.load_state_dict(other.state_dict())
    torch.testing.assert_close(matrix(h), h @ (-dense).T)
    matrix.to(torch.bfloat16)  # no CPU CSR kernel for bfloat16: the dense path, same numbers
    torch.testing.assert_close(matrix(h.bfloat16()).float(), (h.bfloat16().float() @ (-dense).bfloat16().float().T),
                               rtol=2e-2, atol=2e-2)


def test_best_layout_switches_at_one_index_per_value():
    # csr: 2 bytes of int16 index per entry; bitmask: 1024 / 8 = 128 bytes per row. They break even near
    # 64 entries per row (1/16 of the slots).
    assert best_layout(10, 1024, 10 * 50, 2)[0] == "csr"
    assert best_layout(10, 1024, 10 * 80, 2)[0] == "bitmask"
    layout, nbytes = best_layout(10, 1024, 10 * 200, 2)
    assert nbytes == 2000 * 2 + 10 * 128


def test_empty_skeleton_loads_a_state_dict():
    dense, mask = random_sparse(9, 20, 0.25, seed=3)
    source = SparseMatrix.from_dense(dense, mask, "csr")
    target = SparseMatrix(9, 20, source.nnz, "csr")
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.to_dense(), dense)
