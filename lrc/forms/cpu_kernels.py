"""CPU kernels: products with a sparse matrix straight from its stored layout (no copy kept in memory), and
the one-token bfloat16 product of the dense factors.

A `SparseMatrix` (see sparse_matrix.py) stores S (rows x cols) as
- "bitmask": values (nnz,) row-major, bitmask (rows, stride = ⌈cols / 8⌉) uint8, bit j % 8 of byte j // 8
  set where column j holds a value;
- "csr":     values (nnz,), col_indices (nnz,) int16, row_offsets (rows + 1,) int32.
The kernels here compute, for x (tokens x cols), y = x Sᵀ (tokens x rows), and S itself as a dense matrix
(the prefill path: one dense matmul on the transient dense S), reading only those tensors plus, for the
bitmask, the start of each row's values (rows + 1 int64, 8 bytes per row). Values and x are float32 or
bfloat16 (accumulated in float32, rounded once to bfloat16 like a dense bfloat16 matmul).

They are C, kept here as source, compiled once per machine with the system C compiler (`CC`, else gcc or
cc; `-O3 -march=native -fopenmp`) into a per-user cache (`LRC_KERNEL_DIR`, default ~/.cache/lrc/kernels)
and called through ctypes. With AVX-512 the bitmask kernel loads each 16-column chunk's values with one
expand-load (`vexpandps`: values to the lanes whose mask bit is set, zeros elsewhere), so a row costs
⌈cols / 16⌉ fused multiply-adds per token whatever its density. Where no compiler works, or for another
device, dtype or index width, `available()` is False and `SparseMatrix` densifies with torch instead (same
numbers, slower).

`linear` is nn.functional.linear with two exceptions in bfloat16 on CPU. A few tokens (decoding) run a
dense C kernel, four rows of W by up to four tokens per pass, accumulated in float32 and rounded once.
Measured on Xeons with AVX-512 (2 threads, torch 2.13, SmolLM2-135M's factor shapes, 128 x 576 to 576 x 1536):
with AMX, torch's bfloat16 product for one token took 38-160 us, slower than its float32 one (10-67 us), the
kernel 10-42 us, and from 5 tokens torch's AMX product was as fast or faster; without AMX (oneDNN's
avx512_core_bf16 kernels), torch's product took 1.0-2.4x the kernel's time at 8 tokens and 0.6-1.3x at 32
(bench/cpu_kernel_crossover.py, three runs).
So the kernel runs up to 4 tokens where the CPU has AMX and up to 8 where it has not. Above that, on an
x86 CPU without AMX, the product runs in float32 (x and W converted for the call, rounded once to
bfloat16): there torch's bfloat16 product took 1.3-1.6x the float32 one's time at 512 tokens, 1.1-1.4x at
64-128, 0.8-1.1x at 8-16 (the same bench; a whole 16-token step the same time either way), and oneDNN kept
about 0.7 MiB per distinct (weight shape, token count) it had seen for the life of the process
(SmolLM2-135M compressed at 0.3 has ~95 factor shapes, dense 7: each new prompt length cost it 30-115 MiB,
bench/prompt_lengths.py).

`lowrank_linear` (bfloat16) and `BoundMatmul.after_dense` (float32 or bfloat16) make a factorized layer's
two products (low rank: down then up; sparse dictionary: atoms then the bitmask mixing) in one call up to
DENSE_KERNEL_MAX_TOKENS tokens: at decode sizes a call's Python and dispatch cost as much as its product
(bench/decode_calls.py). This module imports torch and the standard library only (it travels with the
model's own modeling code).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ENABLED = os.environ.get("LRC_CPU_KERNELS", "1") != "0"  # "0": torch's products everywhere (slower)

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VBMI2__)
#include <immintrin.h>
#define LRC_AVX512 1
#endif

#define TOKEN_BLOCK 8
#ifndef LRC_PREFETCH
#define LRC_PREFETCH 4096  /* bytes ahead: a stream read once per token is fetched this far ahead */
#endif

static inline float bf16_to_f32(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
/* the 16 mask bits of columns j .. j+15 (j a multiple of 16) */
static inline uint32_t chunk_bits(const uint8_t *row, int64_t j, int64_t stride) {
    int64_t b = j >> 3;
    uint32_t lo = row[b], hi = (b + 1 < stride) ? row[b + 1] : 0u;
    return lo | (hi << 8);
}

#ifdef LRC_AVX512
static inline __m512 widen_bf16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline __m512 load_bf16(__mmask16 m, const uint16_t *p) {
    __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
/* the popcount(m) values at p, spread to the lanes set in m (a masked load never touches memory past them) */
static inline __m512 expand_f32(__mmask16 m, const float *p) {
    __mmask16 first = (__mmask16)((1u << __builtin_popcount((unsigned)m)) - 1u);
    return _mm512_maskz_expand_ps(m, _mm512_maskz_loadu_ps(first, p));
}
static inline __m512 expand_bf16(__mmask16 m, const uint16_t *p) {
    __mmask16 first = (__mmask16)((1u << __builtin_popcount((unsigned)m)) - 1u);
    __m256i h = _mm256_maskz_expand_epi16(m, _mm256_maskz_loadu_epi16(first, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

/* One row i of y = x S^T for TN tokens (a compile-time constant after inlining, so the accumulators stay in
   registers), S in the bitmask layout, values from vals + p. */
static inline __attribute__((always_inline)) void bitmask_row(const int TN, int bf16, const uint8_t *mrow,
        const void *vals, int64_t p, int64_t nnz, int64_t rows, int64_t cols, int64_t stride, const void *x, int64_t i,
        void *y) {
    float sum[TOKEN_BLOCK];
#ifdef LRC_AVX512
    __m512 acc[TOKEN_BLOCK], acc2[TOKEN_BLOCK];  /* two chains (even / odd chunks): the FMAs overlap */
    for (int k = 0; k < TN; ++k) acc[k] = acc2[k] = _mm512_setzero_ps();
    int64_t j = 0;
    /* whole 32-column steps: the mask as one 32-bit word, x read unmasked (zeros of v stand where S is zero,
       as in a dense product), values read unmasked while 32 of them remain in the buffer */
    for (; j + 32 <= cols; j += 32) {
        uint32_t bits;
        memcpy(&bits, mrow + (j >> 3), 4);
        __mmask16 m = (__mmask16)(bits & 0xffffu), m2 = (__mmask16)(bits >> 16);
        __m512 v, v2;
        _mm_prefetch((const char *)vals + p * (bf16 ? 2 : 4) + LRC_PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)mrow + (j >> 3) + LRC_PREFETCH, _MM_HINT_T0);
        if (p + 32 <= nnz) {
            if (bf16) {
                v = widen_bf16(_mm256_maskz_expand_epi16(m, _mm256_loadu_si256((const __m256i *)((const uint16_t *)vals + p))));
                p += __builtin_popcount((unsigned)m);
                v2 = widen_bf16(_mm256_maskz_expand_epi16(m2, _mm256_loadu_si256((const __m256i *)((const uint16_t *)vals + p))));
            } else {
                v = _mm512_maskz_expand_ps(m, _mm512_loadu_ps((const float *)vals + p));
                p += __builtin_popcount((unsigned)m);
                v2 = _mm512_maskz_expand_ps(m2, _mm512_loadu_ps((const float *)vals + p));
            }
        } else {
            v = bf16 ? expand_bf16(m, (const uint16_t *)vals + p) : expand_f32(m, (const float *)vals + p);
            p += __builtin_popcount((unsigned)m);
            v2 = bf16 ? expand_bf16(m2, (const uint16_t *)vals + p) : expand_f32(m2, (const float *)vals + p);
        }
        p += __builtin_popcount((unsigned)m2);
        for (int k = 0; k < TN; ++k) {
            __m512 xv, xv2;
            if (bf16) {
                xv = widen_bf16(_mm256_loadu_si256((const __m256i *)((const uint16_t *)x + k * cols + j)));
                xv2 = widen_bf16(_mm256_loadu_si256((const __m256i *)((const uint16_t *)x + k * cols + j + 16)));
            } else {
                xv = _mm512_loadu_ps((const float *)x + k * cols + j);
                xv2 = _mm512_loadu_ps((const float *)x + k * cols + j + 16);
            }
            acc[k] = _mm512_fmadd_ps(v, xv, acc[k]);
            acc2[k] = _mm512_fmadd_ps(v2, xv2, acc2[k]);
        }
    }
    for (; j < cols; j += 16) {
        __mmask16 m = (__mmask16)chunk_bits(mrow, j, stride);
        __m512 v;
        if (bf16) v = expand_bf16(m, (const uint16_t *)vals + p);
        else v = expand_f32(m, (const float *)vals + p);
        p += __builtin_popcount((unsigned)m);
        for (int k = 0; k < TN; ++k) {
            __m512 xv = bf16 ? load_bf16(m, (const uint16_t *)x + k * cols + j)
                             : _mm512_maskz_loadu_ps(m, (const float *)x + k * cols + j);
            acc[k] = _mm512_fmadd_ps(v, xv, acc[k]);
        }
    }
    for (int k = 0; k < TN; ++k) sum[k] = _mm512_reduce_add_ps(_mm512_add_ps(acc[k], acc2[k]));
#else
    for (int k = 0; k < TN; ++k) sum[k] = 0.0f;
    for (int64_t j = 0; j < cols; ++j) {
        if (!((mrow[j >> 3] >> (j & 7)) & 1)) continue;
        float v = bf16 ? bf16_to_f32(((const uint16_t *)vals)[p]) : ((const float *)vals)[p];
        ++p;
        for (int k = 0; k < TN; ++k) {
            int64_t at = k * cols + j;
            sum[k] += v * (bf16 ? bf16_to_f32(((const uint16_t *)x)[at]) : ((const float *)x)[at]);
        }
    }
#endif
    for (int k = 0; k < TN; ++k) {
        if (bf16) ((uint16_t *)y)[k * rows + i] = f32_to_bf16(sum[k]);
        else ((float *)y)[k * rows + i] = sum[k];
    }
}

#ifdef LRC_AVX512
/* Rows i .. i+3 of y = x S^T for one token (decoding): the four rows share each load of x and their FMA
   chains overlap. Values are read unmasked: the caller makes sure 32 values follow row i+3's end. */
static inline __attribute__((always_inline)) void bitmask_four_rows(int bf16, const uint8_t *mask, int64_t stride,
        const void *vals, const int64_t *offs, int64_t cols, const void *x, int64_t i, void *y) {
    __m512 acc[4], acc2[4];
    int64_t p[4];
    const uint8_t *mrow[4];
    for (int r = 0; r < 4; ++r) {
        acc[r] = acc2[r] = _mm512_setzero_ps();
        p[r] = offs[i + r];
        mrow[r] = mask + (i + r) * stride;
    }
    int64_t j = 0;
    for (; j + 32 <= cols; j += 32) {
        __m512 xv, xv2;
        if (bf16) {
            xv = widen_bf16(_mm256_loadu_si256((const __m256i *)((const uint16_t *)x + j)));
            xv2 = widen_bf16(_mm256_loadu_si256((const __m256i *)((const uint16_t *)x + j + 16)));
        } else {
            xv = _mm512_loadu_ps((const float *)x + j);
            xv2 = _mm512_loadu_ps((const float *)x + j + 16);
        }
        for (int r = 0; r < 4; ++r) {
            uint32_t bits;
            memcpy(&bits, mrow[r] + (j >> 3), 4);
            __mmask16 m = (__mmask16)(bits & 0xffffu), m2 = (__mmask16)(bits >> 16);
            __m512 v, v2;
            /* streamed from memory once per token: fetch ahead of the hardware prefetcher (values, then bits) */
            _mm_prefetch((const char *)vals + p[r] * (bf16 ? 2 : 4) + LRC_PREFETCH, _MM_HINT_T0);
            _mm_prefetch((const char *)mrow[r] + (j >> 3) + LRC_PREFETCH, _MM_HINT_T0);
            if (bf16) {
                v = widen_bf16(_mm256_maskz_expand_epi16(m, _mm256_loadu_si256((const __m256i *)((const uint16_t *)vals + p[r]))));
                p[r] += __builtin_popcount((unsigned)m);
                v2 = widen_bf16(_mm256_maskz_expand_epi16(m2, _mm256_loadu_si256((const __m256i *)((const uint16_t *)vals + p[r]))));
            } else {
                v = _mm512_maskz_expand_ps(m, _mm512_loadu_ps((const float *)vals + p[r]));
                p[r] += __builtin_popcount((unsigned)m);
                v2 = _mm512_maskz_expand_ps(m2, _mm512_loadu_ps((const float *)vals + p[r]));
            }
            p[r] += __builtin_popcount((unsigned)m2);
            acc[r] = _mm512_fmadd_ps(v, xv, acc[r]);
            acc2[r] = _mm512_fmadd_ps(v2, xv2, acc2[r]);
        }
    }
    for (; j < cols; j += 16) {
        __mmask16 lanes = cols - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (cols - j)) - 1u);
        __m512 xv = bf16 ? load_bf16(lanes, (const uint16_t *)x + j) : _mm512_maskz_loadu_ps(lanes, (const float *)x + j);
        for (int r = 0; r < 4; ++r) {
            __mmask16 m = (__mmask16)chunk_bits(mrow[r], j, stride);
            __m512 v = bf16 ? expand_bf16(m, (const uint16_t *)vals + p[r]) : expand_f32(m, (const float *)vals + p[r]);
            p[r] += __builtin_popcount((unsigned)m);
            acc[r] = _mm512_fmadd_ps(v, xv, acc[r]);
        }
    }
    for (int r = 0; r < 4; ++r) {
        float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], acc2[r]));
        if (bf16) ((uint16_t *)y)[i + r] = f32_to_bf16(sum);
        else ((float *)y)[i + r] = sum;
    }
}
#endif

#define ROW_CASE(TN) case TN: { \
    if (bf16) bitmask_row(TN, 1, mrow, vals, offs[i], offs[rows], rows, cols, stride, xb, i, yb); \
    else bitmask_row(TN, 0, mrow, vals, offs[i], offs[rows], rows, cols, stride, xb, i, yb); } break;

/* y (tokens x rows) = x (tokens x cols) S^T, S in the bitmask layout; bf16: values, x, y are bfloat16. The rows
   are shared among the threads of the enclosing parallel region (outside one, this thread does them all). */
static void bitmask_stage(int bf16, const uint8_t *mask, const void *vals, const int64_t *offs, int64_t rows,
                          int64_t cols, int64_t stride, const void *x, int64_t tokens, void *y) {
    int64_t esize = bf16 ? 2 : 4;
#ifdef LRC_AVX512
    if (tokens == 1) {  /* decoding: groups of four rows while 32 values follow a group's last row, then rows */
        int64_t groups = rows / 4;
        while (groups > 0 && offs[4 * groups] + 32 > offs[rows]) --groups;
        int64_t units = groups + rows - 4 * groups;
        #pragma omp for schedule(static)
        for (int64_t u = 0; u < units; ++u) {
            if (u < groups) {
                if (bf16) bitmask_four_rows(1, mask, stride, vals, offs, cols, x, 4 * u, y);
                else bitmask_four_rows(0, mask, stride, vals, offs, cols, x, 4 * u, y);
            } else {
                int64_t i = 4 * groups + (u - groups);
                if (bf16) bitmask_row(1, 1, mask + i * stride, vals, offs[i], offs[rows], rows, cols, stride, x, i, y);
                else bitmask_row(1, 0, mask + i * stride, vals, offs[i], offs[rows], rows, cols, stride, x, i, y);
            }
        }
        return;
    }
#endif
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
        const uint8_t *mrow = mask + i * stride;
        for (int64_t t0 = 0; t0 < tokens; t0 += TOKEN_BLOCK) {
            int64_t tn = tokens - t0 < TOKEN_BLOCK ? tokens - t0 : TOKEN_BLOCK;
            const char *xb = (const char *)x + t0 * cols * esize;
            char *yb = (char *)y + t0 * rows * esize;
            switch (tn) { ROW_CASE(1) ROW_CASE(2) ROW_CASE(3) ROW_CASE(4) ROW_CASE(5) ROW_CASE(6) ROW_CASE(7) ROW_CASE(8) }
        }
    }
}

/* out (rows x cols, written whole) = S, from the bitmask layout */
static void bitmask_dense(int bf16, const uint8_t *mask, const void *vals, const int64_t *offs, int64_t rows,
                          int64_t cols, int64_t stride, void *out, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
        const uint8_t *mrow = mask + i * stride;
        int64_t p = offs[i];
#ifdef LRC_AVX512
        for (int64_t j = 0; j < cols; j += 16) {
            __mmask16 m = (__mmask16)chunk_bits(mrow, j, stride);
            __mmask16 lanes = cols - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (cols - j)) - 1u);
            if (bf16) {
                __m256i v = _mm256_maskz_expandloadu_epi16(m, (const uint16_t *)vals + p);
                _mm256_mask_storeu_epi16((uint16_t *)out + i * cols + j, lanes, v);
            } else {
                __m512 v = _mm512_maskz_expandloadu_ps(m, (const float *)vals + p);
                _mm512_mask_storeu_ps((float *)out + i * cols + j, lanes, v);
            }
            p += __builtin_popcount((unsigned)m);
        }
#else
        for (int64_t j = 0; j < cols; ++j) {
            int set = (mrow[j >> 3] >> (j & 7)) & 1;
            if (bf16) ((uint16_t *)out)[i * cols + j] = set ? ((const uint16_t *)vals)[p] : 0;
            else ((float *)out)[i * cols + j] = set ? ((const float *)vals)[p] : 0.0f;
            p += set;
        }
#endif
    }
}

/* y (tokens x rows) = x S^T, S in the csr layout (int16 column indices, int32 row offsets) */
static void csr_mm(int bf16, const void *vals, const int16_t *col, const int32_t *offs, int64_t rows, int64_t cols,
                   const void *x, int64_t tokens, void *y, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
        for (int64_t t0 = 0; t0 < tokens; t0 += TOKEN_BLOCK) {
            int64_t tn = tokens - t0 < TOKEN_BLOCK ? tokens - t0 : TOKEN_BLOCK;
            float sum[TOKEN_BLOCK] = {0};
            for (int64_t p = offs[i]; p < offs[i + 1]; ++p) {
                float v = bf16 ? bf16_to_f32(((const uint16_t *)vals)[p]) : ((const float *)vals)[p];
                int64_t c = (uint16_t)col[p];
                for (int64_t k = 0; k < tn; ++k) {
                    int64_t at = (t0 + k) * cols + c;
                    sum[k] += v * (bf16 ? bf16_to_f32(((const uint16_t *)x)[at]) : ((const float *)x)[at]);
                }
            }
            for (int64_t k = 0; k < tn; ++k) {
                if (bf16) ((uint16_t *)y)[(t0 + k) * rows + i] = f32_to_bf16(sum[k]);
                else ((float *)y)[(t0 + k) * rows + i] = sum[k];
            }
        }
    }
}

/* out (rows x cols, zero-filled by the caller) = S, from the csr layout */
static void csr_dense(int bf16, const void *vals, const int16_t *col, const int32_t *offs, int64_t rows,
                      int64_t cols, void *out, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < rows; ++i)
        for (int64_t p = offs[i]; p < offs[i + 1]; ++p) {
            int64_t at = i * cols + (uint16_t)col[p];
            if (bf16) ((uint16_t *)out)[at] = ((const uint16_t *)vals)[p];
            else ((float *)out)[at] = ((const float *)vals)[p];
        }
}

/* Element `at` of a bfloat16 (bf16) or float32 array, as float32, and stored back rounded once. */
static inline float load_one(int bf16, const void *p, int64_t at) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[at]) : ((const float *)p)[at];
}
static inline void store_one(int bf16, void *p, int64_t at, float v) {
    if (bf16) ((uint16_t *)p)[at] = f32_to_bf16(v);
    else ((float *)p)[at] = v;
}
#ifdef LRC_AVX512
/* 16 elements from `at` (the lanes of m, zeros elsewhere), as float32 */
static inline __m512 load_lanes(int bf16, __mmask16 m, const void *p, int64_t at) {
    return bf16 ? load_bf16(m, (const uint16_t *)p + at) : _mm512_maskz_loadu_ps(m, (const float *)p + at);
}
static inline __m512 load_all(int bf16, const void *p, int64_t at) {
    return bf16 ? widen_bf16(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + at))) : _mm512_loadu_ps((const float *)p + at);
}
#endif

/* Rows i .. i+R-1 of y (TN x rows) = x W^T (+ b) for TN tokens, W (rows x cols) dense row-major; W, x, b, y
   all bfloat16 (bf16) or all float32: the rows share each load of x, accumulated in float32 and rounded
   once. R, TN, bf16 are compile-time constants after inlining (R x TN accumulators stay in registers; for
   one token two chains per row, even and odd 16-column chunks, so the FMAs overlap). */
static inline __attribute__((always_inline)) void dense_rows(const int R, const int TN, const int bf16, const void *w,
        const void *bias, int64_t rows, int64_t cols, const void *x, int64_t i, void *y) {
    float sum[4][4];
    const int64_t esize = bf16 ? 2 : 4;
#ifdef LRC_AVX512
    __m512 acc[4][4], acc2[4];
    for (int r = 0; r < R; ++r) {
        acc2[r] = _mm512_setzero_ps();
        for (int k = 0; k < TN; ++k) acc[r][k] = _mm512_setzero_ps();
    }
    int64_t j = 0;
    if (TN == 1)
        for (; j + 32 <= cols; j += 32) {
            __m512 xv = load_all(bf16, x, j), xv2 = load_all(bf16, x, j + 16);
            for (int r = 0; r < R; ++r) {
                int64_t at = (i + r) * cols + j;
                _mm_prefetch((const char *)w + at * esize + LRC_PREFETCH, _MM_HINT_T0);  /* streamed once per token */
                acc[r][0] = _mm512_fmadd_ps(load_all(bf16, w, at), xv, acc[r][0]);
                acc2[r] = _mm512_fmadd_ps(load_all(bf16, w, at + 16), xv2, acc2[r]);
            }
        }
    for (; j < cols; j += 16) {
        __mmask16 lanes = cols - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (cols - j)) - 1u);
        __m512 xv[4];
        for (int k = 0; k < TN; ++k) xv[k] = load_lanes(bf16, lanes, x, k * cols + j);
        for (int r = 0; r < R; ++r) {
            int64_t at = (i + r) * cols + j;
            _mm_prefetch((const char *)w + at * esize + LRC_PREFETCH, _MM_HINT_T0);
            __m512 v = load_lanes(bf16, lanes, w, at);
            for (int k = 0; k < TN; ++k) acc[r][k] = _mm512_fmadd_ps(v, xv[k], acc[r][k]);
        }
    }
    for (int r = 0; r < R; ++r) {
        acc[r][0] = _mm512_add_ps(acc[r][0], acc2[r]);
        for (int k = 0; k < TN; ++k) sum[r][k] = _mm512_reduce_add_ps(acc[r][k]);
    }
#else
    for (int r = 0; r < R; ++r)
        for (int k = 0; k < TN; ++k) {
            sum[r][k] = 0.0f;
            for (int64_t j = 0; j < cols; ++j) sum[r][k] += load_one(bf16, w, (i + r) * cols + j) * load_one(bf16, x, k * cols + j);
        }
#endif
    for (int r = 0; r < R; ++r)
        for (int k = 0; k < TN; ++k)
            store_one(bf16, y, k * rows + i + r, bias ? sum[r][k] + load_one(bf16, bias, i + r) : sum[r][k]);
}

#define DENSE_CASE(R, TN) case 4 * (R - 1) + TN - 1: { \
    if (bf16) dense_rows(R, TN, 1, w, bias, rows, cols, xb, i, yb); else dense_rows(R, TN, 0, w, bias, rows, cols, xb, i, yb); } break;

/* y (tokens x rows) = x W^T (+ b): groups of four rows, blocks of four tokens, the groups shared among the
   threads of the enclosing parallel region (outside one, this thread does them all) */
static void dense_stage(int bf16, const void *w, const void *bias, int64_t rows, int64_t cols, const void *x,
                        int64_t tokens, void *y) {
    int64_t units = (rows + 3) / 4, esize = bf16 ? 2 : 4;
    #pragma omp for schedule(static)
    for (int64_t u = 0; u < units; ++u) {
        int64_t i = 4 * u, nr = rows - i >= 4 ? 4 : rows - i;
        for (int64_t t0 = 0; t0 < tokens; t0 += 4) {
            int64_t tn = tokens - t0 >= 4 ? 4 : tokens - t0;
            const char *xb = (const char *)x + t0 * cols * esize;
            char *yb = (char *)y + t0 * rows * esize;
            switch (4 * (nr - 1) + tn - 1) {
                DENSE_CASE(1, 1) DENSE_CASE(1, 2) DENSE_CASE(1, 3) DENSE_CASE(1, 4)
                DENSE_CASE(2, 1) DENSE_CASE(2, 2) DENSE_CASE(2, 3) DENSE_CASE(2, 4)
                DENSE_CASE(3, 1) DENSE_CASE(3, 2) DENSE_CASE(3, 3) DENSE_CASE(3, 4)
                DENSE_CASE(4, 1) DENSE_CASE(4, 2) DENSE_CASE(4, 3) DENSE_CASE(4, 4)
            }
        }
    }
}

/* few products are worth waking a second thread for */
#define PARALLEL_WORK 32768

void lrc_bitmask_mm(int bf16, const uint8_t *mask, const void *vals, const int64_t *offs, int64_t rows,
                    int64_t cols, int64_t stride, const void *x, int64_t tokens, void *y, int threads) {
    #pragma omp parallel num_threads(threads)
    bitmask_stage(bf16, mask, vals, offs, rows, cols, stride, x, tokens, y);
}
void lrc_bitmask_dense(int bf16, const uint8_t *mask, const void *vals, const int64_t *offs, int64_t rows,
                       int64_t cols, int64_t stride, void *out, int threads) {
    bitmask_dense(bf16, mask, vals, offs, rows, cols, stride, out, threads);
}
void lrc_csr_mm(int bf16, const void *vals, const int16_t *col, const int32_t *offs, int64_t rows, int64_t cols,
                const void *x, int64_t tokens, void *y, int threads) {
    csr_mm(bf16, vals, col, offs, rows, cols, x, tokens, y, threads);
}
void lrc_csr_dense(int bf16, const void *vals, const int16_t *col, const int32_t *offs, int64_t rows,
                   int64_t cols, void *out, int threads) {
    csr_dense(bf16, vals, col, offs, rows, cols, out, threads);
}
void lrc_dense_mm(int bf16, const void *w, const void *bias, int64_t rows, int64_t cols, const void *x,
                  int64_t tokens, void *y, int threads) {
    #pragma omp parallel num_threads(threads) if (rows * cols * tokens >= PARALLEL_WORK)
    dense_stage(bf16, w, bias, rows, cols, x, tokens, y);
}
/* y = (x D^T) U^T (+ b), D (rank x in), U (out x rank): t = x D^T (tokens x rank, rounded to the layer's dtype
   as a separate product would be), then y from t, in one parallel region (the threads meet between the two).
   0, or -1 (nothing computed) where t could not be allocated. */
int lrc_lowrank_mm(int bf16, const void *d, const void *u, const void *bias, int64_t rank, int64_t in, int64_t out,
                    const void *x, int64_t tokens, void *y, int threads) {
    void *t = malloc((size_t)(tokens * rank * (bf16 ? 2 : 4)) + 1);
    if (!t) return -1;
    #pragma omp parallel num_threads(threads) if ((in + out) * rank * tokens >= PARALLEL_WORK)
    {
        dense_stage(bf16, d, 0, rank, in, x, tokens, t);
        dense_stage(bf16, u, bias, out, rank, t, tokens, y);
    }
    free(t);
    return 0;
}
/* y = (x F^T) S^T, F (cols x in) dense, S (rows x cols) in the bitmask layout: t = x F^T as above, then y;
   0, or -1 as above */
int lrc_bitmask_mm_after_dense(int bf16, const uint8_t *mask, const void *vals, const int64_t *offs, int64_t rows,
                               int64_t cols, int64_t stride, const void *first, int64_t in, const void *x,
                               int64_t tokens, void *y, int threads) {
    void *t = malloc((size_t)(tokens * cols * (bf16 ? 2 : 4)) + 1);
    if (!t) return -1;
    #pragma omp parallel num_threads(threads) if ((in * cols + offs[rows]) * tokens >= PARALLEL_WORK)
    {
        dense_stage(bf16, first, 0, cols, in, x, tokens, t);
        bitmask_stage(bf16, mask, vals, offs, rows, cols, stride, t, tokens, y);
    }
    free(t);
    return 0;
}
"""

_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c99"]
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "lrc_bitmask_mm": [_INT, _P, _P, _P, _I64, _I64, _I64, _P, _I64, _P, _INT],
    "lrc_bitmask_dense": [_INT, _P, _P, _P, _I64, _I64, _I64, _P, _INT],
    "lrc_csr_mm": [_INT, _P, _P, _P, _I64, _I64, _P, _I64, _P, _INT],
    "lrc_csr_dense": [_INT, _P, _P, _P, _I64, _I64, _P, _INT],
    "lrc_dense_mm": [_INT, _P, _P, _I64, _I64, _P, _I64, _P, _INT],
    "lrc_lowrank_mm": [_INT, _P, _P, _P, _I64, _I64, _I64, _P, _I64, _P, _INT],
    "lrc_bitmask_mm_after_dense": [_INT, _P, _P, _P, _I64, _I64, _I64, _P, _I64, _P, _I64, _P, _INT],
}
# 0, or -1 where the product between the two could not be allocated; the others return nothing
_RETURNS = {"lrc_lowrank_mm": ctypes.c_int, "lrc_bitmask_mm_after_dense": ctypes.c_int}
_DTYPES = (torch.float32, torch.bfloat16)
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


def _cpu_flags() -> str:
    """The CPU's feature flags as /proc/cpuinfo lists them ("" elsewhere)."""
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


_FLAGS_HERE = _cpu_flags()
HAS_AMX = "amx_bf16" in _FLAGS_HERE.split()  # torch's bfloat16 products run on AMX tiles (oneDNN)
# `linear` runs the C kernel up to this many bfloat16 tokens per call (torch's product was as fast or faster
# from 5 tokens with AMX, from 9-16 without; measured, see the module's docstring)
DENSE_KERNEL_MAX_TOKENS = 4 if HAS_AMX else 8
# more bfloat16 tokens than that run in float32 on an x86 CPU without AMX: there torch's bfloat16 product
# (oneDNN) was 1.3-1.6x slower than converting to float32 and back at 512 tokens, and each distinct
# (weight shape, token count) kept about 0.7 MiB of oneDNN state for the life of the process
BF16_PRODUCTS_IN_FLOAT32 = ENABLED and platform.machine() in ("x86_64", "AMD64") and not HAS_AMX
# a weight made for one product (a float32 copy of a bfloat16 factor, a sparse matrix densified) is made, and
# the product computed, at most this many bytes of rows at a time: a whole copy is transient memory as large
# as the matrix (a 14336 x 4096 float32 copy is 224 MiB), which a model's peak memory would carry
BLOCK_BYTES = 8 * 1024**2
# the same for a bfloat16 product made in float32 (BF16_PRODUCTS_IN_FLOAT32), whose blocks are float32 copies
# made for the call (the weight's rows, the product's columns before rounding): at Llama-3.2-1B's widths in bfloat16,
# the compressed models' peak during a 512-token prefill was 1098-1118 MiB with 1 MiB blocks against 1120-1183
# with 8 (dense 1215-1244; glibc keeps freed blocks of 8 MiB resident), for 8-11% more prefill time; in float32
# smaller blocks moved the peak within the rounds' spread and cost the default recipe 13% of its prefill
# (bench/results/row_blocks_wide.md)
CONVERTED_BLOCK_BYTES = 1 * 1024**2


def _cpu_signature() -> str:
    return platform.machine() + platform.processor() + _FLAGS_HERE


def _kernel_dir() -> Path:
    if os.environ.get("LRC_KERNEL_DIR"):
        return Path(os.environ["LRC_KERNEL_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lrc" / "kernels"


def compile_library(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The kernels compiled with `extra_flags` too (e.g. -DLRC_PREFETCH=0 for a benchmark), cached per source,
    compiler, flags and CPU; None where no compiler works. `library()` is the one the layers use."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return None
    flags = [*_FLAGS, *extra_flags]
    key = hashlib.sha256("\0".join([_SOURCE, compiler, *flags, _cpu_signature()]).encode()).hexdigest()[:20]
    for folder in (_kernel_dir(), Path(tempfile.gettempdir()) / f"lrc-kernels-{os.getuid()}"):
        target = folder / f"cpu_kernels_{key}.so"
        try:
            if not target.is_file():
                folder.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=folder) as work:
                    src, lib = Path(work) / "kernels.c", Path(work) / "kernels.so"
                    src.write_text(_SOURCE)
                    subprocess.run([compiler, *flags, str(src), "-o", str(lib)], check=True, capture_output=True, timeout=120)
                    os.replace(lib, target)  # atomic: a concurrent process sees the whole library or none
            library = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError):
            continue
        for name, args in _SIGNATURES.items():
            getattr(library, name).argtypes = args
            getattr(library, name).restype = _RETURNS.get(name)
        return library
    return None


def library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first call), or None where they cannot be built (warned once)."""
    global _library, _tried
    if _tried:
        return _library
    with _lock:
        if not _tried:
            _tried = True
            _library = compile_library()
            if _library is None:
                warnings.warn("lrc: no C compiler could build lrc's CPU kernels; sparse layers densify with torch "
                              "and bfloat16 decoding uses torch's product instead (same results, slower)", RuntimeWarning, stacklevel=3)
        return _library


def available(values: torch.Tensor, x: torch.Tensor | None = None) -> bool:
    """Whether the kernels run for these stored values (and input): CPU, float32 or bfloat16, one dtype."""
    ok = ENABLED and values.is_cpu and values.dtype in _DTYPES
    ok = ok and (x is None or (x.is_cpu and x.dtype == values.dtype))
    return ok and library() is not None


def _kernel(name: str) -> Any:
    lib = library()
    assert lib is not None
    return getattr(lib, name)


def gradients_flow(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records a product of these tensors (lrc's kernels have no backward). Runs on every
    product: a loop, not any() over a generator (half its time with gradients enabled)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # noqa: SIM110  (a loop: any() over a generator takes twice the time)
        if t is not None and t.requires_grad:
            return True
    return False


def kernel_tokens(x: torch.Tensor, *weights: torch.Tensor | None) -> int:
    """The token count of x (..., in) where the decode kernels take a product of x with `weights`, else 0: up to
    DENSE_KERNEL_MAX_TOKENS tokens, on CPU, float32 or bfloat16 throughout, contiguous weights, no gradient
    recorded, not in a graph torch.compile traces, and the kernels built."""
    if x.dtype not in _DTYPES or x.dim() == 0 or not x.is_cpu or not ENABLED or torch.compiler.is_compiling():
        return 0
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not 0 < tokens <= DENSE_KERNEL_MAX_TOKENS:
        return 0
    for w in weights:
        if w is not None and (w.dtype is not x.dtype or not w.is_cpu or not w.is_contiguous()):
            return 0
    if gradients_flow(x, *weights):
        return 0
    return tokens if library() is not None else 0


LOW_RANK_ONE_CALL_DTYPES = (torch.bfloat16,)  # float32: torch's two products were as fast (see lowrank_linear)


def lowrank_linear(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """(x downᵀ) upᵀ + bias in one kernel call (decoding), bfloat16: x (..., in), down (rank, in), up (out, rank),
    bias (out,) -> (..., out); x downᵀ is rounded to bfloat16 between the two, as two `linear` calls round it.
    None where kernel_tokens says no, in float32, or where the shapes do not chain (the caller then makes two
    products). In float32 the C call alone was 1.01-1.19x as fast as torch's two products (MKL) per shape, but
    through this function (its checks, the output tensor, ctypes' argument conversion: ~5 µs) 0.70-0.96x
    (bench/decode_calls.py), so there the layer makes two. Binding a layer's factors once (addresses and
    shapes checked per call instead of converted; a trial, not kept) did not pay either: whole-model decode
    with it 0.997-1.001x two calls in float32, 0.995-1.008x this function in bfloat16 (three SmolLM2-135M
    outputs, 150 steps each way, alternating)."""
    if x.dtype not in LOW_RANK_ONE_CALL_DTYPES:  # first: float32 decoding asks this for every low-rank layer
        return None
    tokens = kernel_tokens(x, down, up, bias)
    if (not tokens or down.dim() != 2 or up.dim() != 2 or down.shape[1] != x.shape[-1] or up.shape[1] != down.shape[0]
            or (bias is not None and bias.shape != (up.shape[0],))):
        return None
    x = x.contiguous()
    y = torch.empty((*x.shape[:-1], up.shape[0]), dtype=x.dtype)
    if _kernel("lrc_lowrank_mm")(x.dtype is torch.bfloat16, down.data_ptr(), up.data_ptr(), None if bias is None else bias.data_ptr(),
                                 down.shape[0], down.shape[1], up.shape[0], x.data_ptr(), tokens, y.data_ptr(),
                                 torch.get_num_threads()):
        raise MemoryError("lrc: no memory for a low-rank product's intermediate")
    return y


class BoundMatmul:
    """x (tokens, cols) -> y = x Sᵀ (tokens, rows): kernel(*head, x, tokens, y, threads), `head` holding the
    stored tensors' addresses. It keeps no reference to them: its owner (SparseMatrix) calls it only after
    checking they are still the tensors, at the addresses, it was made for. For the bitmask layout also
    `after_dense`, the product with a dense first factor in the same call."""

    __slots__ = ("kernel", "head", "rows", "cols", "dtype", "bitmask")

    def __init__(self, kernel: Any, head: tuple[Any, ...], rows: int, cols: int, dtype: torch.dtype, bitmask: bool) -> None:
        self.kernel, self.head, self.rows, self.cols, self.dtype, self.bitmask = kernel, head, rows, cols, dtype, bitmask

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        tokens = x.shape[0]
        y = torch.empty(tokens, self.rows, dtype=self.dtype)
        self.kernel(*self.head, x.data_ptr(), tokens, y.data_ptr(), torch.get_num_threads())
        return y

    def after_dense(self, first: torch.Tensor, x: torch.Tensor, tokens: int) -> torch.Tensor | None:
        """(x firstᵀ) Sᵀ in one kernel call (decoding): x (..., in) of `tokens` tokens that kernel_tokens(x, first)
        took, first (cols, in) dense -> (..., rows), x firstᵀ rounded to the dtype between the two; None for
        the csr layout, another dtype or shapes that do not chain (the caller then makes two products)."""
        if not self.bitmask or x.dtype is not self.dtype or first.dim() != 2 or first.shape != (self.cols, x.shape[-1]):
            return None
        x = x.contiguous()
        y = torch.empty((*x.shape[:-1], self.rows), dtype=x.dtype)
        if _kernel("lrc_bitmask_mm_after_dense")(*self.head, first.data_ptr(), first.shape[1], x.data_ptr(), tokens,
                                                 y.data_ptr(), torch.get_num_threads()):
            raise MemoryError("lrc: no memory for a sparse dictionary's atoms product")
        return y


def bitmask_matmul_fn(values: torch.Tensor, bitmask: torch.Tensor, starts: torch.Tensor,
                      cols: int) -> BoundMatmul:
    """matmul(x): x (tokens, cols) @ Sᵀ -> (tokens, rows), S in the bitmask layout (`starts` from
    sparse_matrix.bitmask_row_starts). The tensors' addresses are bound once (the caller keeps them alive and
    unchanged, and makes a new function when they change): a decoded token calls this once per sparse layer."""
    kernel = _kernel("lrc_bitmask_mm")
    head = (_INT(values.dtype == torch.bfloat16), _P(bitmask.data_ptr()), _P(values.data_ptr()), _P(starts.data_ptr()),
            _I64(bitmask.shape[0]), _I64(cols), _I64(bitmask.shape[1]))
    return BoundMatmul(kernel, head, bitmask.shape[0], cols, values.dtype, True)


def bitmask_dense(values: torch.Tensor, bitmask: torch.Tensor, starts: torch.Tensor, cols: int) -> torch.Tensor:
    """S (rows, cols) from the bitmask layout."""
    rows = bitmask.shape[0]
    out = torch.empty(rows, cols, dtype=values.dtype)
    _kernel("lrc_bitmask_dense")(values.dtype == torch.bfloat16, bitmask.data_ptr(), values.data_ptr(), starts.data_ptr(),
                                 rows, cols, bitmask.shape[1], out.data_ptr(), torch.get_num_threads())
    return out


def csr_matmul_fn(values: torch.Tensor, col_indices: torch.Tensor, row_offsets: torch.Tensor,
                  cols: int) -> BoundMatmul:
    """matmul(x): x (tokens, cols) @ Sᵀ -> (tokens, rows), S in the csr layout (int16 column indices); bound as
    bitmask_matmul_fn."""
    kernel = _kernel("lrc_csr_mm")
    rows = row_offsets.shape[0] - 1
    head = (_INT(values.dtype == torch.bfloat16), _P(values.data_ptr()), _P(col_indices.data_ptr()),
            _P(row_offsets.data_ptr()), _I64(rows), _I64(cols))
    return BoundMatmul(kernel, head, rows, cols, values.dtype, False)


def csr_dense(values: torch.Tensor, col_indices: torch.Tensor, row_offsets: torch.Tensor, cols: int) -> torch.Tensor:
    """S (rows, cols) from the csr layout."""
    rows = row_offsets.shape[0] - 1
    out = torch.zeros(rows, cols, dtype=values.dtype)
    _kernel("lrc_csr_dense")(values.dtype == torch.bfloat16, values.data_ptr(), col_indices.data_ptr(),
                             row_offsets.data_ptr(), rows, cols, out.data_ptr(), torch.get_num_threads())
    return out


def register_op(module: str, name: str, fn: Callable[..., torch.Tensor], schema: str,
                fake: Callable[..., torch.Tensor]) -> Any:
    """`fn` as the torch custom op `<namespace>::<name>`, which torch.compile and torch.export keep as one opaque
    call shaped by `fake` (dynamo cannot trace the kernels' ctypes calls and address checks). The namespace is
    "lrc" for lrc.forms and a hash of the package's name for an output's copy of these modules (its modeling
    code), so both load side by side; a module executed again keeps the op it registered first."""
    package = module.rpartition(".")[0]
    namespace = "lrc" if package == "lrc.forms" else "lrc_" + hashlib.sha256(package.encode()).hexdigest()[:16]
    try:
        op = torch.library.custom_op(f"{namespace}::{name}", fn, mutates_args=(), schema=schema)
    except RuntimeError:
        return getattr(getattr(torch.ops, namespace), name)
    op.register_fake(fake)
    return op


def product_by_row_blocks(x: torch.Tensor, out_features: int, rows: Callable[[int, int], torch.Tensor],
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """x Wᵀ + b: x (..., in), W (out_features, in) made `rows(start, end)` (W[start:end], any float dtype) a
    block of rows at a time, bias (out_features,) or None -> (..., out) in x's dtype. A block is at most
    BLOCK_BYTES (CONVERTED_BLOCK_BYTES for bfloat16 x made in float32) at the product's dtype, both as weight
    rows (rows x in) and as product columns (tokens x rows). The product's dtype is float32 for bfloat16 x
    where BF16_PRODUCTS_IN_FLOAT32 (rounded once to bfloat16), else x's. One block: one product, as `linear`."""
    compute = torch.float32 if x.dtype is torch.bfloat16 and BF16_PRODUCTS_IN_FLOAT32 else x.dtype
    flat = x.reshape(-1, x.shape[-1]).to(compute)
    block_bytes = CONVERTED_BLOCK_BYTES if compute != x.dtype else BLOCK_BYTES
    step = max(1, block_bytes // (flat.element_size() * max(1, x.shape[-1], flat.shape[0])))

    def block(start: int, end: int) -> torch.Tensor:
        return torch.nn.functional.linear(flat, rows(start, end).to(compute),
                                          None if bias is None else bias[start:end].to(compute))

    if step >= out_features:
        y = block(0, out_features).to(x.dtype)
    else:
        y = torch.empty(flat.shape[0], out_features, dtype=x.dtype, device=x.device)
        for start in range(0, out_features, step):
            y[:, start : start + step] = block(start, min(start + step, out_features))
    return y.reshape(*x.shape[:-1], out_features)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """nn.functional.linear(x, weight, bias): x (..., in), weight (out, in), bias (out,) -> (..., out).

    Up to DENSE_KERNEL_MAX_TOKENS tokens in bfloat16 on CPU (decoding) run the dense C kernel, 2-5x faster
    there than torch's bfloat16 product at this package's factor shapes (accumulated in float32, bias
    added, rounded once); more, on an x86 CPU without AMX (BF16_PRODUCTS_IN_FLOAT32), torch's float32
    product of the converted x and W, rounded once, W converted a block of rows at a time
    (product_by_row_blocks); anything else, or where gradients flow, is torch's. In
    a graph torch.compile traces, a decode-sized product is the custom op `linear_op` (this function, run
    at each call; the token count a guard of the graph), the others torch's, which the compiler sees."""
    # checks cheapest first: this runs once per factor per decoded token
    if x.dtype is not torch.bfloat16 or x.dim() == 0:
        return torch.nn.functional.linear(x, weight, bias)
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if tokens > DENSE_KERNEL_MAX_TOKENS and BF16_PRODUCTS_IN_FLOAT32 and x.is_cpu and weight.dtype is torch.bfloat16:
        return product_by_row_blocks(x, weight.shape[0], lambda start, end: weight[start:end], bias)
    if torch.compiler.is_compiling():  # decode shapes: the op; prefill: torch's, which the compiler sees
        if x.is_cpu and tokens <= DENSE_KERNEL_MAX_TOKENS and not gradients_flow(x, weight, bias):
            return linear_op(x, weight, bias)
        return torch.nn.functional.linear(x, weight, bias)
    if not kernel_tokens(x, weight, bias) or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        return torch.nn.functional.linear(x, weight, bias)
    x = x.contiguous()
    y = torch.empty((*x.shape[:-1], weight.shape[0]), dtype=torch.bfloat16)
    _kernel("lrc_dense_mm")(1, weight.data_ptr(), None if bias is None else bias.data_ptr(), weight.shape[0],
                            weight.shape[1], x.data_ptr(), tokens, y.data_ptr(), torch.get_num_threads())
    return y


linear_op = register_op(__name__, "linear", linear, "(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
                        lambda x, weight, bias: x.new_empty(*x.shape[:-1], weight.shape[0]))
