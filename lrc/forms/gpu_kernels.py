"""Triton kernels for a bitmask `SparseMatrix` on a GPU: y = x Sᵀ and S densified, read from the stored layout.

S (rows x cols) is stored as values (nnz,) in row-major order of the set bits and bitmask (rows, ⌈cols / 8⌉),
bit j % 8 of byte j // 8 set where column j is stored. The columns are cut into splits of SPLIT_K (128);
`split_starts` (rows, splits) says where each row's values begin in each split (from
`sparse_matrix.bitmask_row_starts`, kept by the matrix next to its stored tensors: 4 bytes per row and 128
columns, 2.8% of a bfloat16 matrix half full). A program takes BLOCK_R rows of one split: it expands the
chunk's bits, counts the set bits before each column (a cumulative sum along the chunk) to find its value's
index, and loads the stored values only; the matmul multiplies the tile by every token's x at once (up to
MAX_TOKENS: a row-wise sum for one token, a tl.dot for more), so the matrix's stored bytes are read once per
call; the dense kernel writes S once. Accumulation is in float32; the splits' float32 partial sums are added
in a fixed order (the same bytes every run). Tile sizes from bench/gpu_kernel_sweep.py on an H100 (Llama-3-8B
mixings, 1 token): 16 rows x 128 columns took 23-121 µs where the earlier 32 x 512 took 40-235 µs
(bench/results/gpu_check/kernel_sweep_first.md).

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

BLOCK_R = 16
BLOCK_K = 128
TILES = 1  # BLOCK_K chunks per split
MAX_TOKENS = 16  # tokens one matmul program multiplies (tl.dot's least size)
SPLIT_K = TILES * BLOCK_K
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
    where both must run and give torch's results (the matrix exactly; the product x Sᵀ within AGREEMENT for
    x's first token and for two tokens, the matmul kernel's two paths); otherwise a warning, once, and the
    caller densifies with torch. `dense`: torch's matrix."""
    device = values.device.type
    if device not in _status:
        try:
            matrix = dense()
            same = torch.equal(bitmask_dense(values, bitmask, starts, cols), matrix)
            reference = matrix.double()
            error = 0.0
            for probe in (x[:1], torch.cat([x[:1], -x[:1].flip(-1)])):
                got = bitmask_matmul(values, bitmask, starts, cols, probe).double()
                want = probe.double() @ reference.T
                error = max(error, float((got - want).norm() / want.norm().clamp_min(1e-30)))
            close = error <= AGREEMENT[values.dtype]
            _status[device] = "ok" if same and close else (
                f"they disagree with torch on this {device} device (matrix equal: {same}, product error {error:.1e})")
        except Exception as exc:  # a kernel that does not compile or launch here: torch's path still runs
            _status[device] = f"they failed on this {device} device ({type(exc).__name__}: {exc})"
        if _status[device] != "ok":
            warnings.warn(f"lrc's Triton kernels are not used: {_status[device]}", stacklevel=3)
    return _status[device] == "ok"


def split_starts(row_starts: torch.Tensor, bitmask: torch.Tensor, cols: int, split: int = SPLIT_K) -> torch.Tensor:
    """(rows, ⌈cols / split⌉) int32 (int64 past 2³¹ values): where row r's values of columns s·split onward
    begin, from the row starts (rows + 1,) and the bitmask (rows, ⌈cols / 8⌉); `split` a multiple of 8 (the
    kernels' SPLIT_K; bench/gpu_kernel_sweep.py tries others)."""
    rows, stride = bitmask.shape
    splits = max(1, -(-cols // split))
    padded = torch.zeros(rows, splits * split // 8, dtype=torch.uint8, device=bitmask.device)
    padded[:, :stride] = bitmask
    shifts = torch.arange(8, device=bitmask.device, dtype=torch.uint8)
    counts = ((padded.view(rows, splits, split // 8, 1) >> shifts) & 1).sum((2, 3), dtype=torch.int64)
    starts = row_starts[:-1, None] + counts.cumsum(1) - counts
    narrow = bool(row_starts.numel()) and int(row_starts[-1]) <= torch.iinfo(torch.int32).max
    return starts.to(torch.int32 if narrow else torch.int64).contiguous()


def bitmask_matmul(values: torch.Tensor, bitmask: torch.Tensor, starts: torch.Tensor, cols: int,
                   x: torch.Tensor) -> torch.Tensor:
    """x (tokens ≤ MAX_TOKENS, cols) -> x Sᵀ (tokens, rows) in x's dtype (which must be the values'); starts from
    split_starts."""
    rows, splits = starts.shape
    tokens = x.shape[0]
    if tokens > MAX_TOKENS:
        raise ValueError(f"the bitmask kernel multiplies at most {MAX_TOKENS} tokens at a time, got {tokens}")
    x = x.contiguous()
    # one split writes y itself; several write float32 partial sums (splits, tokens, rows), added below
    out = torch.empty(tokens, rows, dtype=x.dtype, device=x.device) if splits == 1 else \
        torch.empty(splits, tokens, rows, dtype=torch.float32, device=x.device)
    if tokens and rows:
        module = _kernels()
        assert module is not None, "lrc's GPU kernels need Triton (see available)"
        # float32 products in full precision (not TF32); 16-bit values and inputs are exact in TF32
        precision = "ieee" if values.dtype == torch.float32 else "tf32"
        module.matmul_kernel[(-(-rows // BLOCK_R), splits)](
            values, bitmask, starts, x, out, rows, cols, bitmask.shape[1], splits, tokens, x.stride(0), rows,
            tokens * rows, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, TILES=TILES, BLOCK_T=1 if tokens == 1 else MAX_TOKENS,
            PRECISION=precision)
    return out if splits == 1 else out.sum(0).to(x.dtype)


def bitmask_dense(values: torch.Tensor, bitmask: torch.Tensor, starts: torch.Tensor, cols: int) -> torch.Tensor:
    """S (rows, cols) in the values' dtype, zeros included; starts from split_starts."""
    rows, splits = starts.shape
    out = torch.empty(rows, cols, dtype=values.dtype, device=values.device)
    if rows and cols:
        module = _kernels()
        assert module is not None, "lrc's GPU kernels need Triton (see available)"
        module.dense_kernel[(-(-rows // BLOCK_R), splits)](values, bitmask, starts, out, rows, cols, bitmask.shape[1],
                                                           splits, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, TILES=TILES)
    return out
