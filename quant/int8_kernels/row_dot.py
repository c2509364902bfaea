"""The int8-activation path: activations quantized to 8 bits, integer dot products per row.

Shape legend
    C    columns, a multiple of 256
    x    float32 [C]           one token's activations
    xq   int8    [C]           x quantized per 256 columns: x ~= xd[c // 256] * xq[c]
    xd   float32 [C // 256]    the scale of each 256-column block, max|x| / 127
    xb   int32   [C // 16]     sums of xq over each 16 columns (for K-quant mins and offsets)
    w    uint8   [row_bytes]   one GGUF row of Q4_K, Q5_K, Q6_K or Q8_0 (here; the other formats'
                               row dots are in q2k_q3k, blocks32, iq4_xs, iq_low and ternary, with the
                               same arguments)
Each ``q8dot_*`` returns sum_c W[c] * xd[c // 256] * xq[c] as float32, exact up to the
float32 rounding of one multiply-add per 256 columns: all products inside a super-block
are integers.

This is llama.cpp's idea (Q8_K activations): weights times int8 activations are small
integers, so the inner loops are 16-bit multiply-adds into 32-bit lanes, which x86
runs as ``vpmaddwd``/``vpdpwssd``, twice the lanes of a float32 FMA and with no int-to-float
conversion per weight. Two things make LLVM emit them from Numba code:
every integer intermediate is wrapped in ``np.int32``/``np.int16`` (Numba would
otherwise widen sums to int64, and 64-bit lanes are 4x slower), and the per-sub-block
scales are folded into the 16-bit weights (``scale * q`` fits int16 for every format
here), so each inner loop has a single reduction per 64 to 256 weights.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ..bits import EXPONENT_ONE, NON_FINITE, QUIET_NAN, bits_of_f32, f16_at, f32_from_bits, k4_min, k4_scale
from ..jit import FIXED_ORDER
from . import avx2, blocks32, iq_avx2, iq_low, ternary
from .avx2 import (q4k_row_dot, q4k_row_dot4, q5k_row_dot, q5k_row_dot4, q6k_row_dot, q6k_row_dot4, q8_0_row_dot,
                   q8_0_row_dot4)
from .dispatch import IQ4_XS, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_0, format_set, switch
from .iq4_xs import q8dot4_iq4_xs_simd, q8dot_iq4_xs, q8dot_iq4_xs_simd
from .q2k_q3k import q8dot4_q2_k_simd, q8dot4_q3_k_simd, q8dot_q2_k, q8dot_q2_k_simd, q8dot_q3_k, q8dot_q3_k_simd

_JIT = dict(inline="always", fastmath=True, cache=True)
# The portable row dots (hosts without AVX2) are called, not inlined: they are loops, which Numba cannot inline
# through a format switch into a parallel loop without losing track of their variables
# (NumbaIRAssumptionWarning), and a call per row costs nothing next to a row's work. Their
# float steps (once per 32 or 256 columns) keep a fixed order (FIXED_ORDER: the integer loops
# vectorize without fast-math), so the GEMV and the GEMM of a row agree to the bit.
_CALLED = dict(fastmath=FIXED_ORDER, cache=True)
I16 = np.int16
I32 = np.int32
F0 = np.float32(0.0)



@nb.njit(**_JIT)
def quantize_row(x, xq, xd, xb):
    """Fill xq, xd, xb from x (see the legend). Rounds to nearest, ties to even.

    A block holding Inf or NaN gets a NaN scale, so that every product it enters is NaN and
    the model's check of its outputs finds it. Rounded to int8, NaN would become a plain 0 and
    the damage (a weight of Inf in a file, say) would go on as finite, wrong numbers. The test is
    on the bits, and the NaN is made from bits: fast-math lets LLVM fold float tests for NaN."""
    for s in range(x.shape[0] // 256):
        o = 256 * s
        amax = F0
        bad = np.uint32(0)
        for l in range(256):
            amax = max(amax, abs(x[o + l]))
            # 1 where every exponent bit is set: (0x7F800000 + 0x00800000) >> 31; below, 0
            bad |= ((bits_of_f32(x[o + l]) & NON_FINITE) + EXPONENT_ONE) >> 31
        inv = np.float32(127.0) / amax if amax > F0 else F0
        xd[s] = f32_from_bits(bits_of_f32(amax / np.float32(127.0)) | (QUIET_NAN * bad))
        for l in range(256):
            xq[o + l] = np.int8(I32(np.rint(x[o + l] * inv)))
        for j in range(16):
            b = I32(0)
            for l in range(16):
                b = I32(b + I32(xq[o + 16 * j + l]))
            xb[16 * s + j] = b


@nb.njit(**_CALLED)
def q8dot_q8_0(w, xq, xd, xb):
    acc = F0
    for s in range(xq.shape[0] // 256):
        sb = F0
        for k in range(8):
            o = 34 * (8 * s + k)
            xo = 256 * s + 32 * k
            t = I32(0)
            for l in range(32):
                t = I32(t + I32(np.int8(w[o + 2 + l])) * I32(xq[xo + l]))
            sb += f16_at(w, o) * np.float32(t)
        acc += xd[s] * sb
    return acc


@nb.njit(**_CALLED)
def q8dot_q4_k(w, xq, xd, xb):
    acc = F0
    for s in range(xq.shape[0] // 256):
        o = 144 * s
        isum = I32(0)
        for k in range(4):
            qo = o + 16 + 32 * k
            xo = 256 * s + 64 * k
            a0 = I16(k4_scale(w, o + 4, 2 * k))
            a1 = I16(k4_scale(w, o + 4, 2 * k + 1))
            t = I32(0)
            for l in range(32):
                q = w[qo + l]
                t = I32(t + I32(I16(a0 * I16(q & 15))) * I32(xq[xo + l])
                        + I32(I16(a1 * I16(q >> 4))) * I32(xq[xo + 32 + l]))
            isum = I32(isum + t)
        msum = I32(0)
        for j in range(8):
            msum = I32(msum + k4_min(w, o + 4, j) * I32(xb[16 * s + 2 * j] + xb[16 * s + 2 * j + 1]))
        acc += xd[s] * (f16_at(w, o) * np.float32(isum) - f16_at(w, o + 2) * np.float32(msum))
    return acc


@nb.njit(**_CALLED)
def q8dot_q5_k(w, xq, xd, xb):
    acc = F0
    for s in range(xq.shape[0] // 256):
        o = 176 * s
        c0 = I16(k4_scale(w, o + 4, 0))
        c1 = I16(k4_scale(w, o + 4, 1))
        c2 = I16(k4_scale(w, o + 4, 2))
        c3 = I16(k4_scale(w, o + 4, 3))
        c4 = I16(k4_scale(w, o + 4, 4))
        c5 = I16(k4_scale(w, o + 4, 5))
        c6 = I16(k4_scale(w, o + 4, 6))
        c7 = I16(k4_scale(w, o + 4, 7))
        xo = 256 * s
        qo = o + 48
        t = I32(0)
        for l in range(32):
            h = w[o + 16 + l]
            q0 = w[qo + l]
            q1 = w[qo + 32 + l]
            q2 = w[qo + 64 + l]
            q3 = w[qo + 96 + l]
            t = I32(t + I32(I16(c0 * I16((q0 & 15) | ((h & 1) << 4)))) * I32(xq[xo + l])
                    + I32(I16(c1 * I16((q0 >> 4) | ((h & 2) << 3)))) * I32(xq[xo + 32 + l])
                    + I32(I16(c2 * I16((q1 & 15) | ((h & 4) << 2)))) * I32(xq[xo + 64 + l])
                    + I32(I16(c3 * I16((q1 >> 4) | ((h & 8) << 1)))) * I32(xq[xo + 96 + l])
                    + I32(I16(c4 * I16((q2 & 15) | (h & 16)))) * I32(xq[xo + 128 + l])
                    + I32(I16(c5 * I16((q2 >> 4) | ((h & 32) >> 1)))) * I32(xq[xo + 160 + l])
                    + I32(I16(c6 * I16((q3 & 15) | ((h & 64) >> 2)))) * I32(xq[xo + 192 + l])
                    + I32(I16(c7 * I16((q3 >> 4) | ((h & 128) >> 3)))) * I32(xq[xo + 224 + l]))
        msum = I32(0)
        for j in range(8):
            msum = I32(msum + k4_min(w, o + 4, j) * I32(xb[16 * s + 2 * j] + xb[16 * s + 2 * j + 1]))
        acc += xd[s] * (f16_at(w, o) * np.float32(t) - f16_at(w, o + 2) * np.float32(msum))
    return acc


@nb.njit(**_CALLED)
def q8dot_q6_k(w, xq, xd, xb):
    # codes are stored offset by 32: sum sc * (q - 32) * x = sum (sc * q) * x - 32 * sum sc * xb16,
    # and sc * q (|sc| <= 128, q < 64) fits int16. The scale of each 16-weight group is picked
    # by l < 16 (a vector blend), as in the float kernel.
    acc = F0
    for s in range(xq.shape[0] // 256):
        o = 210 * s
        isum = I32(0)
        for h in range(2):
            ql = o + 64 * h
            qh = o + 128 + 32 * h
            xo = 256 * s + 128 * h
            g = o + 192 + 8 * h
            c0a = I16(np.int8(w[g]))
            c0b = I16(np.int8(w[g + 1]))
            c1a = I16(np.int8(w[g + 2]))
            c1b = I16(np.int8(w[g + 3]))
            c2a = I16(np.int8(w[g + 4]))
            c2b = I16(np.int8(w[g + 5]))
            c3a = I16(np.int8(w[g + 6]))
            c3b = I16(np.int8(w[g + 7]))
            t = I32(0)
            for l in range(32):
                a = w[ql + l]
                b = w[ql + 32 + l]
                hb = w[qh + l]
                first = l < 16
                q0 = I16((a & 15) | ((hb & 3) << 4))
                q1 = I16((b & 15) | ((hb & 12) << 2))
                q2 = I16((a >> 4) | (hb & 48))
                q3 = I16((b >> 4) | ((hb >> 2) & 48))
                t = I32(t + I32(I16((c0a if first else c0b) * q0)) * I32(xq[xo + l])
                        + I32(I16((c1a if first else c1b) * q1)) * I32(xq[xo + 32 + l])
                        + I32(I16((c2a if first else c2b) * q2)) * I32(xq[xo + 64 + l])
                        + I32(I16((c3a if first else c3b) * q3)) * I32(xq[xo + 96 + l]))
            isum = I32(isum + t)
        off = I32(0)
        for j in range(16):
            off = I32(off + I32(np.int8(w[o + 192 + j])) * xb[16 * s + j])
        acc += xd[s] * f16_at(w, o + 208) * np.float32(I32(isum - I32(32) * off))
    return acc


# ---------------------------------------------------------------- AVX2 versions (see avx2)

@nb.njit(**_JIT)
def q8dot_q4_k_simd(w, xq, xd, xb):
    return q4k_row_dot(np.int64(w.ctypes.data), xq.shape[0] // 256, np.int64(xq.ctypes.data),
                       np.int64(xb.ctypes.data), np.int64(xd.ctypes.data))


@nb.njit(**_JIT)
def q8dot_q6_k_simd(w, xq, xd, xb):
    return q6k_row_dot(np.int64(w.ctypes.data), xq.shape[0] // 256, np.int64(xq.ctypes.data),
                       np.int64(xb.ctypes.data), np.int64(xd.ctypes.data))


@nb.njit(**_JIT)
def q8dot_q5_k_simd(w, xq, xd, xb):
    return q5k_row_dot(np.int64(w.ctypes.data), xq.shape[0] // 256, np.int64(xq.ctypes.data),
                       np.int64(xb.ctypes.data), np.int64(xd.ctypes.data))


@nb.njit(**_JIT)
def q8dot_q8_0_simd(w, xq, xd, xb):
    return q8_0_row_dot(np.int64(w.ctypes.data), xq.shape[0] // 256, np.int64(xq.ctypes.data),
                        np.int64(xb.ctypes.data), np.int64(xd.ctypes.data))


@nb.njit(**_JIT)
def _addresses4(A, t):
    return (np.int64(A[t].ctypes.data), np.int64(A[t + 1].ctypes.data), np.int64(A[t + 2].ctypes.data),
            np.int64(A[t + 3].ctypes.data))


@nb.njit(**_JIT)
def q8dot4_q4_k_simd(w, XQ, XD, XB, t):
    """Row w times tokens t .. t+3 of the activations [N, C]: the weights are decoded once per
    super-block for the four (a GEMM step). Returns four float32."""
    x0, x1, x2, x3 = _addresses4(XQ, t)
    b0, b1, b2, b3 = _addresses4(XB, t)
    d0, d1, d2, d3 = _addresses4(XD, t)
    return q4k_row_dot4(np.int64(w.ctypes.data), XQ.shape[1] // 256, x0, x1, x2, x3, b0, b1, b2, b3, d0, d1, d2, d3)


@nb.njit(**_JIT)
def q8dot4_q6_k_simd(w, XQ, XD, XB, t):
    """As q8dot4_q4_k_simd, for Q6_K."""
    x0, x1, x2, x3 = _addresses4(XQ, t)
    b0, b1, b2, b3 = _addresses4(XB, t)
    d0, d1, d2, d3 = _addresses4(XD, t)
    return q6k_row_dot4(np.int64(w.ctypes.data), XQ.shape[1] // 256, x0, x1, x2, x3, b0, b1, b2, b3, d0, d1, d2, d3)


@nb.njit(**_JIT)
def q8dot4_q5_k_simd(w, XQ, XD, XB, t):
    """As q8dot4_q4_k_simd, for Q5_K."""
    x0, x1, x2, x3 = _addresses4(XQ, t)
    b0, b1, b2, b3 = _addresses4(XB, t)
    d0, d1, d2, d3 = _addresses4(XD, t)
    return q5k_row_dot4(np.int64(w.ctypes.data), XQ.shape[1] // 256, x0, x1, x2, x3, b0, b1, b2, b3, d0, d1, d2, d3)


@nb.njit(**_JIT)
def q8dot4_q8_0_simd(w, XQ, XD, XB, t):
    """As q8dot4_q4_k_simd, for Q8_0."""
    x0, x1, x2, x3 = _addresses4(XQ, t)
    b0, b1, b2, b3 = _addresses4(XB, t)
    d0, d1, d2, d3 = _addresses4(XD, t)
    return q8_0_row_dot4(np.int64(w.ctypes.data), XQ.shape[1] // 256, x0, x1, x2, x3, b0, b1, b2, b3, d0, d1, d2, d3)


# the portable row dot of each format (hosts without AVX2; tests compare the AVX2 ones to them)
PORTABLE = {Q4_K: q8dot_q4_k, Q6_K: q8dot_q6_k, Q5_K: q8dot_q5_k, Q8_0: q8dot_q8_0, Q2_K: q8dot_q2_k,
            Q3_K: q8dot_q3_k, IQ4_XS: q8dot_iq4_xs, **blocks32.PORTABLE, **iq_low.PORTABLE, **ternary.PORTABLE}
_SIMD = {Q4_K: q8dot_q4_k_simd, Q6_K: q8dot_q6_k_simd, Q5_K: q8dot_q5_k_simd, Q8_0: q8dot_q8_0_simd,
         Q2_K: q8dot_q2_k_simd, Q3_K: q8dot_q3_k_simd, IQ4_XS: q8dot_iq4_xs_simd, **blocks32.SIMD,
         **iq_avx2.SIMD, **ternary.SIMD}
_DOTS = _SIMD if avx2.AVAILABLE else PORTABLE

# q8dot(formats, qtype, w, xq, xd, xb): row w of format qtype times the activations, compiled for
# the format set `formats` (see dispatch): the AVX2 versions where the host has AVX2.
q8dot = switch(_DOTS, arity=4)

_DOTS4 = {Q4_K: q8dot4_q4_k_simd, Q6_K: q8dot4_q6_k_simd, Q5_K: q8dot4_q5_k_simd, Q8_0: q8dot4_q8_0_simd,
          Q2_K: q8dot4_q2_k_simd, Q3_K: q8dot4_q3_k_simd, IQ4_XS: q8dot4_iq4_xs_simd, **blocks32.SIMD4,
          **iq_avx2.SIMD4, **ternary.SIMD4}
GEMM4_FORMATS = tuple(_DOTS4) if avx2.AVAILABLE else ()  # formats with a 4-token row step

# q8dot4(formats, qtype, w, XQ, XD, XB, t): row w times tokens t .. t+3, for GEMM4_FORMATS.
q8dot4 = switch(_DOTS4, arity=5)

_DOTS8 = dict(iq_avx2.SIMD8) if avx2.AVAILABLE else {}
GEMM8_FORMATS = tuple(_DOTS8)  # formats with an 8-token row step too (the code-book formats, AVX2 hosts)
GEMM8_SET = format_set(GEMM8_FORMATS)

# q8dot8(formats, qtype, w, XQ, XD, XB, t, last): row w times tokens t .. t+7 (those past `last`
# read as token `last`), for GEMM8_FORMATS; only in kernels whose format set holds one of them.
q8dot8 = switch(_DOTS8, arity=6) if _DOTS8 else None
