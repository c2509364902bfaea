"""Q2_K and Q3_K rows times int8 activations: the portable loops and their AVX2 versions.

Shape legend (as row_dot's)
    C    columns, a multiple of 256        nsb = C / 256 super-blocks
    xq   int8 [C]   xd float32 [C / 256]   xb int32 [C / 16]   (row_dot.quantize_row)
    w    uint8 [nsb * 84] (Q2_K) or [nsb * 110] (Q3_K): one GGUF row

Both formats have 16 sub-blocks of 16 weights, whose scales are small enough to fold into
16-bit products, and 2-bit codes (Q3_K: plus a high bit) that are unsigned bytes for
``vpmaddubsw``. Per super-block:

    Q2_K   w = d sc_j q - dmin m_j        sum = xd (d I - dmin M),  I = sum sc_j q x, M = sum m_j xb_j
    Q3_K   w = d (sc_j - 32) (c - 4)      sum = (d xd) I,          I = sum (sc_j - 32) c x - 4 sum (sc_j - 32) xb_j
           (c = low | high << 2, 0..7: the stored code plus 4, so that it is unsigned)

I and M are exact integers; the float steps are the same in the portable loops and in the
AVX2 ones (each rounded once, pinned against fast-math: llvm_ir.PINNED), so both give the
same bits and a row's product does not depend on which kernel or how many tokens computed it.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir

from ..bits import f16_at
from ..jit import FIXED_ORDER
from .avx2 import (F32, INT8, INT16, INT32, V8I32, V16I32, V32I8, half_at, reduce_add, reduce_pair,
                   row_dot_functions, row_dot_intrinsics, runs_dot, splat8)
from .llvm_ir import fadd, fmul, fsub, load, shuffle

_CALLED = dict(fastmath=FIXED_ORDER, cache=True)  # as row_dot's portable loops (see there)
I16 = np.int16
I32 = np.int32
F0 = np.float32(0.0)


@nb.njit(**_CALLED)
def q8dot_q2_k(w, xq, xd, xb):
    acc = F0
    for s in range(xq.shape[0] // 256):
        o = 84 * s
        isum = I32(0)
        for r in range(8):  # runs of 32 weights: 32 codes of qs[32 (r // 4):], shifted by 2 (r % 4)
            sa = I16(w[o + 2 * r] & 15)
            sb = I16(w[o + 2 * r + 1] & 15)
            qo = o + 16 + 32 * (r // 4)
            sh = 2 * (r % 4)
            xo = 256 * s + 32 * r
            t = I32(0)
            for l in range(32):
                q = I16((w[qo + l] >> sh) & 3)
                t = I32(t + I32(I16((sa if l < 16 else sb) * q)) * I32(xq[xo + l]))
            isum = I32(isum + t)
        msum = I32(0)
        for j in range(16):
            msum = I32(msum + I32(w[o + j] >> 4) * xb[16 * s + j])
        acc += xd[s] * (f16_at(w, o + 80) * np.float32(isum) - f16_at(w, o + 82) * np.float32(msum))
    return acc


@nb.njit(inline="always", cache=True)
def q3k_scale(w, o, j):
    """Sub-block j's scale minus 32 (-32 .. 31) of the Q3_K super-block at byte o of w."""
    lo = I32(w[o + 96 + j % 8]) >> I32(4 * (j // 8)) & I32(15)
    hi = I32(w[o + 104 + j % 4]) >> I32(2 * (j // 4)) & I32(3)
    return I32(lo | (hi << I32(4))) - I32(32)


@nb.njit(**_CALLED)
def q8dot_q3_k(w, xq, xd, xb):
    acc = F0
    for s in range(xq.shape[0] // 256):
        o = 110 * s
        isum = I32(0)
        for r in range(8):
            sa = I16(q3k_scale(w, o, 2 * r))
            sb = I16(q3k_scale(w, o, 2 * r + 1))
            qo = o + 32 + 32 * (r // 4)
            sh = 2 * (r % 4)
            xo = 256 * s + 32 * r
            t = I32(0)
            for l in range(32):
                c = I16(((w[qo + l] >> sh) & 3) | (((w[o + l] >> r) & 1) << 2))
                t = I32(t + I32(I16((sa if l < 16 else sb) * c)) * I32(xq[xo + l]))
            isum = I32(isum + t)
        off = I32(0)
        for j in range(16):
            off = I32(off + q3k_scale(w, o, j) * xb[16 * s + j])
        acc += (f16_at(w, o + 108) * xd[s]) * np.float32(I32(isum - I32(4) * off))
    return acc


# ---------------------------------------------------------------- AVX2 (see avx2)

def _pairs16(builder, scales16):
    """Per run r of 32 weights, <16 x i16>: lanes 0-7 the scale of its first 16 weights, 8-15 of
    the next 16 (vpmaddubsw's 16 pair sums of a run)."""
    return [shuffle(builder, scales16, [2 * r] * 8 + [2 * r + 1] * 8) for r in range(8)]


def _fold16(builder, v):
    """<16 x i32> -> <8 x i32>: lane k + lane k + 8 (the lane sums are what count)."""
    return builder.add(shuffle(builder, v, range(8)), shuffle(builder, v, range(8, 16)))


def _q2k_block(builder, wa):
    sc8 = load(builder, wa, 0, ir.VectorType(INT8, 16))
    scales16 = builder.zext(builder.and_(sc8, ir.Constant(sc8.type, [15] * 16)), ir.VectorType(INT16, 16))
    mins = builder.zext(builder.lshr(sc8, ir.Constant(sc8.type, [4] * 16)), V16I32)
    codes = []
    for h in range(2):
        qv = load(builder, wa, 16 + 32 * h, V32I8)
        codes += [builder.and_(builder.lshr(qv, splat8(2 * g)) if g else qv, splat8(3)) for g in range(4)]
    return codes, _pairs16(builder, scales16), mins, half_at(builder, wa, 80), half_at(builder, wa, 82)


def _q2k_term(builder, block, xa, xba, xd, acc):
    """acc + xd * (d * I - dmin * M), as q8dot_q2_k."""
    codes, splats, mins, d, dmin = block
    m8 = _fold16(builder, builder.mul(mins, load(builder, xba, 0, V16I32)))
    msum, isum = reduce_pair(builder, m8, runs_dot(builder, codes, splats, xa))
    both = fsub(builder, fmul(builder, d, builder.sitofp(isum, F32)), fmul(builder, dmin, builder.sitofp(msum, F32)))
    return fadd(builder, acc, fmul(builder, xd, both))


def _q3k_block(builder, wa):
    """Codes 0..7 per run, scale pairs, the 16 scales minus 32 as <16 x i32>, and d. The 12-byte
    scales field is decoded on 32-bit words (llama.cpp's masks)."""
    u0, u1, u2 = (load(builder, wa, 96 + 4 * i, INT32) for i in range(3))
    k1, k2 = ir.Constant(INT32, 0x03030303), ir.Constant(INT32, 0x0F0F0F0F)

    def c(v):
        return ir.Constant(INT32, v)

    def word(lo, hi_shift):
        return builder.or_(builder.and_(lo, k2), builder.shl(builder.and_(builder.lshr(u2, c(hi_shift)), k1), c(4)))

    words = [word(u0, 0), word(u1, 2), word(builder.lshr(u0, c(4)), 4), word(builder.lshr(u1, c(4)), 6)]
    vec = ir.Constant(ir.VectorType(INT32, 4), ir.Undefined)
    for i, wv in enumerate(words):
        vec = builder.insert_element(vec, wv, c(i))
    sc8 = builder.sub(builder.bitcast(vec, ir.VectorType(INT8, 16)), ir.Constant(ir.VectorType(INT8, 16), [32] * 16))
    hm = load(builder, wa, 0, V32I8)
    codes = []
    for r in range(8):
        qv = load(builder, wa, 32 + 32 * (r // 4), V32I8)
        g = r % 4
        low = builder.and_(builder.lshr(qv, splat8(2 * g)) if g else qv, splat8(3))
        high = builder.shl(hm, splat8(2 - r)) if r <= 2 else builder.lshr(hm, splat8(r - 2))
        codes.append(builder.or_(low, builder.and_(high, splat8(4))))
    scales16 = builder.sext(sc8, ir.VectorType(INT16, 16))
    return codes, _pairs16(builder, scales16), builder.sext(sc8, V16I32), half_at(builder, wa, 108)


def _q3k_term(builder, block, xa, xba, xd, acc):
    """acc + (d * xd) * I, as q8dot_q3_k."""
    codes, splats, sc32, d = block
    off8 = _fold16(builder, builder.mul(sc32, load(builder, xba, 0, V16I32)))
    four_off = builder.shl(off8, ir.Constant(V8I32, [2] * 8))
    isum = reduce_add(builder, builder.sub(runs_dot(builder, codes, splats, xa), four_off))
    return fadd(builder, acc, fmul(builder, fmul(builder, d, xd), builder.sitofp(isum, F32)))


q2k_row_dot, q2k_row_dot4 = row_dot_intrinsics("q2_k", 84, _q2k_block, _q2k_term)
q3k_row_dot, q3k_row_dot4 = row_dot_intrinsics("q3_k", 110, _q3k_block, _q3k_term)
q8dot_q2_k_simd, q8dot4_q2_k_simd = row_dot_functions(q2k_row_dot, q2k_row_dot4)
q8dot_q3_k_simd, q8dot4_q3_k_simd = row_dot_functions(q3k_row_dot, q3k_row_dot4)
