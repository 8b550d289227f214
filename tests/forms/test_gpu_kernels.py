"""lrc's Triton kernels for the bitmask layout (lrc/forms/gpu_kernels.py), run by Triton's interpreter on the CPU
(TRITON_INTERPRET=1, set in a child process: Triton reads it when the kernels are defined); tests/test_gpu.py
runs them compiled on a GPU. Checked against a float64 dense product and the dense matrix itself."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lrc.forms import gpu_kernels
from lrc.forms.sparse_matrix import SparseMatrix, bitmask_row_starts

CHILD = textwrap.dedent("""
    import torch
    from lrc.forms import gpu_kernels
    from lrc.forms.sparse_matrix import SparseMatrix, bitmask_row_starts

    assert gpu_kernels.INTERPRETED and gpu_kernels.available(torch.zeros(1))
    g = torch.Generator().manual_seed(0)
    # rows not a multiple of BLOCK_R, columns across several BLOCK_K chunks and a partial last byte; empty; full;
    # columns across three splits (SPLIT_K) and a partial last one
    for rows, cols, density in [(37, 300, 0.45), (5, 13, 0.0), (33, 129, 1.0), (35, 2 * gpu_kernels.SPLIT_K + 76, 0.3)]:
        for dtype, tolerance in [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)]:
            dense = (torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < density)).to(dtype)
            matrix = SparseMatrix.from_dense(dense, dense != 0, "bitmask")
            row_starts = bitmask_row_starts(matrix.bitmask, cols, matrix.nnz)
            assert torch.equal(row_starts[1:] - row_starts[:-1], (dense != 0).sum(1))
            starts = gpu_kernels.split_starts(row_starts, matrix.bitmask, cols)
            edges = torch.arange(starts.shape[1]) * gpu_kernels.SPLIT_K  # brute force: stored entries left of each split
            before = torch.stack([(dense[:, :e] != 0).sum(1) for e in edges.tolist()], 1)
            assert torch.equal(starts, row_starts[:-1, None] + before)
            assert torch.equal(gpu_kernels.bitmask_dense(matrix.values, matrix.bitmask, starts, cols), dense)
            for tokens in (1, 3, gpu_kernels.MAX_TOKENS):  # a row-wise sum, a tl.dot padded and full
                x = torch.randn(tokens, cols, generator=g).to(dtype)
                y = gpu_kernels.bitmask_matmul(matrix.values, matrix.bitmask, starts, cols, x)
                reference = x.double() @ dense.double().T
                assert y.dtype == dtype and y.shape == (tokens, rows)
                error = (y.double() - reference).norm() / reference.norm().clamp_min(1e-30)
                assert error < tolerance, (rows, cols, density, dtype, tokens, float(error))
            if density == 0.45 and dtype == torch.bfloat16:  # the first-use check passes them
                assert gpu_kernels.agree(matrix.values, matrix.bitmask, starts, cols, matrix.to_dense, x)
    print("kernels match")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (pip install 'lrc[dev]')")
def test_kernels_compute_the_dense_product_and_matrix():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "kernels match" in done.stdout, done.stderr[-3000:]


def test_a_cpu_matrix_does_not_use_them():
    """Without Triton's interpreter the kernels are for GPUs only: a CPU matrix keeps lrc's C kernels."""
    if gpu_kernels.INTERPRETED:
        pytest.skip("TRITON_INTERPRET is set in this process")
    assert not gpu_kernels.available(torch.zeros(3))
    dense = torch.eye(4)
    assert SparseMatrix.from_dense(dense, dense != 0, "bitmask")(torch.ones(1, 4)).tolist() == [[1.0] * 4]


def test_kernels_are_used_only_where_they_agree_with_torch(monkeypatch):
    """On their first use on a device the kernels are checked against torch (the matrix exactly, the product
    within AGREEMENT): stand-ins giving torch's results are used; a product off by 1%, or a kernel that fails
    to run, turns them off there with one warning naming why, and the answer is kept for the process."""
    dense = torch.randn(9, 20, generator=torch.Generator().manual_seed(4))
    dense[dense.abs() < 0.5] = 0
    matrix = SparseMatrix.from_dense(dense, dense != 0, "bitmask")
    starts = gpu_kernels.split_starts(bitmask_row_starts(matrix.bitmask, 20, matrix.nnz), matrix.bitmask, 20)
    x = torch.randn(2, 20)
    args = (matrix.values, matrix.bitmask, starts, 20, matrix.to_dense, x)

    def use(dense_kernel, matmul_kernel):
        monkeypatch.setattr(gpu_kernels, "_status", {})
        monkeypatch.setattr(gpu_kernels, "bitmask_dense", dense_kernel)
        monkeypatch.setattr(gpu_kernels, "bitmask_matmul", matmul_kernel)

    use(lambda v, b, s, c: dense.clone(), lambda v, b, s, c, x: x @ dense.T)
    assert gpu_kernels.agree(*args) and gpu_kernels._status == {"cpu": "ok"}

    use(lambda v, b, s, c: dense.clone(), lambda v, b, s, c, x: 1.01 * (x @ dense.T))
    with pytest.warns(UserWarning, match="disagree with torch.*product error 1.0e-02") as record:
        assert not gpu_kernels.agree(*args)
        assert not gpu_kernels.agree(*args)
    assert len(record) == 1

    def broken(*_):
        raise RuntimeError("no kernel image for this device")

    use(broken, lambda v, b, s, c, x: x @ dense.T)
    with pytest.warns(UserWarning, match="failed.*RuntimeError: no kernel image"):
        assert not gpu_kernels.agree(*args)
