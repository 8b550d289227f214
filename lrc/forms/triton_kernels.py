"""The Triton kernels of `gpu_kernels` (imported by it on first use: importing Triton takes about a second).

See gpu_kernels for the layout and the method; `_chunk` is the one tile both kernels read.
"""

from __future__ import annotations

try:  # a try block, so that transformers' check of an output's copy of this module does not demand Triton
    import triton
    import triton.language as tl
except ImportError:  # gpu_kernels imports this module where it can: without Triton its product is torch's
    raise


@triton.jit
def _chunk(values, bitmask, r, live, offset, k0, cols, bytes_per_row, BLOCK_K: tl.constexpr):
    """The BLOCK_R x BLOCK_K tile of S at columns k0.., float32 (zeros where nothing is stored), its
    columns, and each row's count of stored entries in it."""
    c = k0 + tl.arange(0, BLOCK_K)
    inside = live[:, None] & (c < cols)[None, :]
    byte = tl.load(bitmask + r[:, None] * bytes_per_row + (c[None, :] >> 3), mask=inside, other=0)
    bit = (byte.to(tl.int32) >> (c[None, :] & 7)) & 1
    before = tl.cumsum(bit, axis=1) - bit
    w = tl.load(values + offset[:, None] + before, mask=inside & (bit != 0), other=0.0).to(tl.float32)
    return w, c, tl.sum(bit, axis=1)


@triton.jit
def matmul_kernel(values, bitmask, starts, x, y, rows, cols, bytes_per_row, splits, tokens, stride_x, stride_y,
                  stride_split, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, TILES: tl.constexpr,
                  BLOCK_T: tl.constexpr, PRECISION: tl.constexpr):
    """y[s, t, r] = Σ over split s's columns of S[r, c] x[t, c] for every token t (program (row block, split s)):
    the tile is read once for all tokens; one token is a row-wise sum (a vector: holding it as a 1 x BLOCK_R
    matrix took 1.3x as long on an H100), up to BLOCK_T (16) tokens a tl.dot."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    s = tl.program_id(1)
    live = r < rows
    offset = tl.load(starts + r * splits + s, mask=live, other=0)
    if BLOCK_T == 1:
        acc1 = tl.zeros([BLOCK_R], dtype=tl.float32)
        for i in range(TILES):
            k0 = (s * TILES + i) * BLOCK_K
            w, c, stored = _chunk(values, bitmask, r, live, offset, k0, cols, bytes_per_row, BLOCK_K)
            xv = tl.load(x + c, mask=c < cols, other=0.0).to(tl.float32)
            acc1 += tl.sum(w * xv[None, :], axis=1)
            offset += stored
        tl.store(y + s * stride_split + r, acc1.to(y.dtype.element_ty), mask=live)
    else:
        t = tl.arange(0, BLOCK_T)
        acc = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
        for i in range(TILES):
            k0 = (s * TILES + i) * BLOCK_K
            w, c, stored = _chunk(values, bitmask, r, live, offset, k0, cols, bytes_per_row, BLOCK_K)
            xv = tl.load(x + t[:, None] * stride_x + c[None, :], mask=(t < tokens)[:, None] & (c < cols)[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.dot(xv, tl.trans(w), input_precision=PRECISION)
            offset += stored
        tl.store(y + s * stride_split + t[:, None] * stride_y + r[None, :], acc.to(y.dtype.element_ty),
                 mask=(t < tokens)[:, None] & live[None, :])


@triton.jit
def dense_kernel(values, bitmask, starts, out, rows, cols, bytes_per_row, splits,
                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, TILES: tl.constexpr):
    """out[r, c] = S[r, c] for split s's columns (program (row block, split s))."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    s = tl.program_id(1)
    live = r < rows
    offset = tl.load(starts + r * splits + s, mask=live, other=0)
    for i in range(TILES):
        k0 = (s * TILES + i) * BLOCK_K
        w, c, stored = _chunk(values, bitmask, r, live, offset, k0, cols, bytes_per_row, BLOCK_K)
        tl.store(out + r[:, None] * cols + c[None, :], w.to(out.dtype.element_ty),
                 mask=live[:, None] & (c < cols)[None, :])
        offset += stored
