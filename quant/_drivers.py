"""Parallel GEMV / GEMM drivers over GGUF weight rows; the per-format work is in _rowdot / _rowdeq.

Shape legend
    R  rows (output features)      C  columns (input features)     N  tokens
    w        uint8   [R, row_bytes]   GGUF rows of format ``fmt`` (a GGMLQuantizationType id)
    x        float32 [C]              one token's activations
    xs       float32 [C // 32]        sums of x per 32 columns (zeros when C % 32 != 0; unused then)
    X        float32 [N, C]           N tokens
    lut      float32 [2, 16]          code books (IQ4_NL, MXFP4)
    scratch  float32 [P, RT, CT]      P workers' tiles of RT rows x CT columns
    out      float32 [R] (GEMV) or [N, R] (GEMM)
Kernels take the output buffer last, allocate nothing and touch no globals.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ._rowdeq import (deq_bf16, deq_f16, deq_f32, deq_iq4_xs, deq_mxfp4, deq_q4_0, deq_q4_k,
                      deq_q5_k, deq_q6_k, deq_q8_0)
from ._rowdot import (dot_bf16, dot_f16, dot_f32, dot_iq4_xs, dot_mxfp4, dot_q4_0, dot_q4_k,
                      dot_q5_k, dot_q6_k, dot_q8_0)

# GGMLQuantizationType ids, repeated here as compile-time constants
F32, F16, Q4_0, Q8_0, Q4_K, Q5_K, Q6_K, IQ4_XS, BF16, MXFP4 = 0, 1, 2, 8, 12, 13, 14, 23, 30, 39
SUPPORTED = (F32, F16, BF16, Q8_0, Q4_0, MXFP4, Q4_K, Q5_K, Q6_K, IQ4_XS)


@nb.njit(inline="always", fastmath=True, cache=True)
def _row_dot(fmt, w, x, xs, lut):
    if fmt == Q4_K:
        return dot_q4_k(w, x, xs, lut)
    if fmt == Q6_K:
        return dot_q6_k(w, x, xs, lut)
    if fmt == Q5_K:
        return dot_q5_k(w, x, xs, lut)
    if fmt == Q8_0:
        return dot_q8_0(w, x, xs, lut)
    if fmt == Q4_0:
        return dot_q4_0(w, x, xs, lut)
    if fmt == F32:
        return dot_f32(w, x, xs, lut)
    if fmt == F16:
        return dot_f16(w, x, xs, lut)
    if fmt == BF16:
        return dot_bf16(w, x, xs, lut)
    if fmt == IQ4_XS:
        return dot_iq4_xs(w, x, xs, lut)
    return dot_mxfp4(w, x, xs, lut)


@nb.njit(inline="always", cache=True)
def _byte_offset(fmt, c):
    """Offset of column c (a block boundary) in a row of format fmt."""
    if fmt == Q4_K:
        return c // 256 * 144
    if fmt == Q6_K:
        return c // 256 * 210
    if fmt == Q5_K:
        return c // 256 * 176
    if fmt == IQ4_XS:
        return c // 256 * 136
    if fmt == Q8_0:
        return c // 32 * 34
    if fmt == Q4_0:
        return c // 32 * 18
    if fmt == MXFP4:
        return c // 32 * 17
    if fmt == F32:
        return 4 * c
    return 2 * c


@nb.njit(inline="always", fastmath=True, cache=True)
def _row_deq(fmt, w, n, lut, buf):
    if fmt == Q4_K:
        deq_q4_k(w, n, lut, buf)
    elif fmt == Q6_K:
        deq_q6_k(w, n, lut, buf)
    elif fmt == Q5_K:
        deq_q5_k(w, n, lut, buf)
    elif fmt == Q8_0:
        deq_q8_0(w, n, lut, buf)
    elif fmt == Q4_0:
        deq_q4_0(w, n, lut, buf)
    elif fmt == F32:
        deq_f32(w, n, lut, buf)
    elif fmt == F16:
        deq_f16(w, n, lut, buf)
    elif fmt == BF16:
        deq_bf16(w, n, lut, buf)
    elif fmt == IQ4_XS:
        deq_iq4_xs(w, n, lut, buf)
    else:
        deq_mxfp4(w, n, lut, buf)


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemv(fmt, w, x, xs, lut, out):
    """out[r] = sum_c W[r, c] * x[c]."""
    for r in nb.prange(w.shape[0]):
        out[r] = _row_dot(fmt, w[r], x, xs, lut)


@nb.njit(inline="always", fastmath=True, cache=True)
def _tile_dot(buf, X, c0, n, t, out, r):
    """out[t:t+4, r] += X[t:t+4, c0:c0+n] @ buf[:n] when four tokens are left, else
    out[t, r] += X[t, c0:c0+n] @ buf[:n]; returns the number of tokens done.
    Four tokens share each load of buf; slices keep every index non-negative."""
    if t + 4 <= X.shape[0]:
        x0 = X[t, c0:c0 + n]
        x1 = X[t + 1, c0:c0 + n]
        x2 = X[t + 2, c0:c0 + n]
        x3 = X[t + 3, c0:c0 + n]
        s0 = np.float32(0.0)
        s1 = np.float32(0.0)
        s2 = np.float32(0.0)
        s3 = np.float32(0.0)
        for c in range(n):
            b = buf[c]
            s0 += b * x0[c]
            s1 += b * x1[c]
            s2 += b * x2[c]
            s3 += b * x3[c]
        out[t, r] += s0
        out[t + 1, r] += s1
        out[t + 2, r] += s2
        out[t + 3, r] += s3
        return 4
    x0 = X[t, c0:c0 + n]
    s = np.float32(0.0)
    for c in range(n):
        s += buf[c] * x0[c]
    out[t, r] += s
    return 1


@nb.njit(parallel=True, fastmath=True, cache=True)
def gemm(fmt, w, X, lut, scratch, out):
    """out[t, r] = sum_c W[r, c] * X[t, c]; every weight is decoded once, into an L1-sized tile."""
    rows = w.shape[0]
    n_tok, cols = X.shape
    workers, rt, ct = scratch.shape
    n_tiles = (rows + rt - 1) // rt
    for p in nb.prange(workers):
        for tile in range(p, n_tiles, workers):
            r0 = tile * rt
            r1 = min(rows, r0 + rt)
            for r in range(r0, r1):
                for t in range(n_tok):
                    out[t, r] = 0.0
            for c0 in range(0, cols, ct):
                c1 = min(cols, c0 + ct)
                b0 = _byte_offset(fmt, c0)
                b1 = _byte_offset(fmt, c1)
                for r in range(r0, r1):
                    _row_deq(fmt, w[r, b0:b1], c1 - c0, lut, scratch[p, r - r0])
                t = 0
                while t < n_tok:
                    done = 0
                    for r in range(r0, r1):
                        done = _tile_dot(scratch[p, r - r0], X, c0, c1 - c0, t, out, r)
                    t += done
