"""SparseMatrix: both layouts rebuild the same matrix, store exactly the bytes layout_bytes counts, and multiply
like the dense matrix on every path (C kernel, kernel-densified matmul, torch fallback)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from lrc.forms import cpu_kernels
from lrc.forms.sparse_matrix import (
    KERNEL_MAX_TOKENS,
    SparseMatrix,
    best_layout,
    layout_bytes,
    pack_bits,
    unpack_bits,
)
from lrc.peak_memory import held_tensor_bytes


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


DTYPE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("layout", ["csr", "bitmask"])
@pytest.mark.parametrize("shape", [(1, 1), (1, KERNEL_MAX_TOKENS), (2, 3), (1, KERNEL_MAX_TOKENS + 1), (2, 40)])
def test_forward_matches_the_dense_product(monkeypatch, kernels, dtype, layout, shape):
    """Decode (1 token), a few tokens, and prefill-sized calls; 37 x 50 has partial 16-column chunks."""
    monkeypatch.setattr(cpu_kernels, "ENABLED", kernels)
    dense, mask = random_sparse(37, 50, 0.45, seed=shape[1])
    matrix = SparseMatrix.from_dense(dense.to(dtype), mask, layout)
    assert (matrix.kernel_row_starts() is not None) == (kernels and cpu_kernels.library() is not None)
    h = torch.randn(*shape, 50).to(dtype)
    expected = h.double() @ dense.to(dtype).double().T  # the stored values, multiplied in float64
    got = matrix(h)
    assert got.dtype == dtype and got.shape == (*shape, 37)
    tol = DTYPE_TOLERANCE[dtype]
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    torch.testing.assert_close(matrix(h[0, :1].T.contiguous().T).double(), expected[0, :1], rtol=tol,
                               atol=tol * expected.abs().max().item())  # a non-contiguous input


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("density", [0.03, 0.5, 1.0])
def test_one_token_of_a_wide_matrix_matches_the_dense_product(dtype, density):
    """Decoding: rows in groups of four, 32-column steps, a partial chunk, the last rows one by one."""
    dense, mask = random_sparse(61, 300, density, seed=7)
    matrix = SparseMatrix.from_dense(dense.to(dtype), mask, "bitmask")
    h = torch.randn(1, 300).to(dtype)
    expected = h.double() @ dense.to(dtype).double().T
    tol = DTYPE_TOLERANCE[dtype]
    torch.testing.assert_close(matrix(h).double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("layout", ["csr", "bitmask"])
@pytest.mark.parametrize("cols", [1, 15, 16, 17, 33, 300])
def test_kernel_densify_is_exact(layout, cols):
    dense, mask = random_sparse(11, cols, 0.5, seed=cols)
    for dtype in (torch.float32, torch.bfloat16):
        matrix = SparseMatrix.from_dense(dense.to(dtype), mask, layout)
        starts = matrix.kernel_row_starts()
        if starts is None:
            pytest.skip("no C compiler: the kernels do not run here")
        assert torch.equal(matrix.kernel_dense(starts), dense.to(dtype))


def test_kernels_refuse_inconsistent_stored_tensors():
    """The kernels read values by the bitmask's set bits: a bitmask that disagrees with nnz, or sets bits past
    the last column, is an error, never a read past the values."""
    dense, mask = random_sparse(6, 12, 0.5, seed=2)
    matrix = SparseMatrix.from_dense(dense, mask, "bitmask")
    if matrix.kernel_row_starts() is None:
        pytest.skip("no C compiler: the kernels do not run here")
    matrix.bitmask[0, 0] |= 0xFF  # more bits than stored values
    with pytest.raises(ValueError, match="bits for"):
        matrix(torch.randn(1, 12))
    matrix = SparseMatrix.from_dense(dense, mask, "bitmask")
    matrix.bitmask[0, 1] |= 0x80  # column 15 of 12
    with pytest.raises(ValueError, match="past its 12 columns"):
        matrix(torch.randn(1, 12))
    matrix = SparseMatrix.from_dense(dense, mask, "csr")
    matrix.col_indices[0] = 12
    with pytest.raises(ValueError, match="out of range"):
        matrix(torch.randn(1, 12))


def test_forward_follows_changed_values_and_a_reload():
    dense, mask = random_sparse(20, 30, 0.3, seed=5)
    matrix = SparseMatrix.from_dense(dense, mask, "bitmask")
    h = torch.randn(4, 30)
    matrix(h)  # checks the stored tensors once
    matrix.values.data.mul_(3)  # in place
    torch.testing.assert_close(matrix(h), h @ (3 * dense).T)
    other = SparseMatrix.from_dense(-dense, mask, "bitmask")
    matrix.load_state_dict(other.state_dict())
    torch.testing.assert_close(matrix(h), h @ (-dense).T)
    dense2, mask2 = random_sparse(20, 30, 0.3, seed=6)  # tensors replaced by others of another pattern
    replacement = SparseMatrix.from_dense(dense2, mask2, "bitmask")
    matrix.values, matrix.bitmask, matrix.nnz = replacement.values, replacement.bitmask, replacement.nnz
    torch.testing.assert_close(matrix(h[:1]), h[:1] @ dense2.T)
    matrix.to(torch.bfloat16)  # moved: new tensors
    torch.testing.assert_close(matrix(h[:1].bfloat16()).float(), h[:1] @ dense2.T, rtol=2e-2, atol=2e-2)


def test_a_used_matrix_copies_and_pickles():
    """The kernel plan a call makes (weak references, C addresses) is not copied: the copy makes its own."""
    dense, mask = random_sparse(20, 30, 0.3, seed=8)
    matrix = SparseMatrix.from_dense(dense, mask, "bitmask")
    h = torch.randn(2, 30)
    want = matrix(h)
    copied = copy.deepcopy(matrix)
    buffer = io.BytesIO()
    torch.save(matrix, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (copied, loaded):
        torch.testing.assert_close(other(h), want)
    copied.values.data.mul_(2)  # the copy's own tensors
    torch.testing.assert_close(matrix(h), want)
    torch.testing.assert_close(copied(h), 2 * want)


def test_memory_is_the_stored_tensors():
    """No copy in another layout: after a forward the module holds its stored tensors plus 8 bytes per row."""
    dense, mask = random_sparse(64, 96, 0.5, seed=7)
    matrix = SparseMatrix.from_dense(dense, mask, "bitmask")
    matrix(torch.randn(1, 96))
    matrix(torch.randn(KERNEL_MAX_TOKENS + 1, 96))
    assert held_tensor_bytes(matrix) <= matrix.stored_bytes() + 8 * (64 + 1)


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


@pytest.mark.parametrize("layout", ["csr", "bitmask"])
def test_a_matrix_made_under_inference_mode_multiplies(layout):
    """Inference tensors carry no version counter; the state check must not need one."""
    dense, mask = random_sparse(37, 50, 0.4)
    h = torch.randn(1, 50)
    with torch.inference_mode():
        matrix = SparseMatrix.from_dense(dense, mask, layout)
        torch.testing.assert_close(matrix(h), h @ dense.T)
    torch.testing.assert_close(matrix(h), h @ dense.T)


def test_a_sparse_matrix_off_the_cpu_warns_once_that_it_is_densified_per_call(monkeypatch):
    """Off the CPU (no C kernel there) each call densifies the matrix: the user is told once per device type.
    Run here on the meta device, which takes the same path as a GPU."""
    from lrc.forms import sparse_matrix

    monkeypatch.setattr(sparse_matrix, "_warned_devices", set())
    dense, mask = random_sparse(8, 12, 0.5, seed=1)
    matrix = SparseMatrix.from_dense(dense, mask).to("meta")
    x = torch.empty(3, 12, device="meta")
    with pytest.warns(UserWarning, match="densified with torch for every call") as record:
        assert matrix(x).shape == (3, 8)
        matrix(x)
    assert len(record) == 1 and "meta" in str(record[0].message)


@pytest.mark.parametrize("layout", ["bitmask", "csr"])
def test_compiled_product_matches_the_dense_product(layout):
    """torch.compile traces the product as one op (fullgraph: no break at the kernels' checks) whose outputs and
    shapes are the eager ones, at decode and prefill sizes, and follows values changed after compiling."""
    dense, mask = random_sparse(24, 40, 0.3, seed=11)
    matrix = SparseMatrix.from_dense(dense, mask, layout)
    compiled = torch.compile(matrix, fullgraph=True, dynamic=True)
    for tokens in (1, KERNEL_MAX_TOKENS + 5):
        h = torch.randn(2, tokens, 40, generator=torch.Generator().manual_seed(tokens))
        torch.testing.assert_close(compiled(h), h @ dense.T)
    matrix.values.data.mul_(-2)
    h = torch.randn(1, 40)
    torch.testing.assert_close(compiled(h), h @ (-2 * dense).T)


def test_a_plan_made_outside_the_graph_pools_is_made_in_another_thread():
    """outside_graph_pools runs its function in a helper thread (CUDA graphs redirect only the calling
    thread's allocations), returns its tensor, and re-raises its error in the caller."""
    import threading

    from lrc.forms.sparse_matrix import outside_graph_pools

    seen = []

    def make():
        seen.append(threading.current_thread() is not threading.main_thread())
        return torch.arange(3)

    assert torch.equal(outside_graph_pools(make), torch.arange(3)) and seen == [True]

    def fail():
        raise ValueError("inconsistent bitmask")

    with pytest.raises(ValueError, match="inconsistent bitmask"):
        outside_graph_pools(fail)
