"""Rows of the 32-weight block formats (Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL) times int8 activations.

llama.cpp writes these for matrices whose rows are not a multiple of 256 and in its Q4_K_M,
Q5_K_M and IQ4 presets. The kernels take rows of a multiple of 256 columns (the activations'
blocks), as eight of these blocks at a time.

Shape legend (as row_dot's)
    C    columns, a multiple of 256        xq int8 [C]   xd float32 [C / 256]   xb int32 [C / 16]
    w    uint8 [C / 32 * block bytes]: one GGUF row

Per block k of 32 weights, with T_k = sum c x over its codes c, X_k = sum x (from xb):
    Q4_0   w = d (c - 8)             p_k = d_k (T_k - 8 X_k)
    Q5_0   w = d (c - 16)            p_k = d_k (T_k - 16 X_k)       c = nibble | qh bit << 4
    Q4_1   w = d c + m               p_k = d_k T_k + m_k X_k
    Q5_1   w = d c + m               p_k = d_k T_k + m_k X_k
    IQ4_NL w = d v[c]                p_k = d_k sum v[c] x           v: formats.IQ4_NL_VALUES
and a row's sum is acc + xd (p_0 + p_1 + ... + p_7) per 256 columns, left to right (as
row_dot.q8dot_q8_0). The integers are exact; every float step is rounded once, in the same
order in the portable loops and the AVX2 ones (pinned against fast-math, llvm_ir.PINNED), so
they give the same bits.

AVX2: nibbles (plus Q5's fifth bit) are unsigned bytes for ``vpmaddubsw``; IQ4_NL's codes go
through ``vpshufb`` on the 16 values, then as Q8_0's signed weights (avx2.block_dots). Where the
host has AVX-512 VNNI, one ``vpdpbusd`` per block replaces those steps: IQ4_NL's values go in
as value + 128 (unsigned), the 128 X_k coming off with the offsets. The integers are the same,
so are the bits (about 12% faster decode of IQ4_NL rows, measured).
"""

from __future__ import annotations

from typing import NamedTuple

import numba as nb
import numpy as np
from gguf import GGMLQuantizationType as T
from llvmlite import ir

from ..bits import f16_at
from ..formats import IQ4_NL_VALUES
from ..jit import FIXED_ORDER
from .avx2 import (F32, INT8, INT32, ONES16, V8I32, V16I32, V32I8, VNNI, block_dots, dpbusd, half_lanes8, lane_sums8, maddubs,
                   maddwd, ordered_sum, row_dot_functions, row_dot_intrinsics, splat8)
from .llvm_ir import declare, fadd, fmul, load, shuffle

F0 = np.float32(0.0)
I32 = np.int32
_IQ4 = np.array(IQ4_NL_VALUES, np.int32)


class Layout(NamedTuple):
    """Where a block's fields are (byte offsets; -1: none) and how its codes read."""
    nbytes: int
    m: int        # f16 m (the _1 formats)
    qh: int       # u32 fifth bits (Q5)
    qs: int       # u8 nibbles [16]: weight l < 16 the low nibble of qs[l], l >= 16 the high of qs[l - 16]
    offset: int   # code offset taken off through X_k
    lookup: bool  # codes index IQ4_NL_VALUES


LAYOUTS = {
    int(T.Q4_0): Layout(18, -1, -1, 2, 8, False),
    int(T.Q4_1): Layout(20, 2, -1, 4, 0, False),
    int(T.Q5_0): Layout(22, -1, 2, 6, 16, False),
    int(T.Q5_1): Layout(24, 2, 4, 8, 0, False),
    int(T.IQ4_NL): Layout(18, -1, -1, 2, 0, True),
}


def _portable(lay: Layout):
    """The row dot of one layout as a plain loop (hosts without AVX2); its float steps are the
    AVX2 version's."""
    nbytes, m_off, qh_off, qs_off, offset, lookup = lay

    @nb.njit(fastmath=FIXED_ORDER, cache=True)
    def dot(w, xq, xd, xb):
        acc = F0
        for s in range(xq.shape[0] // 256):
            sb = F0
            for k in range(8):
                o = nbytes * (8 * s + k)
                xo = 256 * s + 32 * k
                qh = I32(0)
                if qh_off >= 0:
                    qh = I32(w[o + qh_off]) | (I32(w[o + qh_off + 1]) << 8) | (I32(w[o + qh_off + 2]) << 16) \
                        | (I32(w[o + qh_off + 3]) << 24)
                t = I32(0)
                for l in range(32):
                    c = (I32(w[o + qs_off + l % 16]) >> I32(4 * (l // 16))) & I32(15)
                    if qh_off >= 0:
                        c = c | (((qh >> I32(l)) & I32(1)) << I32(4))
                    if lookup:
                        c = _IQ4[c]
                    t = I32(t + c * I32(xq[xo + l]))
                x = I32(xb[16 * s + 2 * k] + xb[16 * s + 2 * k + 1])
                p = f16_at(w, o) * np.float32(I32(t - I32(offset) * x))
                if m_off >= 0:
                    p = p + f16_at(w, o + m_off) * np.float32(x)
                sb += p
            acc += xd[s] * sb
        return acc

    return dot


# ---------------------------------------------------------------- AVX2 (see avx2)

_BITS = ir.Constant(V32I8, [1 << (i % 8) for i in range(32)])


def _fifth_bits(builder, wa, off):
    """<32 x i8>: 16 where bit l of the u32 at wa + off is set, else 0 (lane l)."""
    qh = builder.bitcast(load(builder, wa, off, INT32), ir.VectorType(INT8, 4))
    spread = shuffle(builder, qh, [i // 8 for i in range(32)])
    hit = builder.icmp_unsigned("!=", builder.and_(spread, _BITS), ir.Constant(V32I8, None))
    return builder.select(hit, splat8(16), ir.Constant(V32I8, None))


def _scales18(builder, wa):
    """<8 x float>: the f16 scales at the start of eight 18-byte blocks (Q4_0, IQ4_NL), words 0,
    9, .. 63 of the 128 bytes at wa, by two 64-byte loads and one word permute (AVX-512 BW
    hosts) instead of eight word inserts."""
    v32 = ir.VectorType(ir.IntType(16), 32)
    lo, hi = load(builder, wa, 0, v32), load(builder, wa, 64, v32)
    words = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(INT32, 8), [9 * k for k in range(8)]))
    return builder.fpext(builder.bitcast(words, ir.VectorType(ir.HalfType(), 8)), ir.VectorType(F32, 8))


def _block_decoder(lay: Layout):
    def decode(builder, wa):
        """The 8 blocks of 256 columns: codes (<32 x i8> each; IQ4_NL: values and magnitudes),
        d and m (<8 x float>)."""
        codes = []
        for k in range(8):
            o = lay.nbytes * k
            qs = load(builder, wa, o + lay.qs, ir.VectorType(INT8, 16))
            lo = builder.and_(qs, ir.Constant(qs.type, [15] * 16))
            hi = builder.lshr(qs, ir.Constant(qs.type, [4] * 16))
            c = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(INT32, 32), list(range(32))))
            if lay.qh >= 0:
                c = builder.or_(c, _fifth_bits(builder, wa, o + lay.qh))
            codes.append(c)
        if lay.lookup:
            pshufb = declare(builder, "llvm.x86.avx2.pshuf.b", V32I8, [V32I8, V32I8])
            if VNNI:  # values + 128, unsigned: vpdpbusd's sums are exact, the 128 comes off through X_k
                table = ir.Constant(V32I8, [(v + 128) & 255 for v in IQ4_NL_VALUES] * 2)
                codes = [builder.call(pshufb, [table, c]) for c in codes]
            else:
                table = ir.Constant(V32I8, [v & 255 for v in IQ4_NL_VALUES] * 2)
                values = [builder.call(pshufb, [table, c]) for c in codes]
                absb = declare(builder, "llvm.abs.v32i8", V32I8, [V32I8, ir.IntType(1)])
                codes = ([builder.call(absb, [v, ir.Constant(ir.IntType(1), 0)]) for v in values], values)
        d = _scales18(builder, wa) if VNNI and lay.nbytes == 18 else half_lanes8(builder, wa, [lay.nbytes * k for k in range(8)])
        m = half_lanes8(builder, wa, [lay.nbytes * k + lay.m for k in range(8)]) if lay.m >= 0 else None
        return codes, d, m
    return decode


def _term(lay: Layout):
    def term(builder, block, xa, xba, xd, acc):
        """acc + xd * (p_0 + ... + p_7), as the portable loop."""
        codes, d, m = block
        offset = lay.offset
        if VNNI:
            t = lane_sums8(builder, [dpbusd(builder, c, load(builder, xa, 32 * k, V32I8)) for k, c in enumerate(codes)])
            offset += 128 if lay.lookup else 0
        elif lay.lookup:
            t = block_dots(builder, *codes, xa)
        else:
            t = lane_sums8(builder, [maddwd(builder, maddubs(builder, c, load(builder, xa, 32 * k, V32I8)), ONES16)
                                      for k, c in enumerate(codes)])
        fv = ir.VectorType(F32, 8)
        if offset or m is not None:
            xb = load(builder, xba, 0, V16I32)
            x = builder.add(shuffle(builder, xb, range(0, 16, 2)), shuffle(builder, xb, range(1, 16, 2)))
            if offset:
                t = builder.sub(t, builder.shl(x, ir.Constant(V8I32, [offset.bit_length() - 1] * 8))
                                if offset & (offset - 1) == 0 else builder.mul(x, ir.Constant(V8I32, [offset] * 8)))
        p = fmul(builder, d, builder.sitofp(t, fv))
        if m is not None:
            p = fadd(builder, p, fmul(builder, m, builder.sitofp(x, fv)))
        return fadd(builder, acc, fmul(builder, xd, ordered_sum(builder, p)))
    return term


PORTABLE = {code: _portable(lay) for code, lay in LAYOUTS.items()}
SIMD, SIMD4 = {}, {}
for _code, _lay in LAYOUTS.items():
    SIMD[_code], SIMD4[_code] = row_dot_functions(*row_dot_intrinsics(T(_code).name.lower(), 8 * _lay.nbytes,
                                                                      _block_decoder(_lay), _term(_lay)))
