"""Explicit AVX2 inner products for the int8-activation kernels, as Numba intrinsics.

LLVM does not find the best x86 sequence for a 4- or 6-bit weight times an int8
activation on its own: from plain loops it widens to 16 bits, multiplies the scale in
separately and chains every multiply-add on one accumulator. These intrinsics emit
llama.cpp's sequence directly in LLVM IR: ``vpmaddubsw`` (unsigned weight bytes times
signed activation bytes, adjacent pairs summed to int16), then ``vpmaddwd`` against the
sub-block scales (pairs summed to int32), with independent accumulators and one
horizontal sum per row (GEMV) or per 256 weights (GEMM). About 2.5x the portable kernels'
speed per core for Q4_K. Q5_K adds its fifth bit to the codes before the same products;
Q8_0's signed weights go as magnitudes, their signs moved onto the activations (vpsignb),
each 32-weight block's dot reduced to a lane of one vector (on VNNI hosts, q + 128 unsigned
times the activations by one vpdpbusd, 128 X_k taken off): the portable Q8_0 loop does not
vectorize at all (1/8 of this speed, measured), nor does LLVM find vpmaddubsw for Q5_K.

The IR building blocks here (maddubs, maddwd, runs_dot, block_dots, lane_sums8, ordered_sum,
half_at, ...) and row_dot_intrinsics / row_dot_functions also make the other formats' row dots
(q2k_q3k, blocks32, iq4_xs).

AVAILABLE says whether the host can run them (AVX2 and F16C, and Numba compiling for
the host CPU); the portable loops in ``row_dot`` are used otherwise.

    q4k_row_dot(w, nsb, x, xb, xd) -> float32
        A whole Q4_K row (address w, nsb super-blocks) times one token's int8 activations:
        x their address, xb that of their int32 sums per 16 columns, xd that of their float32
        scales per 256. Exact integer sums per super-block, then one float32 sum over the
        super-blocks in order: the same roundings as the avx512_vnni GEMM's, so a row's
        product does not depend on which kernel computed it or on how many tokens it had.
    q6k_row_dot, q5k_row_dot, q8_0_row_dot(w, nsb, x, xb, xd) -> float32: the same for a Q6_K,
        Q5_K or Q8_0 row. Q5_K and Q8_0 make row_dot.q8dot_q5_k's and q8dot_q8_0's roundings
        (the same bits as the portable loops).
    q4k_row_dot4 / q5k_.. / q6k_.. / q8_0_row_dot4(w, nsb, x0..x3, b0..b3, d0..d3) -> 4 x float32
        The same for four tokens at once: each super-block's codes and scales are decoded
        once for the four (the GEMM step).
    f16_fast(bits) -> float32: IEEE half to float (vcvtph2ps).
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ..jit import compiles_for
from .llvm_ir import declare, fadd, fmul, fsub, load, outlined, shuffle


AVAILABLE = compiles_for("avx2", "f16c")
VNNI = compiles_for("avx512f", "avx512bw", "avx512vl", "avx512vnni", "f16c")  # vpdpbusd on 256 bits

INT8, INT16, INT32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
V32I8 = ir.VectorType(INT8, 32)
V16I8 = ir.VectorType(INT8, 16)
V16I16 = ir.VectorType(INT16, 16)
V8I32 = ir.VectorType(INT32, 8)
V16I32 = ir.VectorType(INT32, 16)
F32 = ir.FloatType()


def maddubs(builder, u8, s8):
    """<32 x u8> * <32 x i8>, adjacent pairs summed: <16 x i16>."""
    return builder.call(declare(builder, "llvm.x86.avx2.pmadd.ub.sw", V16I16, [V32I8, V32I8]), [u8, s8])


def dpbusd(builder, u8, s8):
    """<32 x u8> * <32 x i8>, each 4 adjacent products summed exactly: <8 x i32> (vpdpbusd,
    VNNI hosts only)."""
    f = declare(builder, "llvm.x86.avx512.vpdpbusd.256", V8I32, [V8I32, V8I32, V8I32])
    return builder.call(f, [ir.Constant(V8I32, None), builder.bitcast(u8, V8I32), builder.bitcast(s8, V8I32)])


def maddwd(builder, a, b):
    """<16 x i16> * <16 x i16>, adjacent pairs summed: <8 x i32>."""
    return builder.call(declare(builder, "llvm.x86.avx2.pmadd.wd", V8I32, [V16I16, V16I16]), [a, b])


def reduce_add(builder, v):
    """The sum of v's int32 lanes."""
    return builder.call(declare(builder, f"llvm.vector.reduce.add.v{v.type.count}i32", INT32, [v.type]), [v])


def reduce_pair(builder, a, b):
    """The lane sums of two <8 x i32> (exact integers), in one tree: each level adds the two
    halves of a and of b side by side, so it costs about what one reduction does."""
    v = builder.add(builder.shuffle_vector(a, b, ir.Constant(V8I32, [0, 1, 2, 3, 8, 9, 10, 11])),
                    builder.shuffle_vector(a, b, ir.Constant(V8I32, [4, 5, 6, 7, 12, 13, 14, 15])))
    v = builder.add(shuffle(builder, v, [0, 1, 4, 5]), shuffle(builder, v, [2, 3, 6, 7]))
    v = builder.add(shuffle(builder, v, [0, 2]), shuffle(builder, v, [1, 3]))
    return builder.extract_element(v, ir.Constant(INT32, 0)), builder.extract_element(v, ir.Constant(INT32, 1))


def splat8(v: int):
    """<32 x i8> of v."""
    return ir.Constant(V32I8, [v] * 32)


def _q6k_weights(builder, wa):
    """The 8 runs of 32 six-bit codes (<32 x u8>) of a Q6_K super-block, their scale pairs
    (<16 x i16>: lanes 0-7 the scale of the run's first 16 weights, 8-15 of the next 16), and
    the 16 scales as <16 x i8>."""
    sc8 = load(builder, wa, 192, V16I8)
    sc16 = builder.sext(sc8, ir.VectorType(INT16, 16))
    codes, splats = [], []
    for h in range(2):
        a = load(builder, wa, 64 * h, V32I8)
        b = load(builder, wa, 64 * h + 32, V32I8)
        hb = load(builder, wa, 128 + 32 * h, V32I8)
        codes += [
            builder.or_(builder.and_(a, splat8(15)), builder.shl(builder.and_(hb, splat8(3)), splat8(4))),
            builder.or_(builder.and_(b, splat8(15)), builder.shl(builder.and_(hb, splat8(12)), splat8(2))),
            builder.or_(builder.lshr(a, splat8(4)), builder.and_(hb, splat8(48))),
            builder.or_(builder.lshr(b, splat8(4)), builder.and_(builder.lshr(hb, splat8(2)), splat8(48))),
        ]
        for k in range(4):
            g = 8 * h + 2 * k
            splats.append(shuffle(builder, sc16, [g] * 8 + [g + 1] * 8))
    return codes, splats, sc8


def runs_dot(builder, codes, splats, xa):
    """sum over runs i of splats[i] * (codes[i] . x[32 i : 32 i + 32]), per 32-bit lane (<8 x i32>)."""
    parts = [maddwd(builder, maddubs(builder, c, load(builder, xa, 32 * i, V32I8)), sp)
             for i, (c, sp) in enumerate(zip(codes, splats))]
    while len(parts) > 1:
        parts = [builder.add(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
    return parts[0]


def half_at(builder, wa, offset: int):
    """The IEEE half at wa + offset, as float."""
    return builder.fpext(load(builder, wa, offset, ir.HalfType()), F32)


def _k4_scales_mins(builder, wa):
    """The 8 six-bit scales (<8 x i16>) and mins (<8 x i32>) of a Q4_K/Q5_K super-block at wa:
    the 12-byte field is decoded with 32-bit masks."""
    u0, u1, u2 = (load(builder, wa, 4 + 4 * i, INT32) for i in range(3))
    m1, m2, m3 = (ir.Constant(INT32, c) for c in (0x3F3F3F3F, 0x0F0F0F0F, 0x03030303))
    c4, c6 = ir.Constant(INT32, 4), ir.Constant(INT32, 6)
    sc_lo = builder.and_(u0, m1)
    sc_hi = builder.or_(builder.and_(u2, m2), builder.shl(builder.and_(builder.lshr(u0, c6), m3), c4))
    mn_lo = builder.and_(u1, m1)
    mn_hi = builder.or_(builder.and_(builder.lshr(u2, c4), m2), builder.shl(builder.and_(builder.lshr(u1, c6), m3), c4))

    def bytes8(lo, hi):
        pair = ir.Constant(ir.VectorType(INT32, 2), ir.Undefined)
        pair = builder.insert_element(builder.insert_element(pair, lo, ir.Constant(INT32, 0)), hi, ir.Constant(INT32, 1))
        return builder.bitcast(pair, ir.VectorType(INT8, 8))

    return builder.zext(bytes8(sc_lo, sc_hi), ir.VectorType(INT16, 8)), builder.zext(bytes8(mn_lo, mn_hi), V8I32)


def _q4k_block(builder, wa, qs: int = 16, high=None):
    """A Q4_K super-block at wa: its codes and scale splats per 32 weights, its mins as
    <8 x i32>, d and dmin. With high(j) (Q5_K: qs at 48), each sub-block j's codes get the
    bits high(j) adds."""
    scales16, mins = _k4_scales_mins(builder, wa)
    codes, splats = [], []
    for k in range(4):
        qv = load(builder, wa, qs + 32 * k, V32I8)
        codes += [builder.and_(qv, splat8(15)), builder.lshr(qv, splat8(4))]
        splats += [shuffle(builder, scales16, [2 * k] * 16), shuffle(builder, scales16, [2 * k + 1] * 16)]
    if high is not None:
        codes = [builder.or_(c, high(j)) for j, c in enumerate(codes)]
    return codes, splats, mins, half_at(builder, wa, 0), half_at(builder, wa, 2)


def _q4k_term(builder, block, xa, xba, xd, acc):
    """acc plus one Q4_K super-block times one token's activations: the integer sums of the
    codes and of the mins are exact, then acc - M * (dmin * xd) + I * (d * xd), each step
    rounded once (the avx512_vnni GEMM's sequence, so the GEMV and the GEMM agree to the bit)."""
    codes, splats, mins, d, dmin = block
    xb = load(builder, xba, 0, V16I32)
    pairs = builder.add(shuffle(builder, xb, range(0, 16, 2)), shuffle(builder, xb, range(1, 16, 2)))
    msum, isum = reduce_pair(builder, builder.mul(mins, pairs), runs_dot(builder, codes, splats, xa))
    acc = fadd(builder, acc, builder.fneg(fmul(builder, builder.sitofp(msum, F32), fmul(builder, dmin, xd))))
    return fadd(builder, acc, fmul(builder, builder.sitofp(isum, F32), fmul(builder, d, xd)))


def _q6k_block(builder, wa):
    codes, splats, sc8 = _q6k_weights(builder, wa)
    return codes, splats, builder.sext(sc8, V16I32), half_at(builder, wa, 208)


def _q6k_term(builder, block, xa, xba, xd, acc):
    """acc plus one Q6_K super-block times one token's activations (the codes' offset of 32
    comes off through the activations' 16-column sums): acc + I * (d * xd), as in _q4k_term."""
    codes, splats, sc32, d = block
    off16 = builder.mul(sc32, load(builder, xba, 0, V16I32))
    off8 = builder.add(shuffle(builder, off16, range(8)), shuffle(builder, off16, range(8, 16)))
    isum = reduce_add(builder, builder.sub(runs_dot(builder, codes, splats, xa), builder.shl(off8, ir.Constant(V8I32, [5] * 8))))
    return fadd(builder, acc, fmul(builder, builder.sitofp(isum, F32), fmul(builder, d, xd)))


def _q5k_block(builder, wa):
    """A Q5_K super-block: Q4_K's fields with the codes at 48, and bit j of qh[l] (at 16) as
    bit 4 of weight l of sub-block j."""
    hb = load(builder, wa, 16, V32I8)

    def high(j):
        moved = builder.shl(hb, splat8(4 - j)) if j <= 4 else builder.lshr(hb, splat8(j - 4))
        return builder.and_(moved, splat8(16))

    return _q4k_block(builder, wa, 48, high)


def _q5k_term(builder, block, xa, xba, xd, acc):
    """acc + xd * (d * I - dmin * M) for one Q5_K super-block, I and M the exact integer sums of
    the codes and of the mins: row_dot.q8dot_q5_k's roundings, so both give the same bits."""
    codes, splats, mins, d, dmin = block
    xb = load(builder, xba, 0, V16I32)
    pairs = builder.add(shuffle(builder, xb, range(0, 16, 2)), shuffle(builder, xb, range(1, 16, 2)))
    msum, isum = reduce_pair(builder, builder.mul(mins, pairs), runs_dot(builder, codes, splats, xa))
    both = fsub(builder, fmul(builder, d, builder.sitofp(isum, F32)), fmul(builder, dmin, builder.sitofp(msum, F32)))
    return fadd(builder, acc, fmul(builder, xd, both))


def lane_sums8(builder, vs):
    """<8 x i32> whose lane k is the sum of the lanes of vs[k] (8 vectors <8 x i32>): three
    levels of two-input shuffles and adds, the last one putting the lanes in order."""
    def level(pairs, lo, hi):
        return [builder.add(builder.shuffle_vector(a, b, ir.Constant(V8I32, lo)),
                            builder.shuffle_vector(a, b, ir.Constant(V8I32, hi))) for a, b in pairs]
    v = level(zip(vs[0::2], vs[1::2]), [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15])
    v = level(zip(v[0::2], v[1::2]), [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15])
    return level([(v[0], v[1])], [0, 4, 2, 6, 8, 12, 10, 14], [1, 5, 3, 7, 9, 13, 11, 15])[0]


def half_lanes8(builder, wa, offsets):
    """<8 x float>: the IEEE halves at wa + offsets[k] in lane k."""
    v = ir.Constant(ir.VectorType(INT16, 8), ir.Undefined)
    for k, off in enumerate(offsets):
        v = builder.insert_element(v, load(builder, wa, off, INT16), ir.Constant(INT32, k))
    return builder.fpext(builder.bitcast(v, ir.VectorType(ir.HalfType(), 8)), ir.VectorType(F32, 8))


ONES16 = ir.Constant(V16I16, [1] * 16)


def block_dots(builder, us, ss, xa):
    """<8 x i32>: lane k the integer dot of the 32 weights us[k] * ss[k] (<32 x u8> magnitudes
    and <32 x i8> signs) with activations xa + 32 k. The sign moves onto the activation
    (vpsignb), so that vpmaddubsw multiplies unsigned by signed bytes (llama.cpp's Q8_0 trick)."""
    sign = declare(builder, "llvm.x86.avx2.psign.b", V32I8, [V32I8, V32I8])
    dots = [maddwd(builder, maddubs(builder, u, builder.call(sign, [load(builder, xa, 32 * k, V32I8), sg])), ONES16)
            for k, (u, sg) in enumerate(zip(us, ss))]
    return lane_sums8(builder, dots)


def _q8_0_block(builder, wa):
    """Eight Q8_0 blocks (256 columns): their |q| and q (<32 x i8> each) and scales <8 x float>."""
    qs = [load(builder, wa, 34 * k + 2, V32I8) for k in range(8)]
    if VNNI:  # q + 128 as unsigned bytes for vpdpbusd (None: the 128 comes off in the term)
        return [builder.xor(q, splat8(-128)) for q in qs], None, half_lanes8(builder, wa, [34 * k for k in range(8)])
    absb = declare(builder, "llvm.abs.v32i8", V32I8, [V32I8, ir.IntType(1)])
    mags = [builder.call(absb, [q, ir.Constant(ir.IntType(1), 0)]) for q in qs]
    return mags, qs, half_lanes8(builder, wa, [34 * k for k in range(8)])


def ordered_sum(builder, v, start=None):
    """start + v[0] + v[1] + ... (or v[0] + ... without start), left to right, each add rounded once."""
    acc = start
    for k in range(v.type.count):
        lane = builder.extract_element(v, ir.Constant(INT32, k))
        acc = lane if acc is None else fadd(builder, acc, lane)
    return acc


def _q8_0_term(builder, block, xa, xba, xd, acc):
    """acc + xd * (d_0 t_0 + ... + d_7 t_7), summed left to right, t_k the exact integer dot of
    block k: row_dot.q8dot_q8_0's roundings."""
    mags, qs, d = block
    if qs is None:
        xb = load(builder, xba, 0, V16I32)
        x = builder.add(shuffle(builder, xb, range(0, 16, 2)), shuffle(builder, xb, range(1, 16, 2)))
        t = lane_sums8(builder, [dpbusd(builder, u, load(builder, xa, 32 * k, V32I8)) for k, u in enumerate(mags)])
        t = builder.sub(t, builder.shl(x, ir.Constant(V8I32, [7] * 8)))
    else:
        t = block_dots(builder, mags, qs, xa)
    prods = fmul(builder, d, builder.sitofp(t, ir.VectorType(F32, 8)))
    return fadd(builder, acc, fmul(builder, xd, ordered_sum(builder, prods)))


_FORMATS = {"q4_k": (144, _q4k_block, _q4k_term), "q6_k": (210, _q6k_block, _q6k_term),
            "q5_k": (176, _q5k_block, _q5k_term), "q8_0": (272, _q8_0_block, _q8_0_term)}


def _row_dot(fmt, n_tok: int):
    """Codegen of a whole row (w, nsb super-blocks) times n_tok tokens, given by the addresses of
    their activations, 16-column sums and per-256 scales. The weights are decoded once per
    super-block for all tokens; each token's float sum runs over the super-blocks in order.
    fmt: a name of _FORMATS, or a (name, bytes per 256 columns, decode, term) tuple. The code
    is one function per kernel, called (llvm_ir.outlined)."""
    name, block_bytes, decode, term = (fmt, *_FORMATS[fmt]) if isinstance(fmt, str) else fmt

    def codegen(context, builder, signature, args):
        wa, n = args[0], args[1]
        xs, xbs, xds = args[2:2 + n_tok], args[2 + n_tok:2 + 2 * n_tok], args[2 + 2 * n_tok:]
        accs = [cgutils.alloca_once_value(builder, ir.Constant(F32, 0.0)) for _ in range(n_tok)]
        with cgutils.for_range(builder, n) as loop:
            s = loop.index

            def at(base, stride):
                return builder.add(base, builder.mul(s, ir.Constant(s.type, stride)))

            block = decode(builder, at(wa, block_bytes))
            for acc, xa, xba, xda in zip(accs, xs, xbs, xds):
                xd = load(builder, at(xda, 4), 0, F32)
                builder.store(term(builder, block, at(xa, 256), at(xba, 64), xd, builder.load(acc)), acc)
        sums = [builder.load(acc) for acc in accs]
        return sums[0] if n_tok == 1 else context.make_tuple(builder, signature.return_type, sums)

    return outlined(f"stepstream.int8.{name}.row_dot{n_tok}", codegen)


_ROW1 = types.float32(*([types.int64] * 5))
_ROW4 = types.UniTuple(types.float32, 4)(*([types.int64] * 14))
_ROW8 = types.UniTuple(types.float32, 8)(*([types.int64] * 26))


def row_dot_intrinsics(name: str, block_bytes: int, decode, term):
    """(row_dot, row_dot4) intrinsics, with q4k_row_dot's and q4k_row_dot4's arguments, for a
    format given by decode(builder, address) -> block (256 columns' decoded weights) and
    term(builder, block, x, xb, xd, acc) -> acc plus that block times one token; `name` (the
    format's, e.g. "q2_k") names their LLVM functions, so it must be the format's own."""
    spec = (name, block_bytes, decode, term)

    def one(typingctx, w, nsb, x, xb, xd):
        return _ROW1, _row_dot(spec, 1)

    def four(typingctx, w, nsb, x0, x1, x2, x3, b0, b1, b2, b3, d0, d1, d2, d3):
        return _ROW4, _row_dot(spec, 4)

    return intrinsic(one), intrinsic(four)


def row_dot8_intrinsic(name: str, block_bytes: int, decode, term):
    """row_dot_intrinsics' format as an 8-token intrinsic (w, nsb, x0..x7, b0..b7, d0..d7) -> 8 x
    float32: for formats whose decode costs several times a token's term (the code-book grids),
    a GEMM pass over 8 tokens decodes each super-block half as often as two 4-token passes."""
    spec = (name, block_bytes, decode, term)

    def eight(typingctx, w, nsb, x0, x1, x2, x3, x4, x5, x6, x7, b0, b1, b2, b3, b4, b5, b6, b7,
              d0, d1, d2, d3, d4, d5, d6, d7):
        return _ROW8, _row_dot(spec, 8)

    return intrinsic(eight)


def row_dot8_function(row8):
    """dot8(w, XQ, XD, XB, t, last): row w times tokens t .. t+7 through row8 (row_dot8_intrinsic),
    token indices past `last` taking token `last` again (a short group padded to a full pass)."""
    @nb.njit(inline="always")
    def dot8(w, XQ, XD, XB, t, last):
        i0, i1, i2, i3 = t, min(t + 1, last), min(t + 2, last), min(t + 3, last)
        i4, i5, i6, i7 = min(t + 4, last), min(t + 5, last), min(t + 6, last), min(t + 7, last)
        return row8(np.int64(w.ctypes.data), XQ.shape[1] // 256,
                    np.int64(XQ[i0].ctypes.data), np.int64(XQ[i1].ctypes.data), np.int64(XQ[i2].ctypes.data),
                    np.int64(XQ[i3].ctypes.data), np.int64(XQ[i4].ctypes.data), np.int64(XQ[i5].ctypes.data),
                    np.int64(XQ[i6].ctypes.data), np.int64(XQ[i7].ctypes.data),
                    np.int64(XB[i0].ctypes.data), np.int64(XB[i1].ctypes.data), np.int64(XB[i2].ctypes.data),
                    np.int64(XB[i3].ctypes.data), np.int64(XB[i4].ctypes.data), np.int64(XB[i5].ctypes.data),
                    np.int64(XB[i6].ctypes.data), np.int64(XB[i7].ctypes.data),
                    np.int64(XD[i0].ctypes.data), np.int64(XD[i1].ctypes.data), np.int64(XD[i2].ctypes.data),
                    np.int64(XD[i3].ctypes.data), np.int64(XD[i4].ctypes.data), np.int64(XD[i5].ctypes.data),
                    np.int64(XD[i6].ctypes.data), np.int64(XD[i7].ctypes.data))

    return dot8


def row_dot_functions(row1, row4):
    """Functions with row_dot.q8dot_*'s arguments, (w, xq, xd, xb) and (w, XQ, XD, XB, t) for
    tokens t .. t+3, over the intrinsics of row_dot_intrinsics; Numba code inlines them."""
    @nb.njit(inline="always")
    def dot(w, xq, xd, xb):
        return row1(np.int64(w.ctypes.data), xq.shape[0] // 256, np.int64(xq.ctypes.data),
                    np.int64(xb.ctypes.data), np.int64(xd.ctypes.data))

    @nb.njit(inline="always")
    def dot4(w, XQ, XD, XB, t):
        return row4(np.int64(w.ctypes.data), XQ.shape[1] // 256,
                    np.int64(XQ[t].ctypes.data), np.int64(XQ[t + 1].ctypes.data), np.int64(XQ[t + 2].ctypes.data),
                    np.int64(XQ[t + 3].ctypes.data), np.int64(XB[t].ctypes.data), np.int64(XB[t + 1].ctypes.data),
                    np.int64(XB[t + 2].ctypes.data), np.int64(XB[t + 3].ctypes.data), np.int64(XD[t].ctypes.data),
                    np.int64(XD[t + 1].ctypes.data), np.int64(XD[t + 2].ctypes.data), np.int64(XD[t + 3].ctypes.data))

    return dot, dot4


@intrinsic
def q4k_row_dot(typingctx, w, nsb, x, xb, xd):
    return _ROW1, _row_dot("q4_k", 1)


@intrinsic
def q6k_row_dot(typingctx, w, nsb, x, xb, xd):
    return _ROW1, _row_dot("q6_k", 1)


@intrinsic
def q4k_row_dot4(typingctx, w, nsb, x0, x1, x2, x3, b0, b1, b2, b3, d0, d1, d2, d3):
    return _ROW4, _row_dot("q4_k", 4)


@intrinsic
def q6k_row_dot4(typingctx, w, nsb, x0, x1, x2, x3, b0, b1, b2, b3, d0, d1, d2, d3):
    return _ROW4, _row_dot("q6_k", 4)


@intrinsic
def q5k_row_dot(typingctx, w, nsb, x, xb, xd):
    return _ROW1, _row_dot("q5_k", 1)


@intrinsic
def q8_0_row_dot(typingctx, w, nsb, x, xb, xd):
    return _ROW1, _row_dot("q8_0", 1)


@intrinsic
def q5k_row_dot4(typingctx, w, nsb, x0, x1, x2, x3, b0, b1, b2, b3, d0, d1, d2, d3):
    return _ROW4, _row_dot("q5_k", 4)


@intrinsic
def q8_0_row_dot4(typingctx, w, nsb, x0, x1, x2, x3, b0, b1, b2, b3, d0, d1, d2, d3):
    return _ROW4, _row_dot("q8_0", 4)


@intrinsic
def f16_fast(typingctx, bits):
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        v = builder.trunc(v, INT16) if v.type.width > 16 else builder.zext(v, INT16) if v.type.width < 16 else v
        return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen
