"""Dequantize a run of blocks of one weight row into a row of a float32 tile, per format.

Shape legend
    w     uint8   [row_bytes]   one row of GGUF blocks
    c0    first column to decode, n the number of columns (both multiples of the block size)
    lut   float32 [2, 16]       row 0: IQ4_NL code book, row 1: MXFP4 code book (doubled E2M1)
    tile  float32 [RT, CT]      row i receives W[c0:c0+n] in its first n entries
The GEMM kernels dequantize a tile of rows once and reuse it for every token.
The arithmetic is the reference decoders' (scale * q - min in float32), so the
values are those of ``quant.dequantize`` up to fused multiply-adds.

Every index is built from counters of one-argument ranges (c0 is one times a
constant in the caller): an index Numba cannot prove non-negative gets a wrap-around
test, which stops LLVM from vectorizing the loop. For the same reason rows are
indexed in place rather than sliced.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ..bits import bf16_to_f32, e8m0_half, f16_at, f16_to_f32, k4_min, k4_scale
from ..jit import opaque

_JIT = dict(inline="always", fastmath=True, cache=True)


@nb.njit(**_JIT)
def deq_f32(w, c0, n, lut, tile, i):
    b0 = c0
    nblk = n
    v = w.view(np.float32)
    for c in range(nblk):
        tile[i, c] = v[b0 + c]


@nb.njit(**_JIT)
def deq_f16(w, c0, n, lut, tile, i):
    b0 = c0
    nblk = n
    v = w.view(np.uint16)
    for c in range(nblk):
        tile[i, c] = f16_to_f32(v[b0 + c])


@nb.njit(**_JIT)
def deq_bf16(w, c0, n, lut, tile, i):
    b0 = c0
    nblk = n
    v = w.view(np.uint16)
    for c in range(nblk):
        tile[i, c] = bf16_to_f32(v[b0 + c])


@nb.njit(**_JIT)
def deq_q8_0(w, c0, n, lut, tile, i):
    b0 = c0 // 32
    nblk = n // 32
    qk = opaque(n, 32)
    for b in range(nblk):
        o = 34 * (b0 + b)
        d = f16_at(w, o)
        t = 32 * b
        for l in range(qk):
            tile[i, t + l] = d * np.float32(np.int8(w[o + 2 + l]))


@nb.njit(**_JIT)
def deq_q4_0(w, c0, n, lut, tile, i):
    b0 = c0 // 32
    nblk = n // 32
    half = opaque(n, 32) // 2
    for b in range(nblk):
        o = 18 * (b0 + b)
        d = f16_at(w, o)
        t = 32 * b
        for l in range(half):
            q = np.int32(w[o + 2 + l])
            tile[i, t + l] = d * np.float32(np.int32((q & 15) - 8))
            tile[i, t + 16 + l] = d * np.float32(np.int32((q >> 4) - 8))


@nb.njit(**_JIT)
def deq_mxfp4(w, c0, n, lut, tile, i):
    b0 = c0 // 32
    nblk = n // 32
    half = opaque(n, 32) // 2
    for b in range(nblk):
        o = 17 * (b0 + b)
        d = e8m0_half(w[o])
        t = 32 * b
        for l in range(half):
            q = w[o + 1 + l]
            tile[i, t + l] = d * lut[1, q & 15]
            tile[i, t + 16 + l] = d * lut[1, q >> 4]


@nb.njit(**_JIT)
def deq_q4_k(w, c0, n, lut, tile, i):
    b0 = c0 // 256
    nblk = n // 256
    for s in range(nblk):
        o = 144 * (b0 + s)
        d = f16_at(w, o)
        dmin = f16_at(w, o + 2)
        t = 256 * s
        # sub-block pairs unrolled by hand: the scale and min fields have constant offsets
        _q4k_pair(w, o, 0, d, dmin, tile, i, t)
        _q4k_pair(w, o, 1, d, dmin, tile, i, t + 64)
        _q4k_pair(w, o, 2, d, dmin, tile, i, t + 128)
        _q4k_pair(w, o, 3, d, dmin, tile, i, t + 192)


@nb.njit(**_JIT)
def _q4k_pair(w, o, k, d, dmin, tile, i, t):
    a0 = d * np.float32(k4_scale(w, o + 4, 2 * k))
    a1 = d * np.float32(k4_scale(w, o + 4, 2 * k + 1))
    m0 = dmin * np.float32(k4_min(w, o + 4, 2 * k))
    m1 = dmin * np.float32(k4_min(w, o + 4, 2 * k + 1))
    qo = o + 16 + 32 * k
    for l in range(32):
        q = w[qo + l]
        tile[i, t + l] = a0 * np.float32(np.int32(q & 15)) - m0
        tile[i, t + 32 + l] = a1 * np.float32(np.int32(q >> 4)) - m1


@nb.njit(**_JIT)
def deq_q5_k(w, c0, n, lut, tile, i):
    b0 = c0 // 256
    nblk = n // 256
    q32 = opaque(n, 256) // 8
    for s in range(nblk):
        o = 176 * (b0 + s)
        d = f16_at(w, o)
        dmin = f16_at(w, o + 2)
        for k in range(4):
            a0 = d * np.float32(k4_scale(w, o + 4, 2 * k))
            a1 = d * np.float32(k4_scale(w, o + 4, 2 * k + 1))
            m0 = dmin * np.float32(k4_min(w, o + 4, 2 * k))
            m1 = dmin * np.float32(k4_min(w, o + 4, 2 * k + 1))
            qo = o + 48 + 32 * k
            t = 256 * s + 64 * k
            sh = 2 * k
            for l in range(q32):
                q = w[qo + l]
                h = w[o + 16 + l] >> sh
                tile[i, t + l] = a0 * np.float32(np.int32((q & 15) | ((h & 1) << 4))) - m0
                tile[i, t + 32 + l] = a1 * np.float32(np.int32((q >> 4) | ((h & 2) << 3))) - m1


@nb.njit(**_JIT)
def deq_q6_k(w, c0, n, lut, tile, i):
    b0 = c0 // 256
    nblk = n // 256
    q16 = opaque(n, 256) // 16
    for s in range(nblk):
        o = 210 * (b0 + s)
        d = f16_at(w, o + 208)
        for h in range(2):
            ql = o + 64 * h
            qh = o + 128 + 32 * h
            t = 256 * s + 128 * h
            for half in range(2):
                g = o + 192 + 8 * h + half
                a0 = d * np.float32(np.int8(w[g]))
                a1 = d * np.float32(np.int8(w[g + 2]))
                a2 = d * np.float32(np.int8(w[g + 4]))
                a3 = d * np.float32(np.int8(w[g + 6]))
                for e in range(q16):
                    l = 16 * half + e
                    a = w[ql + l]
                    b = w[ql + 32 + l]
                    hb = w[qh + l]
                    tile[i, t + l] = a0 * (np.float32(np.int32((a & 15) | ((hb & 3) << 4))) - np.float32(32))
                    tile[i, t + 32 + l] = a1 * (np.float32(np.int32((b & 15) | ((hb & 12) << 2))) - np.float32(32))
                    tile[i, t + 64 + l] = a2 * (np.float32(np.int32((a >> 4) | (hb & 48))) - np.float32(32))
                    tile[i, t + 96 + l] = a3 * (np.float32(np.int32((b >> 4) | ((hb >> 2) & 48))) - np.float32(32))


@nb.njit(**_JIT)
def deq_iq4_xs(w, c0, n, lut, tile, i):
    b0 = c0 // 256
    nblk = n // 256
    q16 = opaque(n, 256) // 16
    for s in range(nblk):
        o = 136 * (b0 + s)
        d = f16_at(w, o)
        sh = np.int32(w[o + 2]) | (np.int32(w[o + 3]) << 8)
        for j in range(8):
            ls = ((np.int32(w[o + 4 + j // 2]) >> (4 * (j % 2))) & 15) | (((sh >> (2 * j)) & 3) << 4)
            a = d * np.float32(ls - 32)
            qo = o + 8 + 16 * j
            t = 256 * s + 32 * j
            for l in range(q16):
                q = w[qo + l]
                tile[i, t + l] = a * lut[0, q & 15]
                tile[i, t + 16 + l] = a * lut[0, q >> 4]
