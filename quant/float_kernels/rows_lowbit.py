"""Row dot and row decode for the formats llama.cpp's low-bit presets write besides the K-quants
we had: Q4_1, Q5_0, Q5_1, IQ4_NL (32-weight blocks, llama.cpp's fallback for rows that are
not a multiple of 256), Q2_K, Q3_K, TQ1_0 and TQ2_0 (256-weight super-blocks).

Shape legend (as in row_dot and row_decode)
    w     uint8   [row_bytes]   one row of GGUF blocks
    x     float32 [C]           activations            xs  float32 [C // 32]  sums of x per block
    lut   float32 [2, 16]       row 0: IQ4_NL code book
    tile  float32 [RT, CT]      decode target: row i receives W[c0:c0+n] in its first n entries
``dot_*`` returns sum_c W[c] * x[c] as float32; ``deq_*`` writes float32 weights computed as
``quant.reference`` computes them (scale * q - min in float32; FMA contraction aside).

The inner loops follow row_dot's rules: one plain contiguous loop per sub-block with an
opaque trip count, integer codes widened through ``np.int32``, scales and mins applied once
per sub-block (an additive min through the block sum of x: ``xs`` for 32-weight blocks,
a sum kept in the same loop for the 16-weight sub-blocks of Q2_K).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ..bits import f16_at
from ..jit import opaque

_JIT = dict(inline="always", fastmath=True, cache=True)
F0 = np.float32(0.0)
F4 = np.float32(4.0)


@nb.njit(**_JIT)
def _u32_at(w, o):
    return (np.uint32(w[o]) | (np.uint32(w[o + 1]) << np.uint32(8)) | (np.uint32(w[o + 2]) << np.uint32(16))
            | (np.uint32(w[o + 3]) << np.uint32(24)))


@nb.njit(**_JIT)
def _q3k_scale(w, o, j):
    """Signed scale (stored - 32) of sub-block j from the 12-byte Q3_K scales field at w[o:]."""
    lo = (np.int32(w[o + (j & 7)]) >> (4 * (j >> 3))) & 15
    hi = (np.int32(w[o + 8 + (j & 3)]) >> (2 * (j >> 2))) & 3
    return np.int32(lo | (hi << 4)) - 32


@nb.njit(**_JIT)
def _trit(q, p):
    """Base-3 digit of fixed-point byte q at place p (1, 3, 9, 27 or 81): ((q * p mod 256) * 3) >> 8,
    in int32 throughout (int64 lanes would halve the vector width)."""
    return np.int32((((np.int32(q) * p) & 255) * 3) >> 8)


# ---------------------------------------------------------------- row dots (GEMV)

@nb.njit(**_JIT)
def dot_q4_1(w, x, xs, lut):
    acc = F0
    half = opaque(x.shape[0], 32) // 2
    for b in range(x.shape[0] // 32):
        o = 20 * b
        s = F0
        for l in range(half):
            q = w[o + 4 + l]
            s += np.float32(np.int32(q & 15)) * x[32 * b + l] + np.float32(np.int32(q >> 4)) * x[32 * b + 16 + l]
        acc += f16_at(w, o) * s + f16_at(w, o + 2) * xs[b]
    return acc


@nb.njit(**_JIT)
def _q5_sum(w, qo, qh, x, xo, half):
    """sum_l q[l] * x[xo + l] over one 32-weight block of 5-bit codes (low nibbles at w[qo:],
    fifth bits in qh)."""
    s = F0
    for l in range(half):
        q = np.int32(w[qo + l])
        h0 = np.int32((qh >> np.uint32(l)) & np.uint32(1))
        h1 = np.int32((qh >> np.uint32(l + 16)) & np.uint32(1))
        s += np.float32((q & 15) | (h0 << 4)) * x[xo + l] + np.float32((q >> 4) | (h1 << 4)) * x[xo + 16 + l]
    return s


@nb.njit(**_JIT)
def dot_q5_0(w, x, xs, lut):
    acc = F0
    half = opaque(x.shape[0], 32) // 2
    for b in range(x.shape[0] // 32):
        o = 22 * b
        s = _q5_sum(w, o + 6, _u32_at(w, o + 2), x, 32 * b, half)
        acc += f16_at(w, o) * (s - np.float32(16.0) * xs[b])
    return acc


@nb.njit(**_JIT)
def dot_q5_1(w, x, xs, lut):
    acc = F0
    half = opaque(x.shape[0], 32) // 2
    for b in range(x.shape[0] // 32):
        o = 24 * b
        s = _q5_sum(w, o + 8, _u32_at(w, o + 4), x, 32 * b, half)
        acc += f16_at(w, o) * s + f16_at(w, o + 2) * xs[b]
    return acc


@nb.njit(**_JIT)
def dot_iq4_nl(w, x, xs, lut):
    acc = F0
    half = opaque(x.shape[0], 32) // 2
    for b in range(x.shape[0] // 32):
        o = 18 * b
        s = F0
        for l in range(half):
            q = w[o + 2 + l]
            s += lut[0, q & 15] * x[32 * b + l] + lut[0, q >> 4] * x[32 * b + 16 + l]
        acc += f16_at(w, o) * s
    return acc


@nb.njit(**_JIT)
def _sel(first, a, b):
    return a if first else b


@nb.njit(**_JIT)
def dot_q2_k(w, x, xs, lut):
    # one loop per 128-weight half over the 32 bytes that hold its four 2-bit planes: the scale
    # and min of each 16-weight sub-block are picked by l < 16 (a vector blend, as dot_q6_k
    # does), so there are two reductions per 128 weights instead of four per 32
    acc = F0
    q32 = opaque(x.shape[0], 256) // 8
    for s in range(x.shape[0] // 256):
        o = 84 * s
        sb = F0
        mb = F0
        for h in range(2):
            qo = o + 16 + 32 * h
            xo = 256 * s + 128 * h
            g = o + 8 * h
            c0a = np.float32(np.int32(w[g] & 15))
            c0b = np.float32(np.int32(w[g + 1] & 15))
            c1a = np.float32(np.int32(w[g + 2] & 15))
            c1b = np.float32(np.int32(w[g + 3] & 15))
            c2a = np.float32(np.int32(w[g + 4] & 15))
            c2b = np.float32(np.int32(w[g + 5] & 15))
            c3a = np.float32(np.int32(w[g + 6] & 15))
            c3b = np.float32(np.int32(w[g + 7] & 15))
            m0a = np.float32(np.int32(w[g] >> 4))
            m0b = np.float32(np.int32(w[g + 1] >> 4))
            m1a = np.float32(np.int32(w[g + 2] >> 4))
            m1b = np.float32(np.int32(w[g + 3] >> 4))
            m2a = np.float32(np.int32(w[g + 4] >> 4))
            m2b = np.float32(np.int32(w[g + 5] >> 4))
            m3a = np.float32(np.int32(w[g + 6] >> 4))
            m3b = np.float32(np.int32(w[g + 7] >> 4))
            t = F0
            u = F0
            for l in range(q32):
                first = l < 16
                q = np.int32(w[qo + l])
                x0 = x[xo + l]
                x1 = x[xo + 32 + l]
                x2 = x[xo + 64 + l]
                x3 = x[xo + 96 + l]
                t += (_sel(first, c0a, c0b) * np.float32(np.int32(q & 3)) * x0 + _sel(first, c1a, c1b) * np.float32(np.int32((q >> 2) & 3)) * x1
                      + _sel(first, c2a, c2b) * np.float32(np.int32((q >> 4) & 3)) * x2 + _sel(first, c3a, c3b) * np.float32(np.int32(q >> 6)) * x3)
                u += (_sel(first, m0a, m0b) * x0 + _sel(first, m1a, m1b) * x1 + _sel(first, m2a, m2b) * x2
                      + _sel(first, m3a, m3b) * x3)
            sb += t
            mb += u
        acc += f16_at(w, o + 80) * sb - f16_at(w, o + 82) * mb
    return acc


@nb.njit(**_JIT)
def _q3(q, hm, g):
    """Q3_K code of plane g: 2 low bits of byte q, minus 4 unless bit g of the hmask byte is set."""
    return np.float32(np.int32((q >> (2 * g)) & 3)) + np.float32(np.int32((hm >> g) & 1)) * F4 - F4


@nb.njit(**_JIT)
def dot_q3_k(w, x, xs, lut):
    # as dot_q2_k: one loop per 128-weight half, the 16-weight sub-block's scale chosen per lane
    acc = F0
    q32 = opaque(x.shape[0], 256) // 8
    for s in range(x.shape[0] // 256):
        o = 110 * s
        sb = F0
        for h in range(2):
            qo = o + 32 + 32 * h
            xo = 256 * s + 128 * h
            j = 8 * h
            c0a = np.float32(_q3k_scale(w, o + 96, j))
            c0b = np.float32(_q3k_scale(w, o + 96, j + 1))
            c1a = np.float32(_q3k_scale(w, o + 96, j + 2))
            c1b = np.float32(_q3k_scale(w, o + 96, j + 3))
            c2a = np.float32(_q3k_scale(w, o + 96, j + 4))
            c2b = np.float32(_q3k_scale(w, o + 96, j + 5))
            c3a = np.float32(_q3k_scale(w, o + 96, j + 6))
            c3b = np.float32(_q3k_scale(w, o + 96, j + 7))
            t = F0
            for l in range(q32):
                first = l < 16
                q = np.int32(w[qo + l])
                hm = np.int32(np.int32(w[o + l]) >> (4 * h))  # hmask bits 4h .. 4h+3: this half's planes
                t += (_sel(first, c0a, c0b) * _q3(q, hm, 0) * x[xo + l] + _sel(first, c1a, c1b) * _q3(q, hm, 1) * x[xo + 32 + l]
                      + _sel(first, c2a, c2b) * _q3(q, hm, 2) * x[xo + 64 + l]
                      + _sel(first, c3a, c3b) * _q3(q, hm, 3) * x[xo + 96 + l])
            sb += t
        acc += f16_at(w, o + 108) * sb
    return acc


@nb.njit(**_JIT)
def _trit_sum(w, qo, n, p, x, xo):
    """sum_l (digit p of w[qo + l] - 1) * x[xo + l] for l < n."""
    t = F0
    for l in range(n):
        t += np.float32(np.int32(_trit(w[qo + l], p) - 1)) * x[xo + l]
    return t


@nb.njit(**_JIT)
def dot_tq1_0(w, x, xs, lut):
    acc = F0
    q32 = opaque(x.shape[0], 256) // 8
    q16 = q32 // 2
    q4 = q32 // 8
    for s in range(x.shape[0] // 256):
        o = 54 * s
        xo = 256 * s
        t = F0
        p = np.int32(1)
        for k in range(5):
            t += _trit_sum(w, o, q32, p, x, xo + 32 * k)
            t += _trit_sum(w, o + 32, q16, p, x, xo + 160 + 16 * k)
            if k < 4:
                t += _trit_sum(w, o + 48, q4, p, x, xo + 240 + 4 * k)
            p *= np.int32(3)
        acc += f16_at(w, o + 52) * t
    return acc


@nb.njit(**_JIT)
def dot_tq2_0(w, x, xs, lut):
    acc = F0
    q32 = opaque(x.shape[0], 256) // 8
    for s in range(x.shape[0] // 256):
        o = 66 * s
        t = F0
        for h in range(2):
            qo = o + 32 * h
            xo = 256 * s + 128 * h
            for l in range(q32):
                q = np.int32(w[qo + l])
                t += (np.float32(np.int32((q & 3) - 1)) * x[xo + l] + np.float32(np.int32(((q >> 2) & 3) - 1)) * x[xo + 32 + l]
                      + np.float32(np.int32(((q >> 4) & 3) - 1)) * x[xo + 64 + l]
                      + np.float32(np.int32((q >> 6) - 1)) * x[xo + 96 + l])
        acc += f16_at(w, o + 64) * t
    return acc


# ---------------------------------------------------------------- row decoders (GEMM tiles)

@nb.njit(**_JIT)
def deq_q4_1(w, c0, n, lut, tile, i):
    b0 = c0 // 32
    nblk = n // 32
    half = opaque(n, 32) // 2
    for b in range(nblk):
        o = 20 * (b0 + b)
        d = f16_at(w, o)
        m = f16_at(w, o + 2)
        t = 32 * b
        for l in range(half):
            q = np.int32(w[o + 4 + l])
            tile[i, t + l] = d * np.float32(q & 15) + m
            tile[i, t + 16 + l] = d * np.float32(q >> 4) + m


@nb.njit(**_JIT)
def _deq_q5(w, qo, qh, d, off, m, tile, i, t, half):
    """w = d * (q - off) + m for one block of 5-bit codes (Q5_0: off 16, m 0; Q5_1: off 0)."""
    for l in range(half):
        q = np.int32(w[qo + l])
        h0 = np.int32((qh >> np.uint32(l)) & np.uint32(1))
        h1 = np.int32((qh >> np.uint32(l + 16)) & np.uint32(1))
        tile[i, t + l] = d * np.float32(((q & 15) | (h0 << 4)) - off) + m
        tile[i, t + 16 + l] = d * np.float32(((q >> 4) | (h1 << 4)) - off) + m


@nb.njit(**_JIT)
def deq_q5_0(w, c0, n, lut, tile, i):
    b0 = c0 // 32
    nblk = n // 32
    half = opaque(n, 32) // 2
    for b in range(nblk):
        o = 22 * (b0 + b)
        _deq_q5(w, o + 6, _u32_at(w, o + 2), f16_at(w, o), 16, F0, tile, i, 32 * b, half)


@nb.njit(**_JIT)
def deq_q5_1(w, c0, n, lut, tile, i):
    b0 = c0 // 32
    nblk = n // 32
    half = opaque(n, 32) // 2
    for b in range(nblk):
        o = 24 * (b0 + b)
        _deq_q5(w, o + 8, _u32_at(w, o + 4), f16_at(w, o), 0, f16_at(w, o + 2), tile, i, 32 * b, half)


@nb.njit(**_JIT)
def deq_iq4_nl(w, c0, n, lut, tile, i):
    b0 = c0 // 32
    nblk = n // 32
    half = opaque(n, 32) // 2
    for b in range(nblk):
        o = 18 * (b0 + b)
        d = f16_at(w, o)
        t = 32 * b
        for l in range(half):
            q = w[o + 2 + l]
            tile[i, t + l] = d * lut[0, q & 15]
            tile[i, t + 16 + l] = d * lut[0, q >> 4]


@nb.njit(**_JIT)
def deq_q2_k(w, c0, n, lut, tile, i):
    b0 = c0 // 256
    nblk = n // 256
    q16 = opaque(n, 256) // 16
    for s in range(nblk):
        o = 84 * (b0 + s)
        d = f16_at(w, o + 80)
        dmin = f16_at(w, o + 82)
        for h in range(2):
            for g in range(4):
                qo = o + 16 + 32 * h
                t = 256 * s + 128 * h + 32 * g
                sh = 2 * g
                ja = o + 8 * h + 2 * g
                aa = d * np.float32(np.int32(w[ja] & 15))
                ab = d * np.float32(np.int32(w[ja + 1] & 15))
                ma = dmin * np.float32(np.int32(w[ja] >> 4))
                mb = dmin * np.float32(np.int32(w[ja + 1] >> 4))
                for l in range(q16):
                    tile[i, t + l] = aa * np.float32(np.int32((w[qo + l] >> sh) & 3)) - ma
                    tile[i, t + 16 + l] = ab * np.float32(np.int32((w[qo + 16 + l] >> sh) & 3)) - mb


@nb.njit(**_JIT)
def deq_q3_k(w, c0, n, lut, tile, i):
    b0 = c0 // 256
    nblk = n // 256
    q16 = opaque(n, 256) // 16
    for s in range(nblk):
        o = 110 * (b0 + s)
        d = f16_at(w, o + 108)
        for h in range(2):
            for g in range(4):
                qo = o + 32 + 32 * h
                t = 256 * s + 128 * h + 32 * g
                sh = 2 * g
                hb = 4 * h + g
                j = 8 * h + 2 * g
                aa = d * np.float32(_q3k_scale(w, o + 96, j))
                ab = d * np.float32(_q3k_scale(w, o + 96, j + 1))
                for l in range(q16):
                    qa = np.int32((w[qo + l] >> sh) & 3) - 4 + 4 * np.int32((w[o + l] >> hb) & 1)
                    qb = np.int32((w[qo + 16 + l] >> sh) & 3) - 4 + 4 * np.int32((w[o + 16 + l] >> hb) & 1)
                    tile[i, t + l] = aa * np.float32(qa)
                    tile[i, t + 16 + l] = ab * np.float32(qb)


@nb.njit(**_JIT)
def _deq_trits(w, qo, nq, p, d, tile, i, t):
    for l in range(nq):
        tile[i, t + l] = d * np.float32(np.int32(_trit(w[qo + l], p) - 1))


@nb.njit(**_JIT)
def deq_tq1_0(w, c0, n, lut, tile, i):
    b0 = c0 // 256
    nblk = n // 256
    q32 = opaque(n, 256) // 8
    q16 = q32 // 2
    q4 = q32 // 8
    for s in range(nblk):
        o = 54 * (b0 + s)
        d = f16_at(w, o + 52)
        t = 256 * s
        p = np.int32(1)
        for k in range(5):
            _deq_trits(w, o, q32, p, d, tile, i, t + 32 * k)
            _deq_trits(w, o + 32, q16, p, d, tile, i, t + 160 + 16 * k)
            if k < 4:
                _deq_trits(w, o + 48, q4, p, d, tile, i, t + 240 + 4 * k)
            p *= np.int32(3)


@nb.njit(**_JIT)
def deq_tq2_0(w, c0, n, lut, tile, i):
    b0 = c0 // 256
    nblk = n // 256
    q32 = opaque(n, 256) // 8
    for s in range(nblk):
        o = 66 * (b0 + s)
        d = f16_at(w, o + 64)
        for h in range(2):
            for g in range(4):
                qo = o + 32 * h
                t = 256 * s + 128 * h + 32 * g
                sh = 2 * g
                for l in range(q32):
                    tile[i, t + l] = d * np.float32(np.int32((w[qo + l] >> sh) & 3) - 1)
