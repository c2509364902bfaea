"""IQ4_XS rows times int8 activations: the portable loop and its AVX2 version.

Shape legend (as row_dot's)
    C    columns, a multiple of 256        xq int8 [C]   xd float32 [C / 256]   xb int32 [C / 16]
    w    uint8 [C / 256 * 136]: one GGUF row (quant.formats: f16 d | u16 scales_h |
         u8 scales_l[4] | u8 qs[128], 8 sub-blocks of 32 with 6-bit scales ls_j)

Per super-block, w = d (ls_j - 32) v[c] with v = formats.IQ4_NL_VALUES, so
    sum = (d xd) I,   I = sum_j (ls_j - 32) sum_l v[c_l] x_l   (an exact integer)
rounded as (d * xd) * I in both versions, which therefore give the same bits. AVX2: the
nibbles index the 16 values with ``vpshufb``; the values' signs move onto the activations
(avx2.block_dots' trick) for ``vpmaddubsw``, and ``vpmaddwd`` applies the sub-block scales.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir

from ..bits import f16_at
from ..formats import IQ4_NL_VALUES
from ..jit import FIXED_ORDER
from .avx2 import (F32, INT8, INT16, INT32, V16I16, V32I8, half_at, maddubs, maddwd, reduce_add,
                   row_dot_functions, row_dot_intrinsics)
from .llvm_ir import declare, fadd, fmul, load, shuffle

I32 = np.int32
F0 = np.float32(0.0)
_IQ4 = np.array(IQ4_NL_VALUES, np.int32)


@nb.njit(inline="always", cache=True)
def iq4xs_scale(w, o, j):
    """Sub-block j's scale minus 32 (-32 .. 31) of the IQ4_XS super-block at byte o of w."""
    lo = (I32(w[o + 4 + j // 2]) >> I32(4 * (j % 2))) & I32(15)
    hi = ((I32(w[o + 2]) | (I32(w[o + 3]) << I32(8))) >> I32(2 * j)) & I32(3)
    return I32(lo | (hi << I32(4))) - I32(32)


@nb.njit(fastmath=FIXED_ORDER, cache=True)
def q8dot_iq4_xs(w, xq, xd, xb):
    acc = F0
    for s in range(xq.shape[0] // 256):
        o = 136 * s
        isum = I32(0)
        for j in range(8):
            t = I32(0)
            for l in range(32):
                c = (I32(w[o + 8 + 16 * j + l % 16]) >> I32(4 * (l // 16))) & I32(15)
                t = I32(t + _IQ4[c] * I32(xq[256 * s + 32 * j + l]))
            isum = I32(isum + iq4xs_scale(w, o, j) * t)
        acc += (f16_at(w, o) * xd[s]) * np.float32(isum)
    return acc


def _block(builder, wa):
    """Per sub-block: |v| and v (<32 x i8>) and the scale minus 32 splatted (<16 x i16>); d."""
    table = ir.Constant(V32I8, [v & 255 for v in IQ4_NL_VALUES] * 2)
    pshufb = declare(builder, "llvm.x86.avx2.pshuf.b", V32I8, [V32I8, V32I8])
    absb = declare(builder, "llvm.abs.v32i8", V32I8, [V32I8, ir.IntType(1)])
    sh = builder.zext(load(builder, wa, 2, INT16), INT32)
    sl = load(builder, wa, 4, INT32)

    def c(v):
        return ir.Constant(INT32, v)

    mags, vals, splats = [], [], []
    for j in range(8):
        qs = load(builder, wa, 8 + 16 * j, ir.VectorType(INT8, 16))
        lo = builder.and_(qs, ir.Constant(qs.type, [15] * 16))
        hi = builder.lshr(qs, ir.Constant(qs.type, [4] * 16))
        v = builder.call(pshufb, [table, builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(INT32, 32),
                                                                                       list(range(32))))])
        vals.append(v)
        mags.append(builder.call(absb, [v, ir.Constant(ir.IntType(1), 0)]))
        low = builder.and_(builder.lshr(sl, c(4 * j)), c(15))
        high = builder.and_(builder.lshr(sh, c(2 * j)), c(3))
        ls = builder.trunc(builder.sub(builder.or_(low, builder.shl(high, c(4))), c(32)), INT16)
        splats.append(shuffle(builder, builder.insert_element(ir.Constant(V16I16, ir.Undefined), ls, c(0)), [0] * 16))
    return mags, vals, splats, half_at(builder, wa, 0)


def _term(builder, block, xa, xba, xd, acc):
    """acc + (d * xd) * I, as q8dot_iq4_xs."""
    mags, vals, splats, d = block
    sign = declare(builder, "llvm.x86.avx2.psign.b", V32I8, [V32I8, V32I8])
    parts = [maddwd(builder, maddubs(builder, m, builder.call(sign, [load(builder, xa, 32 * j, V32I8), v])), sp)
             for j, (m, v, sp) in enumerate(zip(mags, vals, splats))]
    while len(parts) > 1:
        parts = [builder.add(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
    return fadd(builder, acc, fmul(builder, fmul(builder, d, xd), builder.sitofp(reduce_add(builder, parts[0]), F32)))


iq4xs_row_dot, iq4xs_row_dot4 = row_dot_intrinsics("iq4_xs", 136, _block, _term)
q8dot_iq4_xs_simd, q8dot4_iq4_xs_simd = row_dot_functions(iq4xs_row_dot, iq4xs_row_dot4)
