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
16 or 32 steps take their trip count from ``quant.jit.opaque`` rather than a literal: with
a literal count LLVM unrolls them completely and then vectorizes the block loop
instead, with gathers, which runs several times slower.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ..bits import bf16_to_f32, e8m0_half, f16_at, f16_to_f32, k4_min, k4_scale
from ..jit import opaque

_JIT = dict(inline="always", fastmath=True, cache=True)
F0 = np.float32(0.0)
F32_OFFSET = np.float32(32.0)  # Q6_K codes are stored offset by 32


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
    qk = opaque(x.shape[0], 32)
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
    half = opaque(x.shape[0], 32) // 2
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
    half = opaque(x.shape[0], 32) // 2
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
    # one loop over the whole super-block: each qh byte is loaded once for its 8 bits, which
    # then need only constant shifts, and there is one reduction per 256 weights
    acc = F0
    for s in range(x.shape[0] // 256):
        o = 176 * s
        c0 = np.float32(k4_scale(w, o + 4, 0))
        c1 = np.float32(k4_scale(w, o + 4, 1))
        c2 = np.float32(k4_scale(w, o + 4, 2))
        c3 = np.float32(k4_scale(w, o + 4, 3))
        c4 = np.float32(k4_scale(w, o + 4, 4))
        c5 = np.float32(k4_scale(w, o + 4, 5))
        c6 = np.float32(k4_scale(w, o + 4, 6))
        c7 = np.float32(k4_scale(w, o + 4, 7))
        mb = F0
        for j in range(8):
            mb += np.float32(k4_min(w, o + 4, j)) * xs[8 * s + j]
        xo = 256 * s
        qo = o + 48
        t = F0
        for l in range(32):
            h = w[o + 16 + l]
            q0 = w[qo + l]
            q1 = w[qo + 32 + l]
            q2 = w[qo + 64 + l]
            q3 = w[qo + 96 + l]
            t += (c0 * np.float32(np.int32((q0 & 15) | ((h & 1) << 4))) * x[xo + l]
                  + c1 * np.float32(np.int32((q0 >> 4) | ((h & 2) << 3))) * x[xo + 32 + l]
                  + c2 * np.float32(np.int32((q1 & 15) | ((h & 4) << 2))) * x[xo + 64 + l]
                  + c3 * np.float32(np.int32((q1 >> 4) | ((h & 8) << 1))) * x[xo + 96 + l]
                  + c4 * np.float32(np.int32((q2 & 15) | (h & 16))) * x[xo + 128 + l]
                  + c5 * np.float32(np.int32((q2 >> 4) | ((h & 32) >> 1))) * x[xo + 160 + l]
                  + c6 * np.float32(np.int32((q3 & 15) | ((h & 64) >> 2))) * x[xo + 192 + l]
                  + c7 * np.float32(np.int32((q3 >> 4) | ((h & 128) >> 3))) * x[xo + 224 + l])
        acc += f16_at(w, o) * t - f16_at(w, o + 2) * mb
    return acc


@nb.njit(**_JIT)
def dot_q6_k(w, x, xs, lut):
    # one loop per 128-weight half: the scale of each 16-weight group is picked by l < 16 (a
    # vector blend), so there is one reduction per 128 weights instead of one per 16
    acc = F0
    for s in range(x.shape[0] // 256):
        o = 210 * s
        sb = F0
        for h in range(2):
            ql = o + 64 * h
            qh = o + 128 + 32 * h
            xo = 256 * s + 128 * h
            g = o + 192 + 8 * h
            c0a = np.float32(np.int8(w[g]))
            c0b = np.float32(np.int8(w[g + 1]))
            c1a = np.float32(np.int8(w[g + 2]))
            c1b = np.float32(np.int8(w[g + 3]))
            c2a = np.float32(np.int8(w[g + 4]))
            c2b = np.float32(np.int8(w[g + 5]))
            c3a = np.float32(np.int8(w[g + 6]))
            c3b = np.float32(np.int8(w[g + 7]))
            t = F0
            for l in range(32):
                a = w[ql + l]
                b = w[ql + 32 + l]
                hb = w[qh + l]
                first = l < 16
                q0 = np.float32(np.int32((a & 15) | ((hb & 3) << 4))) - F32_OFFSET
                q1 = np.float32(np.int32((b & 15) | ((hb & 12) << 2))) - F32_OFFSET
                q2 = np.float32(np.int32((a >> 4) | (hb & 48))) - F32_OFFSET
                q3 = np.float32(np.int32((b >> 4) | ((hb >> 2) & 48))) - F32_OFFSET
                t += ((c0a if first else c0b) * q0 * x[xo + l] + (c1a if first else c1b) * q1 * x[xo + 32 + l]
                      + (c2a if first else c2b) * q2 * x[xo + 64 + l]
                      + (c3a if first else c3b) * q3 * x[xo + 96 + l])
            sb += t
        acc += f16_at(w, o + 208) * sb
    return acc


@nb.njit(**_JIT)
def dot_iq4_xs(w, x, xs, lut):
    acc = F0
    q16 = opaque(x.shape[0], 256) // 16
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
