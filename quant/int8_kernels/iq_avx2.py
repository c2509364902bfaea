"""AVX2 row dots of the IQ1, IQ2 and IQ3 formats, one and four tokens, with iq_low's portable
loops' arithmetic and roundings.

Shape legend (as row_dot's)
    C    columns, a multiple of 256        xq int8 [C]   xd float32 [C / 256]   xb int32 [C / 16]
    w    uint8 [C / 256 * B]: one GGUF row (B = 66, 74, 82, 98, 110, 50 or 56; layouts in iq_low)

Per sub-block of 32 weights (llama.cpp's AVX2 sequence): the grid rows of its four groups are
gathered from a table into one <32 x u8> of magnitudes (the grid values are positive), the
signs of its four groups (KSIGNS patterns, or IQ2_S/IQ3_S's sign bytes spread to lanes) into
one <32 x i8> of +-1 that ``vpsignb`` moves onto the
activations, ``vpmaddubsw`` multiplies and sums pairs to int16, and ``vpmaddwd`` applies the
sub-block's odd scale 2 s + 1 (per 16 weights for IQ2_XS, IQ2_S, IQ1_M). IQ1's grid values
are -1, 0, 1: its integer weights w = 8 g + delta (|w| <= 9, iq_low's) are built as bytes, and
go as |w| and sign(w), as Q8_0's do (avx2.block_dots). The integer I of a super-block is
iq_low's, and the float step is its ((d * c) * xd) * I, pinned against fast-math
(llvm_ir.PINNED), so both versions give the same bits.

The tables are private constants of the row dot's LLVM module, built from quant.iq_grids:
grid rows as i64 (IQ2; IQ1: 8 g) or i32 (IQ3) words, and KSIGNS as i64 words of 8 bytes +-1.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from llvmlite import ir

from ..iq_grids import GRIDS, KSIGNS
from .avx2 import (F32, INT16, INT32, V8I32, V16I16, V32I8, half_at, maddubs, maddwd, reduce_add,
                   row_dot8_function, row_dot8_intrinsic, row_dot_functions, row_dot_intrinsics)
from .llvm_ir import declare, fadd, fmul, load, shuffle

INT64 = ir.IntType(64)
V4I64 = ir.VectorType(INT64, 4)


def _words(rows: np.ndarray, dtype) -> list[int]:
    """Each row of int8 values as one little-endian unsigned word."""
    return [int(v) for v in np.ascontiguousarray(rows.astype(np.int8)).view(dtype).reshape(-1)]


_IQ2XXS_WORDS = _words(GRIDS[T.IQ2_XXS], np.uint64)  # 256 rows of 8 bytes
_IQ2XS_WORDS = _words(GRIDS[T.IQ2_XS], np.uint64)    # 512
_IQ2S_WORDS = _words(GRIDS[T.IQ2_S], np.uint64)      # 1024
_IQ3XXS_WORDS = _words(GRIDS[T.IQ3_XXS], np.uint32)  # 256 rows of 4 bytes
_IQ3S_WORDS = _words(GRIDS[T.IQ3_S], np.uint32)      # 512
_IQ1_WORDS = _words(8 * GRIDS[T.IQ1_S], np.uint64)  # 2048 rows of 8 g (-8, 0, 8): IQ1_S and IQ1_M
_SIGN_WORDS = _words(np.where((KSIGNS[:, None] >> np.arange(8, dtype=np.uint8)) & 1, -1, 1), np.uint64)
assert all(GRIDS[t].min() > 0 for t in (T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S))  # magnitudes for vpmaddubsw


def _table(builder, name: str, words: list[int], width: ir.IntType):
    """The module's private constant array `name` of these words (defined once per module)."""
    module = builder.module
    if name in module.globals:
        return module.globals[name]
    typ = ir.ArrayType(width, len(words))
    g = ir.GlobalVariable(module, typ, name)
    g.linkage = "private"
    g.global_constant = True
    g.initializer = ir.Constant(typ, [ir.Constant(width, w) for w in words])
    return g


def _row(builder, table, index, width):
    """table[index] (index an i32)."""
    ptr = builder.gep(table, [ir.Constant(INT32, 0), builder.zext(index, INT64)], inbounds=True)
    return builder.load(ptr, align=width.width // 8)


def _vector(builder, words, typ):
    """The words (i64 or i32) as lanes of one vector, bitcast to <32 x i8>."""
    v = ir.Constant(typ, ir.Undefined)
    for k, x in enumerate(words):
        v = builder.insert_element(v, x, ir.Constant(INT32, k))
    return builder.bitcast(v, V32I8)


def _c(v: int):
    return ir.Constant(INT32, v)


def _field(builder, word, shift: int, mask: int):
    return builder.and_(builder.lshr(word, _c(shift)) if shift else word, _c(mask))


def _splat16(builder, a, b=None):
    """<16 x i16>: lanes 0-7 a, 8-15 b (or a): the scales of vpmaddubsw's 16 pair sums of 32 weights."""
    v = ir.Constant(V16I16, ir.Undefined)
    v = builder.insert_element(v, builder.trunc(a, INT16), _c(0))
    v = builder.insert_element(v, builder.trunc(b if b is not None else a, INT16), _c(1))
    return shuffle(builder, v, [0] * 8 + [1] * 8)


def _odd(builder, s):
    """2 s + 1."""
    return builder.add(builder.shl(s, _c(1)), _c(1))


def _signs(builder, aux):
    """<32 x i8> of +-1: the KSIGNS patterns of the four 7-bit indices in aux's low 28 bits."""
    table = _table(builder, "iq_ksigns", _SIGN_WORDS, INT64)
    return _vector(builder, [_row(builder, table, _field(builder, aux, 7 * l, 127), INT64) for l in range(4)], V4I64)


def _iq2xxs_block(builder, wa):
    """Per sub-block: grid magnitudes, signs, scale splat; d * 1/8."""
    table = _table(builder, "iq2xxs_grid", _IQ2XXS_WORDS, INT64)
    mags, signs, scales = [], [], []
    for j in range(8):
        q0 = load(builder, wa, 2 + 8 * j, INT32)
        aux = load(builder, wa, 6 + 8 * j, INT32)
        mags.append(_vector(builder, [_row(builder, table, _field(builder, q0, 8 * l, 255), INT64)
                                      for l in range(4)], V4I64))
        signs.append(_signs(builder, aux))
        scales.append(_splat16(builder, _odd(builder, builder.lshr(aux, _c(28)))))
    return mags, signs, scales, fmul(builder, half_at(builder, wa, 0), ir.Constant(F32, 0.125))


def _iq2xs_block(builder, wa):
    table = _table(builder, "iq2xs_grid", _IQ2XS_WORDS, INT64)
    signs_table = _table(builder, "iq_ksigns", _SIGN_WORDS, INT64)
    mags, signs, scales = [], [], []
    for j in range(8):
        words = [builder.zext(load(builder, wa, 2 + 8 * j + 2 * l, INT16), INT32) for l in range(4)]
        mags.append(_vector(builder, [_row(builder, table, _field(builder, v, 0, 511), INT64) for v in words], V4I64))
        signs.append(_vector(builder, [_row(builder, signs_table, builder.lshr(v, _c(9)), INT64) for v in words],
                             V4I64))
        sc = builder.zext(load(builder, wa, 66 + j, ir.IntType(8)), INT32)
        scales.append(_splat16(builder, _odd(builder, _field(builder, sc, 0, 15)),
                               _odd(builder, _field(builder, sc, 4, 15))))
    return mags, signs, scales, fmul(builder, half_at(builder, wa, 0), ir.Constant(F32, 0.125))


_BITS = ir.Constant(V32I8, [1 << (i % 8) for i in range(32)])


def _byte_signs(builder, wa, offset: int):
    """<32 x i8>: lane 8 l + k is -1 where bit k of the sign byte at wa + offset + l is set, else +1."""
    four = builder.bitcast(load(builder, wa, offset, INT32), ir.VectorType(ir.IntType(8), 4))
    spread = shuffle(builder, four, [i // 8 for i in range(32)])
    hit = builder.icmp_unsigned("!=", builder.and_(spread, _BITS), ir.Constant(V32I8, None))
    return builder.select(hit, ir.Constant(V32I8, [-1] * 32), ir.Constant(V32I8, [1] * 32))


def _iq2s_block(builder, wa):
    table = _table(builder, "iq2s_grid", _IQ2S_WORDS, INT64)
    mags, signs, scales = [], [], []
    for j in range(8):
        qh = builder.zext(load(builder, wa, 66 + j, ir.IntType(8)), INT32)
        rows = []
        for l in range(4):
            low = builder.zext(load(builder, wa, 2 + 4 * j + l, ir.IntType(8)), INT32)
            rows.append(_row(builder, table, builder.or_(low, builder.shl(_field(builder, qh, 2 * l, 3), _c(8))),
                             INT64))
        mags.append(_vector(builder, rows, V4I64))
        signs.append(_byte_signs(builder, wa, 34 + 4 * j))
        sc = builder.zext(load(builder, wa, 74 + j, ir.IntType(8)), INT32)
        scales.append(_splat16(builder, _odd(builder, _field(builder, sc, 0, 15)),
                               _odd(builder, _field(builder, sc, 4, 15))))
    return mags, signs, scales, fmul(builder, half_at(builder, wa, 0), ir.Constant(F32, 0.125))


def _iq3s_block(builder, wa):
    """As IQ3_XXS's, with 9-bit grid rows, sign bytes and a scale nibble per sub-block; c = 1
    (d alone, as q8dot_iq3_s)."""
    table = _table(builder, "iq3s_grid", _IQ3S_WORDS, INT32)
    mags, signs, scales = [], [], []
    for j in range(8):
        qh = builder.zext(load(builder, wa, 66 + j, ir.IntType(8)), INT32)
        rows = []
        for r in range(8):
            low = builder.zext(load(builder, wa, 2 + 8 * j + r, ir.IntType(8)), INT32)
            rows.append(_row(builder, table, builder.or_(low, builder.shl(_field(builder, qh, r, 1), _c(8))), INT32))
        mags.append(_vector(builder, rows, V8I32))
        signs.append(_byte_signs(builder, wa, 74 + 4 * j))
        sc = builder.zext(load(builder, wa, 106 + j // 2, ir.IntType(8)), INT32)
        scales.append(_splat16(builder, _odd(builder, _field(builder, sc, 4 * (j % 2), 15))))
    return mags, signs, scales, half_at(builder, wa, 0)


def _spread(builder, values):
    """<32 x i8>: values[l] (i8 scalars) in lanes 8 l .. 8 l + 7, l < 4."""
    v = ir.Constant(ir.VectorType(ir.IntType(8), 4), ir.Undefined)
    for l, x in enumerate(values):
        v = builder.insert_element(v, x, _c(l))
    return shuffle(builder, v, [i // 8 for i in range(32)])


def _iq1_weights(builder, rows, deltas):
    """|w| and w (<32 x i8>) of w = 8 g + delta: four grid rows (i64 words of 8 g) and their
    groups' deltas (i8 +-1); w is both vpsignb's sign and, as |w| <= 9, vpmaddubsw's magnitude."""
    w = builder.add(_vector(builder, rows, V4I64), _spread(builder, deltas))
    absb = declare(builder, "llvm.abs.v32i8", V32I8, [V32I8, ir.IntType(1)])
    return builder.call(absb, [w, ir.Constant(ir.IntType(1), 0)]), w


def _delta(builder, flag):
    """i8 -1 where flag (an i32) is not zero, else +1."""
    i8 = ir.IntType(8)
    return builder.select(builder.icmp_unsigned("!=", flag, _c(0)), ir.Constant(i8, -1), ir.Constant(i8, 1))


def _iq1s_block(builder, wa):
    """Per sub-block j, u16 qh: grid rows qs | 3 bits of qh << 8, scale 2 ((qh >> 12) & 7) + 1,
    delta from bit 15; c = 1/8."""
    table = _table(builder, "iq1_grid8", _IQ1_WORDS, INT64)
    mags, vals, scales = [], [], []
    for j in range(8):
        qh = builder.zext(load(builder, wa, 34 + 2 * j, INT16), INT32)
        rows = []
        for l in range(4):
            low = builder.zext(load(builder, wa, 2 + 4 * j + l, ir.IntType(8)), INT32)
            index = builder.or_(low, builder.shl(_field(builder, qh, 3 * l, 7), _c(8)))
            rows.append(_row(builder, table, index, INT64))
        d = _delta(builder, _field(builder, qh, 15, 1))
        m, v = _iq1_weights(builder, rows, [d] * 4)
        mags.append(m)
        vals.append(v)
        scales.append(_splat16(builder, _odd(builder, _field(builder, qh, 12, 7))))
    return mags, vals, scales, fmul(builder, half_at(builder, wa, 0), ir.Constant(F32, 0.125))


def _iq1m_block(builder, wa):
    """Per group q: grid row qs[q] | 3 bits of its qh nibble << 8, delta from the nibble's bit 3;
    3-bit scales per 16 weights; d from the top nibbles of the four u16 scales; c = 1/8."""
    table = _table(builder, "iq1_grid8", _IQ1_WORDS, INT64)
    sc = [builder.zext(load(builder, wa, 48 + 2 * i, INT16), INT32) for i in range(4)]
    nibbles = [_field(builder, sc[0], 12, 0xF), builder.and_(builder.lshr(sc[1], _c(8)), _c(0xF0)),
               builder.and_(builder.lshr(sc[2], _c(4)), _c(0xF00)), builder.and_(sc[3], _c(0xF000))]
    bits = builder.or_(builder.or_(nibbles[0], nibbles[1]), builder.or_(nibbles[2], nibbles[3]))
    d = builder.fpext(builder.bitcast(builder.trunc(bits, INT16), ir.HalfType()), F32)
    mags, vals, scales = [], [], []
    for j in range(8):
        rows, deltas = [], []
        for l in range(4):
            q = 4 * j + l
            nib = _field(builder, builder.zext(load(builder, wa, 32 + q // 2, ir.IntType(8)), INT32), 4 * (q % 2), 15)
            low = builder.zext(load(builder, wa, q, ir.IntType(8)), INT32)
            rows.append(_row(builder, table, builder.or_(low, builder.shl(builder.and_(nib, _c(7)), _c(8))), INT64))
            deltas.append(_delta(builder, builder.and_(nib, _c(8))))
        m, v = _iq1_weights(builder, rows, deltas)
        mags.append(m)
        vals.append(v)
        scales.append(_splat16(builder, *[_odd(builder, _field(builder, sc[i // 4], 3 * (i % 4), 7))
                                          for i in (2 * j, 2 * j + 1)]))
    return mags, vals, scales, fmul(builder, d, ir.Constant(F32, 0.125))


def _iq3xxs_block(builder, wa):
    table = _table(builder, "iq3xxs_grid", _IQ3XXS_WORDS, INT32)
    mags, signs, scales = [], [], []
    for j in range(8):
        q0 = load(builder, wa, 2 + 8 * j, INT32)
        q1 = load(builder, wa, 6 + 8 * j, INT32)
        aux = load(builder, wa, 66 + 4 * j, INT32)
        rows = [_row(builder, table, _field(builder, q, 8 * k, 255), INT32) for q in (q0, q1) for k in range(4)]
        mags.append(_vector(builder, rows, V8I32))
        signs.append(_signs(builder, aux))
        scales.append(_splat16(builder, _odd(builder, builder.lshr(aux, _c(28)))))
    return mags, signs, scales, fmul(builder, half_at(builder, wa, 0), ir.Constant(F32, 0.25))


def _term(builder, block, xa, xba, xd, acc):
    """acc + ((d * c) * xd) * I, as iq_low's row dots."""
    mags, signs, scales, dc = block
    sign = declare(builder, "llvm.x86.avx2.psign.b", V32I8, [V32I8, V32I8])
    parts = [maddwd(builder, maddubs(builder, m, builder.call(sign, [load(builder, xa, 32 * j, V32I8), s])), sc)
             for j, (m, s, sc) in enumerate(zip(mags, signs, scales))]
    while len(parts) > 1:
        parts = [builder.add(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
    return fadd(builder, acc, fmul(builder, fmul(builder, dc, xd), builder.sitofp(reduce_add(builder, parts[0]), F32)))


SIMD, SIMD4, SIMD8 = {}, {}, {}
for _qt, _bytes, _decode in ((T.IQ2_XXS, 66, _iq2xxs_block), (T.IQ2_XS, 74, _iq2xs_block),
                             (T.IQ2_S, 82, _iq2s_block), (T.IQ3_XXS, 98, _iq3xxs_block),
                             (T.IQ3_S, 110, _iq3s_block), (T.IQ1_S, 50, _iq1s_block), (T.IQ1_M, 56, _iq1m_block)):
    SIMD[int(_qt)], SIMD4[int(_qt)] = row_dot_functions(*row_dot_intrinsics(_qt.name.lower(), _bytes, _decode, _term))
    SIMD8[int(_qt)] = row_dot8_function(row_dot8_intrinsic(_qt.name.lower(), _bytes, _decode, _term))
