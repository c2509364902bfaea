"""Parallel GEMV / GEMM loops over GGUF weight rows; the per-format work is in row_dot / row_decode.

Shape legend
    R  rows (output features)      C  columns (input features)     N  tokens
    w        uint8   [R, row_bytes]   GGUF rows of one format
    x        float32 [C]              one token's activations
    xs       float32 [C // 32]        sums of x per 32 columns (zeros when C % 32 != 0; unused then)
    X        float32 [N, C]           N tokens
    lut      float32 [2, 16]          code books (IQ4_NL, MXFP4)
    scratch  float32 [P, TILE_ROWS, TILE_COLS]  one tile per parallel worker
    out      float32 [R] (GEMV) or [N, R] (GEMM)
Kernels take the output buffer last, allocate nothing and touch no globals.

There is one GEMV and one GEMM driver per format (``gemv_q4_k``, ``gemm_q4_k``, ...),
each a one-line call of a generic body with that format's row function. Both bodies are inlined by Numba
before typing, so each driver is compiled (and cached) with its row function
inlined and the loop counters visible: that is what lets LLVM prove indices
non-negative and vectorize (a runtime format switch, or a row function called
through an argument, runs 2-5x slower). The GEMM's tile products, which read no weights
of any format, are the one part compiled on their own and shared by every driver.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from .row_decode import (deq_bf16, deq_f16, deq_f32, deq_iq4_xs, deq_mxfp4, deq_q4_0, deq_q4_k,
                         deq_q5_k, deq_q6_k, deq_q8_0)
from .row_dot import (dot_bf16, dot_f16, dot_f32, dot_iq4_xs, dot_mxfp4, dot_q4_0, dot_q4_k,
                      dot_q5_k, dot_q6_k, dot_q8_0)

TILE_ROWS = 8     # GEMM tile: 8 rows x 512 columns of float32 = 16 KiB, which stays in L1
TILE_COLS = 512   # with the tokens' 512-column slices


@nb.njit(inline="always", fastmath=True, cache=True)
def _gemv(row_dot, w, x, xs, lut, out):
    """out[r] = sum_c W[r, c] * x[c]."""
    for r in nb.prange(w.shape[0]):
        out[r] = row_dot(w[r], x, xs, lut)


@nb.njit(inline="always", fastmath=True, cache=True)
def _dot_4x4(tile, i, X, c0, n, t, out, r):
    """out[t:t+4, r:r+4] += X[t:t+4, c0:c0+n] @ tile[i:i+4, :n].T: 8 loads feed 16 multiply-adds,
    so the loop is bound by the FMA units rather than by loads (16 accumulators fit the registers)."""
    b0 = tile[i]
    b1 = tile[i + 1]
    b2 = tile[i + 2]
    b3 = tile[i + 3]
    x0 = X[t, c0:c0 + n]
    x1 = X[t + 1, c0:c0 + n]
    x2 = X[t + 2, c0:c0 + n]
    x3 = X[t + 3, c0:c0 + n]
    s00 = s01 = s02 = s03 = np.float32(0.0)
    s10 = s11 = s12 = s13 = np.float32(0.0)
    s20 = s21 = s22 = s23 = np.float32(0.0)
    s30 = s31 = s32 = s33 = np.float32(0.0)
    for c in range(n):
        a0 = x0[c]
        a1 = x1[c]
        a2 = x2[c]
        a3 = x3[c]
        u = b0[c]
        s00 += u * a0
        s01 += u * a1
        s02 += u * a2
        s03 += u * a3
        u = b1[c]
        s10 += u * a0
        s11 += u * a1
        s12 += u * a2
        s13 += u * a3
        u = b2[c]
        s20 += u * a0
        s21 += u * a1
        s22 += u * a2
        s23 += u * a3
        u = b3[c]
        s30 += u * a0
        s31 += u * a1
        s32 += u * a2
        s33 += u * a3
    out[t, r] += s00
    out[t + 1, r] += s01
    out[t + 2, r] += s02
    out[t + 3, r] += s03
    out[t, r + 1] += s10
    out[t + 1, r + 1] += s11
    out[t + 2, r + 1] += s12
    out[t + 3, r + 1] += s13
    out[t, r + 2] += s20
    out[t + 1, r + 2] += s21
    out[t + 2, r + 2] += s22
    out[t + 3, r + 2] += s23
    out[t, r + 3] += s30
    out[t + 1, r + 3] += s31
    out[t + 2, r + 3] += s32
    out[t + 3, r + 3] += s33


@nb.njit(inline="always", fastmath=True, cache=True)
def _dot_4x1(tile, i, X, c0, n, t, out, r):
    b0 = tile[i]
    b1 = tile[i + 1]
    b2 = tile[i + 2]
    b3 = tile[i + 3]
    x0 = X[t, c0:c0 + n]
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for c in range(n):
        a = x0[c]
        s0 += b0[c] * a
        s1 += b1[c] * a
        s2 += b2[c] * a
        s3 += b3[c] * a
    out[t, r] += s0
    out[t, r + 1] += s1
    out[t, r + 2] += s2
    out[t, r + 3] += s3


@nb.njit(inline="always", fastmath=True, cache=True)
def _dot_2x4(tile, i, X, c0, n, t, out, r):
    """out[t:t+4, r:r+2] += X[t:t+4, c0:c0+n] @ tile[i:i+2, :n].T: each load feeds two or four
    multiply-adds, so the loop is bound by the FMA units rather than by loads."""
    b0 = tile[i]
    b1 = tile[i + 1]
    x0 = X[t, c0:c0 + n]
    x1 = X[t + 1, c0:c0 + n]
    x2 = X[t + 2, c0:c0 + n]
    x3 = X[t + 3, c0:c0 + n]
    s00 = s01 = s02 = s03 = np.float32(0.0)
    s10 = s11 = s12 = s13 = np.float32(0.0)
    for c in range(n):
        u = b0[c]
        v = b1[c]
        s00 += u * x0[c]
        s01 += u * x1[c]
        s02 += u * x2[c]
        s03 += u * x3[c]
        s10 += v * x0[c]
        s11 += v * x1[c]
        s12 += v * x2[c]
        s13 += v * x3[c]
    out[t, r] += s00
    out[t + 1, r] += s01
    out[t + 2, r] += s02
    out[t + 3, r] += s03
    out[t, r + 1] += s10
    out[t + 1, r + 1] += s11
    out[t + 2, r + 1] += s12
    out[t + 3, r + 1] += s13


@nb.njit(inline="always", fastmath=True, cache=True)
def _dot_1x4(tile, i, X, c0, n, t, out, r):
    b0 = tile[i]
    x0 = X[t, c0:c0 + n]
    x1 = X[t + 1, c0:c0 + n]
    x2 = X[t + 2, c0:c0 + n]
    x3 = X[t + 3, c0:c0 + n]
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for c in range(n):
        u = b0[c]
        s0 += u * x0[c]
        s1 += u * x1[c]
        s2 += u * x2[c]
        s3 += u * x3[c]
    out[t, r] += s0
    out[t + 1, r] += s1
    out[t + 2, r] += s2
    out[t + 3, r] += s3


@nb.njit(inline="always", fastmath=True, cache=True)
def _dot_2x1(tile, i, X, c0, n, t, out, r):
    b0 = tile[i]
    b1 = tile[i + 1]
    x0 = X[t, c0:c0 + n]
    s0 = s1 = np.float32(0.0)
    for c in range(n):
        s0 += b0[c] * x0[c]
        s1 += b1[c] * x0[c]
    out[t, r] += s0
    out[t, r + 1] += s1


@nb.njit(inline="always", fastmath=True, cache=True)
def _dot_1x1(tile, i, X, c0, n, t, out, r):
    b0 = tile[i]
    x0 = X[t, c0:c0 + n]
    s0 = np.float32(0.0)
    for c in range(n):
        s0 += b0[c] * x0[c]
    out[t, r] += s0


# The tile products are compiled on their own, once, and called by every format's GEMM: they
# depend on no format, and inlined into each driver they were two thirds of its compile time
# (Q4_1: 28 s against 9 s, the first call of a cold cache). One call per tile of 8 x 512
# weights costs nothing measurable, and every format's GEMM gave the inlined code's bits.
@nb.njit(fastmath=True, cache=True, nogil=True)
def _tile_dots_2x4(tile, nr, X, c0, n, out, r0):
    """out[:, r0:r0+nr] += X[:, c0:c0+n] @ tile[:nr, :n].T, in blocks of 2 rows x 4 tokens."""
    n_tok = X.shape[0]
    for ii in range(nr // 2):
        i = 2 * ii
        t = 0
        while t + 4 <= n_tok:
            _dot_2x4(tile, i, X, c0, n, t, out, r0 + i)
            t += 4
        while t < n_tok:
            _dot_2x1(tile, i, X, c0, n, t, out, r0 + i)
            t += 1
    if nr % 2 == 1:
        i = nr - 1
        t = 0
        while t + 4 <= n_tok:
            _dot_1x4(tile, i, X, c0, n, t, out, r0 + i)
            t += 4
        while t < n_tok:
            _dot_1x1(tile, i, X, c0, n, t, out, r0 + i)
            t += 1


@nb.njit(fastmath=True, cache=True, nogil=True)
def _tile_dots_4x4(tile, nr, X, c0, n, out, r0):
    """out[:, r0:r0+nr] += X[:, c0:c0+n] @ tile[:nr, :n].T, in blocks of 4 rows x 4 tokens
    (then 2 rows, then 1 row, and single tokens for the remainder)."""
    n_tok = X.shape[0]
    for ii in range(nr // 4):
        i = 4 * ii
        t = 0
        while t + 4 <= n_tok:
            _dot_4x4(tile, i, X, c0, n, t, out, r0 + i)
            t += 4
        while t < n_tok:
            _dot_4x1(tile, i, X, c0, n, t, out, r0 + i)
            t += 1
    if nr % 4 >= 2:
        i = nr - nr % 4
        t = 0
        while t + 4 <= n_tok:
            _dot_2x4(tile, i, X, c0, n, t, out, r0 + i)
            t += 4
        while t < n_tok:
            _dot_2x1(tile, i, X, c0, n, t, out, r0 + i)
            t += 1
    if nr % 2 == 1:
        i = nr - 1
        t = 0
        while t + 4 <= n_tok:
            _dot_1x4(tile, i, X, c0, n, t, out, r0 + i)
            t += 4
        while t < n_tok:
            _dot_1x1(tile, i, X, c0, n, t, out, r0 + i)
            t += 1


@nb.njit(inline="always", fastmath=True, cache=True)
def _gemm(row_deq, tile_dots, w, X, lut, scratch, out):
    """out[t, r] = sum_c W[r, c] * X[t, c]; every weight is decoded once, into an L1-sized tile
    that all tokens use. scratch is [P, TILE_ROWS, TILE_COLS]; the constant tile sizes keep
    the column indices provably non-negative (see _rowdeq). tile_dots is _tile_dots_2x4 or
    _tile_dots_4x4, whichever is faster for the format (the register blocking changes how LLVM
    compiles the inlined decode: 4x4 is faster for Q4_K, Q8_0, Q4_0, MXFP4, F16 and BF16,
    2x4 for Q6_K and Q5_K; F32 and IQ4_XS are unmeasured and keep 2x4)."""
    rows = w.shape[0]
    n_tok, cols = X.shape
    workers = scratch.shape[0]
    n_tiles = (rows + TILE_ROWS - 1) // TILE_ROWS
    # only one-argument ranges below: LLVM proves their counters non-negative, not those of
    # range(start, stop, step), and a possibly negative index is not vectorized
    for p in nb.prange(workers):
        tile = scratch[p]
        for kk in range((n_tiles - p + workers - 1) // workers):
            r0 = (p + kk * workers) * TILE_ROWS
            nr = min(rows - r0, TILE_ROWS)
            for i in range(nr):
                for t in range(n_tok):
                    out[t, r0 + i] = 0.0
            for kc in range((cols + TILE_COLS - 1) // TILE_COLS):
                c0 = kc * TILE_COLS
                n = min(cols - c0, TILE_COLS)
                for i in range(nr):
                    row_deq(w[r0 + i], c0, n, lut, tile, i)
                tile_dots(tile, nr, X, c0, n, out, r0)


# ---------------------------------------------------------------- one driver pair per format

@nb.njit(parallel=True, fastmath=True, cache=True)
def gemv_f32(w, x, xs, lut, out):
    _gemv(dot_f32, w, x, xs, lut, out)


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemm_f32(w, X, lut, scratch, out):
    _gemm(deq_f32, _tile_dots_2x4, w, X, lut, scratch, out)


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemv_f16(w, x, xs, lut, out):
    _gemv(dot_f16, w, x, xs, lut, out)


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemm_f16(w, X, lut, scratch, out):
    _gemm(deq_f16, _tile_dots_4x4, w, X, lut, scratch, out)


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemv_bf16(w, x, xs, lut, out):
    _gemv(dot_bf16, w, x, xs, lut, out)


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemm_bf16(w, X, lut, scratch, out):
    _gemm(deq_bf16, _tile_dots_4x4, w, X, lut, scratch, out)


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemv_q8_0(w, x, xs, lut, out):
    _gemv(dot_q8_0, w, x, xs, lut, out)


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemm_q8_0(w, X, lut, scratch, out):
    _gemm(deq_q8_0, _tile_dots_4x4, w, X, lut, scratch, out)


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemv_q4_0(w, x, xs, lut, out):
    _gemv(dot_q4_0, w, x, xs, lut, out)


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemm_q4_0(w, X, lut, scratch, out):
    _gemm(deq_q4_0, _tile_dots_4x4, w, X, lut, scratch, out)


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemv_mxfp4(w, x, xs, lut, out):
    _gemv(dot_mxfp4, w, x, xs, lut, out)


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemm_mxfp4(w, X, lut, scratch, out):
    _gemm(deq_mxfp4, _tile_dots_4x4, w, X, lut, scratch, out)


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemv_q4_k(w, x, xs, lut, out):
    _gemv(dot_q4_k, w, x, xs, lut, out)


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemm_q4_k(w, X, lut, scratch, out):
    _gemm(deq_q4_k, _tile_dots_4x4, w, X, lut, scratch, out)


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemv_q5_k(w, x, xs, lut, out):
    _gemv(dot_q5_k, w, x, xs, lut, out)


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemm_q5_k(w, X, lut, scratch, out):
    _gemm(deq_q5_k, _tile_dots_2x4, w, X, lut, scratch, out)


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemv_q6_k(w, x, xs, lut, out):
    _gemv(dot_q6_k, w, x, xs, lut, out)


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemm_q6_k(w, X, lut, scratch, out):
    _gemm(deq_q6_k, _tile_dots_2x4, w, X, lut, scratch, out)


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemv_iq4_xs(w, x, xs, lut, out):
    _gemv(dot_iq4_xs, w, x, xs, lut, out)


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemm_iq4_xs(w, X, lut, scratch, out):
    _gemm(deq_iq4_xs, _tile_dots_2x4, w, X, lut, scratch, out)
