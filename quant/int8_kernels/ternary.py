"""TQ1_0 and TQ2_0 rows (ternary weights) times int8 activations: portable loops and AVX2 ones.

Shape legend (as row_dot's)
    C    columns, a multiple of 256        nsb = C / 256 super-blocks
    xq   int8 [C]   xd float32 [C / 256]   xb int32 [C / 16]   (row_dot.quantize_row)
    w    uint8 [nsb * 54] (TQ1_0) or [nsb * 66] (TQ2_0): one GGUF row

Both store w = d (t - 1) with t in {0, 1, 2} and one f16 d per super-block:

    TQ2_0  qs [64] | f16 d         t of weight 128 c + 32 p + m = (qs[32 c + m] >> 2 p) & 3
    TQ1_0  qs [48] | qh [4] | f16 d   five trits per byte, read as t = ((b 3^p mod 256) * 3) >> 8:
           weights 32 p + m from qs[m] (p < 5), 160 + 16 p + m from qs[32 + m] (p < 5),
           240 + 4 p + m from qh[m] (p < 4)

so per super-block sum_c w x = (d xd) I with I = sum t xq - sum xq, the second sum from xb
(an exact integer, |I| < 2^16). Each row dot adds (d * xd) * I per super-block to its float32
sum, left to right (FIXED_ORDER), as llama.cpp's ggml_vec_dot_tq*_q8_K do. AVX2: the trits are
unsigned bytes for ``vpmaddubsw`` (TQ1_0's decoded in 16-bit lanes); the same integer and
float steps (pinned against fast-math, llvm_ir.PINNED), so the same bits.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from gguf import GGMLQuantizationType as T

from llvmlite import ir

from ..bits import f16_at
from ..jit import FIXED_ORDER
from .avx2 import (F32, INT8, INT16, INT32, ONES16, V16I32, V32I8, half_at, reduce_add, row_dot_functions,
                   row_dot_intrinsics, runs_dot, splat8)
from .llvm_ir import fadd, fmul, load

_CALLED = dict(fastmath=FIXED_ORDER, cache=True)  # as row_dot's portable loops (see there)
I16 = np.int16
I32 = np.int32
F0 = np.float32(0.0)


@nb.njit(inline="always", cache=True)
def _block_sum(xb, s):
    x = I32(0)
    for j in range(16):
        x = I32(x + xb[16 * s + j])
    return x


@nb.njit(inline="always", cache=True)
def _trit(b, pw):
    """Trit p of byte b (pw = 3^p): ((b pw mod 256) * 3) >> 8, as int16."""
    return I16(((b * pw) & I32(255)) * I32(3) >> I32(8))


@nb.njit(inline="always", cache=True)
def _five_trits(w, qo, n, xq, xo):
    """sum over m < n of the five trits of byte w[qo + m] times xq[xo + p n + m] (p < 5). The
    byte is read once for its five weights: LLVM vectorizes the loop over m (a loop per trit
    would run scalar)."""
    t = I32(0)
    for m in range(n):
        b = I32(w[qo + m])
        t = I32(t + I32(_trit(b, I32(1))) * I32(xq[xo + m]) + I32(_trit(b, I32(3))) * I32(xq[xo + n + m])
                + I32(_trit(b, I32(9))) * I32(xq[xo + 2 * n + m]) + I32(_trit(b, I32(27))) * I32(xq[xo + 3 * n + m])
                + I32(_trit(b, I32(81))) * I32(xq[xo + 4 * n + m]))
    return t


@nb.njit(**_CALLED)
def q8dot_tq1_0(w, xq, xd, xb):
    acc = F0
    for s in range(xq.shape[0] // 256):
        o = 54 * s
        xo = 256 * s
        t = I32(_five_trits(w, o, 32, xq, xo) + _five_trits(w, o + 32, 16, xq, xo + 160))
        for m in range(4):  # qh: four trits a byte, weights 240 + 4 p + m
            b = I32(w[o + 48 + m])
            t = I32(t + I32(_trit(b, I32(1))) * I32(xq[xo + 240 + m]) + I32(_trit(b, I32(3))) * I32(xq[xo + 244 + m])
                    + I32(_trit(b, I32(9))) * I32(xq[xo + 248 + m]) + I32(_trit(b, I32(27))) * I32(xq[xo + 252 + m]))
        acc += (f16_at(w, o + 52) * xd[s]) * np.float32(I32(t - _block_sum(xb, s)))
    return acc


@nb.njit(**_CALLED)
def q8dot_tq2_0(w, xq, xd, xb):
    acc = F0
    for s in range(xq.shape[0] // 256):
        o = 66 * s
        t = I32(0)
        for c in range(2):  # a byte holds weights 128 c + 32 p + m, p < 4: read once for the four
            qo = o + 32 * c
            xo = 256 * s + 128 * c
            for m in range(32):
                b = I32(w[qo + m])
                t = I32(t + I32(I16(b & I32(3))) * I32(xq[xo + m])
                        + I32(I16((b >> I32(2)) & I32(3))) * I32(xq[xo + 32 + m])
                        + I32(I16((b >> I32(4)) & I32(3))) * I32(xq[xo + 64 + m])
                        + I32(I16(b >> I32(6))) * I32(xq[xo + 96 + m]))
        acc += (f16_at(w, o + 64) * xd[s]) * np.float32(I32(t - _block_sum(xb, s)))
    return acc


# ---------------------------------------------------------------- AVX2 (see avx2)

def _v(values, width=8):
    return ir.Constant(ir.VectorType(ir.IntType(width), len(values)), list(values))


def _tq2_block(builder, wa):
    """The 8 runs of 32 codes t (<32 x u8>, run 4 c + p: weights 128 c + 32 p ..) and d."""
    codes = []
    for c in range(2):
        qv = load(builder, wa, 32 * c, V32I8)
        codes += [builder.and_(builder.lshr(qv, splat8(2 * p)) if p else qv, splat8(3)) for p in range(4)]
    return codes, half_at(builder, wa, 64)


def _trits(builder, bytes32, powers):
    """<32 x u8>: lane i the trit ((b_i 3^p_i mod 256) * 3) >> 8 of byte b_i at power p_i (in 16 bits)."""
    v16 = ir.VectorType(INT16, 32)
    b = builder.zext(bytes32, v16)
    t = builder.and_(builder.mul(b, _v([3 ** p for p in powers], 16)), _v([255] * 32, 16))
    return builder.trunc(builder.lshr(builder.mul(t, _v([3] * 32, 16)), _v([8] * 32, 16)), V32I8)


def _tq1_block(builder, wa):
    """The 8 runs of 32 trits (run r: weights 32 r ..), as the layout of the docstring, and d."""
    qs0 = load(builder, wa, 0, V32I8)
    qs1 = load(builder, wa, 32, ir.VectorType(INT8, 16))
    qh = load(builder, wa, 48, ir.VectorType(INT8, 4))
    codes = [_trits(builder, qs0, [p] * 32) for p in range(5)]
    pair = builder.shuffle_vector(qs1, qs1, ir.Constant(ir.VectorType(INT32, 32), [i % 16 for i in range(32)]))
    codes += [_trits(builder, pair, [0] * 16 + [1] * 16), _trits(builder, pair, [2] * 16 + [3] * 16)]
    qh16 = builder.shuffle_vector(qh, qh, ir.Constant(ir.VectorType(INT32, 16), [m for _ in range(4)
                                                                                  for m in range(4)]))
    last = builder.shuffle_vector(qs1, qh16, ir.Constant(ir.VectorType(INT32, 32), list(range(32))))
    codes.append(_trits(builder, last, [4] * 16 + [p for p in range(4) for _ in range(4)]))
    return codes, half_at(builder, wa, 52)


def _term(builder, block, xa, xba, xd, acc):
    """acc + (d * xd) * (T - X), T = sum t x, X = sum x: as the portable loops."""
    codes, d = block
    t = reduce_add(builder, runs_dot(builder, codes, [ONES16] * 8, xa))
    x = reduce_add(builder, load(builder, xba, 0, V16I32))
    return fadd(builder, acc, fmul(builder, fmul(builder, d, xd), builder.sitofp(builder.sub(t, x), F32)))


PORTABLE = {int(T.TQ1_0): q8dot_tq1_0, int(T.TQ2_0): q8dot_tq2_0}
SIMD, SIMD4 = {}, {}
for _qt, _bytes, _decode in ((T.TQ1_0, 54, _tq1_block), (T.TQ2_0, 66, _tq2_block)):
    SIMD[int(_qt)], SIMD4[int(_qt)] = row_dot_functions(*row_dot_intrinsics(_qt.name.lower(), _bytes, _decode, _term))
