"""Fused dequantize-and-dot of one weight row with one activation vector, per format.

Shape legend
    C    weights per row
    w    uint8   [row_bytes]  one row of GGUF blocks
    x    float32 [C]          activations
    xs   float32 [C // 32]    sums of x over each 32-column block (for the K-quant mins)
    lut  float32 [2, 16]      row 0: IQ4_NL code book, row 1: MXFP4 code book (doubled E2M1)
Each ``dot_*`` returns sum_c W[c] * x[c] as float32.

Why they look the way they do: LLVM vectorizes only simple contiguous inner
loops, so scales are decoded once per sub-block outside the inner loop, each
inner loop is a plain dot over 16 or 32 contiguous bytes, the K-quant mins are
applied once per sub-block through ``xs``, and every nibble goes through
``np.int32`` before the float conversion (Numba would otherwise widen it to
int64 and LLVM would convert 8 lanes at a time instead of 16). Inner loops of
16 or 32 steps take their trip count from ``_span`` rather than a literal: with
a literal count LLVM unrolls them completely and then vectorizes the block loop
instead, with gathers, which runs several times slower.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ._bits import bf16_to_f32, e8m0_half, f16_at, f16_to_f32, k4_min, k4_scale

_JIT = dict(inline="always", fastmath=True, cache=True)
F0 = np.float32(0.0)


@nb.njit(inline="always", cache=True)
def _span(n, k):
    """k (which must divide n, n > 0), computed so that LLVM cannot tell it is a constant."""
    return n // (n // k)


@nb.njit(**_JIT)
def dot_f32(w, x, xs, lut):
    v = w.view(np.float32)
    s = F0
    for c in range(x.shape[0]):
        s += v[c] * x[c]
    return s


@nb.njit(**_JIT)
def dot_f16(w, x, xs, lut):
    v = w.view(np.uint16)
    s = F0
    for c in range(x.shape[0]):
        s += f16_to_f32(v[c]) * x[c]
    return s


@nb.njit(**_JIT)
def dot_bf16(w, x, xs, lut):
    v = w.view(np.uint16)
    s = F0
    for c in range(x.shape[0]):
        s += bf16_to_f32(v[c]) * x[c]
    return s


@nb.njit(**_JIT)
def dot_q8_0(w, x, xs, lut):
    acc = F0
    qk = _span(x.shape[0], 32)
    for b in range(x.shape[0] // 32):
        o = 34 * b
        s = F0
        for l in range(qk):
            s += np.float32(np.int8(w[o + 2 + l])) * x[32 * b + l]
        acc += f16_at(w, o) * s
    return acc


@nb.njit(**_JIT)
def dot_q4_0(w, x, xs, lut):
    acc = F0
    half = _span(x.shape[0], 32) // 2
    for b in range(x.shape[0] // 32):
        o = 18 * b
        s = F0
        for l in range(half):
            q = w[o + 2 + l]
            s += np.float32(np.int32(q & 15)) * x[32 * b + l] + np.float32(np.int32(q >> 4)) * x[32 * b + 16 + l]
        acc += f16_at(w, o) * (s - np.float32(8.0) * xs[b])
    return acc


@nb.njit(**_JIT)
def dot_mxfp4(w, x, xs, lut):
    acc = F0
    half = _span(x.shape[0], 32) // 2
    for b in range(x.shape[0] // 32):
        o = 17 * b
        s = F0
        for l in range(half):
            q = w[o + 1 + l]
            s += lut[1, q & 15] * x[32 * b + l] + lut[1, q >> 4] * x[32 * b + 16 + l]
        acc += e8m0_half(w[o]) * s
    return acc


@nb.njit(**_JIT)
def dot_q4_k(w, x, xs, lut):
    acc = F0
    for s in range(x.shape[0] // 256):
        o = 144 * s
        d = f16_at(w, o)
        dmin = f16_at(w, o + 2)
        sb = F0
        mb = F0
        for k in range(4):
            qo = o + 16 + 32 * k
            xo = 256 * s + 64 * k
            slo = F0
            shi = F0
            for l in range(32):
                q = w[qo + l]
                slo += np.float32(np.int32(q & 15)) * x[xo + l]
                shi += np.float32(np.int32(q >> 4)) * x[xo + 32 + l]
            sb += np.float32(k4_scale(w, o + 4, 2 * k)) * slo + np.float32(k4_scale(w, o + 4, 2 * k + 1)) * shi
            mb += (np.float32(k4_min(w, o + 4, 2 * k)) * xs[8 * s + 2 * k]
                   + np.float32(k4_min(w, o + 4, 2 * k + 1)) * xs[8 * s + 2 * k + 1])
        acc += d * sb - dmin * mb
    return acc


@nb.njit(**_JIT)
def dot_q5_k(w, x, xs, lut):
    acc = F0
    q32 = _span(x.shape[0], 256) // 8
    for s in range(x.shape[0] // 256):
        o = 176 * s
        d = f16_at(w, o)
        dmin = f16_at(w, o + 2)
        sb = F0
        mb = F0
        for k in range(4):
            qo = o + 48 + 32 * k
            xo = 256 * s + 64 * k
            m1 = np.uint8(1 << (2 * k))
            m2 = np.uint8(2 << (2 * k))
            slo = F0
            shi = F0
            for l in range(q32):
                q = w[qo + l]
                h = w[o + 16 + l]
                slo += np.float32(np.int32((q & 15) | (16 if h & m1 else 0))) * x[xo + l]
                shi += np.float32(np.int32((q >> 4) | (16 if h & m2 else 0))) * x[xo + 32 + l]
            sb += np.float32(k4_scale(w, o + 4, 2 * k)) * slo + np.float32(k4_scale(w, o + 4, 2 * k + 1)) * shi
            mb += (np.float32(k4_min(w, o + 4, 2 * k)) * xs[8 * s + 2 * k]
                   + np.float32(k4_min(w, o + 4, 2 * k + 1)) * xs[8 * s + 2 * k + 1])
        acc += d * sb - dmin * mb
    return acc


@nb.njit(**_JIT)
def dot_q6_k(w, x, xs, lut):
    acc = F0
    q16 = _span(x.shape[0], 256) // 16
    for s in range(x.shape[0] // 256):
        o = 210 * s
        sb = F0
        for h in range(2):
            ql = o + 64 * h
            qh = o + 128 + 32 * h
            xo = 256 * s + 128 * h
            for half in range(2):  # the scale changes every 16 weights
                s0 = F0
                s1 = F0
                s2 = F0
                s3 = F0
                for e in range(q16):
                    l = 16 * half + e
                    a = w[ql + l]
                    b = w[ql + 32 + l]
                    hb = w[qh + l]
                    s0 += (np.float32(np.int32((a & 15) | ((hb & 3) << 4))) - np.float32(32)) * x[xo + l]
                    s1 += (np.float32(np.int32((b & 15) | ((hb & 12) << 2))) - np.float32(32)) * x[xo + 32 + l]
                    s2 += (np.float32(np.int32((a >> 4) | (hb & 48))) - np.float32(32)) * x[xo + 64 + l]
                    s3 += (np.float32(np.int32((b >> 4) | ((hb >> 2) & 48))) - np.float32(32)) * x[xo + 96 + l]
                g = o + 192 + 8 * h + half
                sb += (np.float32(np.int8(w[g])) * s0 + np.float32(np.int8(w[g + 2])) * s1
                       + np.float32(np.int8(w[g + 4])) * s2 + np.float32(np.int8(w[g + 6])) * s3)
        acc += f16_at(w, o + 208) * sb
    return acc


@nb.njit(**_JIT)
def dot_iq4_xs(w, x, xs, lut):
    acc = F0
    q16 = _span(x.shape[0], 256) // 16
    for s in range(x.shape[0] // 256):
        o = 136 * s
        d = f16_at(w, o)
        sh = np.int32(w[o + 2]) | (np.int32(w[o + 3]) << 8)
        sb = F0
        for j in range(8):
            ls = ((np.int32(w[o + 4 + j // 2]) >> (4 * (j % 2))) & 15) | (((sh >> (2 * j)) & 3) << 4)
            qo = o + 8 + 16 * j
            xo = 256 * s + 32 * j
            t = F0
            for l in range(q16):
                q = w[qo + l]
                t += lut[0, q & 15] * x[xo + l] + lut[0, q >> 4] * x[xo + 16 + l]
            sb += np.float32(ls - 32) * t
        acc += d * sb
    return acc
