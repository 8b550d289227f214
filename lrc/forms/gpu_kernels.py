"""Triton kernels for a bitmask `SparseMatrix` on a GPU: y = x Sᵀ and S densified, read from the stored layout.

S (rows x cols) is stored as values (nnz,) in row-major order of the set bits and bitmask (rows, ⌈cols / 8⌉),
bit j % 8 of byte j // 8 set where column j is stored; starts (rows + 1,) int64 is where each row's values
begin (`sparse_matrix.bitmask_row_starts`). A program takes BLOCK_R rows and walks the columns BLOCK_K at a
time: it expands the chunk's bits, counts the set bits before each column (a cumulative sum along the chunk)
to find its value's index, and loads the stored values only, so the matrix's stored bytes are read once per token; nothing of the size of
S is written (matmul) or S itself is written once (dense). Accumulation is in float32.

Used where torch is a CUDA build with Triton (which CUDA builds of torch ship); elsewhere `available` is
False and the caller densifies with torch. `TRITON_INTERPRET=1` runs the same kernels on CPU tensors (tests).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from types import ModuleType

import torch

BLOCK_R = 32
BLOCK_K = 128
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
AGREEMENT = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # ||kernel - torch|| / ||torch||
_status: dict[str, str] = {}  # device type -> "ok", or why the kernels are not used there


@functools.cache
def _kernels() -> ModuleType | None:
    """lrc.forms.triton_kernels, or None without Triton (a CPU build of torch, a GPU stack without it)."""
    try:
        from . import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def available(values: torch.Tensor) -> bool:
    """Whether the kernels run for a matrix whose values are `values` (on a GPU, or on the CPU when Triton
    interprets)."""
    if values.dtype not in DTYPES or not (values.is_cuda or (INTERPRETED and values.device.type == "cpu")):
        return False
    return _kernels() is not None


def agree(values: torch.Tensor, bitmask: torch.Tensor, starts: torch.Tensor, cols: int,
          dense: Callable[[], torch.Tensor], x: torch.Tensor) -> bool:
    """Whether the kernels are used on values' device type: checked on their first use there in this process,
    where both must run and give torch's results (the matrix exactly, the product x Sᵀ for x's first token
    within AGREEMENT); otherwise a warning, once, and the caller densifies with torch. `dense`: torch's matrix."""
    device = values.device.type
    if device not in _status:
        try:
            reference = dense()
            same = torch.equal(bitmask_dense(values, bitmask, starts, cols), reference)
            got = bitmask_matmul(values, bitmask, starts, cols, x[:1]).double()
            want = x[:1].double() @ reference.double().T
            error = float((got - want).norm() / want.norm().clamp_min(1e-30))
            close = error <= AGREEMENT[values.dtype]
            _status[device] = "ok" if same and close else (
                f"they disagree with torch on this {device} device (matrix equal: {same}, product error {error:.1e})")
        except Exception as exc:  # a kernel that does not compile or launch here: torch's path still runs
            _status[device] = f"they failed on this {device} device ({type(exc).__name__}: {exc})"
        if _status[device] != "ok":
            warnings.warn(f"lrc's Triton kernels are not used: {_status[device]}", stacklevel=3)
    return _status[device] == "ok"


def bitmask_matmul(values: torch.Tensor, bitmask: torch.Tensor, starts: torch.Tensor, cols: int,
                   x: torch.Tensor) -> torch.Tensor:
    """x (tokens, cols) -> x Sᵀ (tokens, rows) in x's dtype (which must be the values')."""
    rows = bitmask.shape[0]
    x = x.contiguous()
    y = torch.empty(x.shape[0], rows, dtype=x.dtype, device=x.device)
    if x.shape[0] and rows:
        module = _kernels()
        assert module is not None, "lrc's GPU kernels need Triton (see available)"
        module.matmul_kernel[(-(-rows // BLOCK_R), x.shape[0])](
            values, bitmask, starts, x, y, rows, cols, bitmask.shape[1], x.stride(0), y.stride(0),
            BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K)
    return y


def bitmask_dense(values: torch.Tensor, bitmask: torch.Tensor, starts: torch.Tensor, cols: int) -> torch.Tensor:
    """S (rows, cols) in the values' dtype, zeros included."""
    rows = bitmask.shape[0]
    out = torch.empty(rows, cols, dtype=values.dtype, device=values.device)
    if rows and cols:
        module = _kernels()
        assert module is not None, "lrc's GPU kernels need Triton (see available)"
        module.dense_kernel[(-(-rows // BLOCK_R),)](values, bitmask, starts, out, rows, cols, bitmask.shape[1],
                                                    BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K)
    return out
