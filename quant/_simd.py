"""Explicit AVX2 inner products for the int8-activation kernels, as Numba intrinsics.

LLVM does not find the best x86 sequence for a 4- or 6-bit weight times an int8
activation on its own: from plain loops it widens to 16 bits, multiplies the scale in
separately and chains every multiply-add on one accumulator. These intrinsics emit
llama.cpp's sequence directly in LLVM IR: ``vpmaddubsw`` (unsigned weight bytes times
signed activation bytes, adjacent pairs summed to int16), then ``vpmaddwd`` against the
sub-block scales (pairs summed to int32), with independent accumulators and one
horizontal sum per row (GEMV) or per 256 weights (GEMM). About 2.5x the portable kernels'
speed per core for Q4_K.

AVAILABLE says whether the host can run them (AVX2 and F16C, and Numba compiling for
the host CPU); the portable loops in ``_q8dot`` are used otherwise.

    q4k_row_dot(w, nsb, x, xb, xd) -> float32
        A whole Q4_K row (address w, nsb super-blocks) times one token's int8 activations:
        x their address, xb that of their int32 sums per 16 columns, xd that of their float32
        scales per 256. Integer sums per super-block, float32 vector accumulators across
        super-blocks, one horizontal sum per row.
    q6k_row_dot(w, nsb, x, xb, xd) -> float32: the same for a Q6_K row.
    q4k_isum4(q, p0..p3, m_lo, m_hi, x0..x3, b0..b3) -> 8 x int32
        One Q4_K super-block (q: its 128 nibble bytes; p0..p3: its 8 six-bit scales, two per
        uint32 as int16 halves; m_lo, m_hi: its 8 mins, one per byte) times four tokens'
        activations: (sum_j scale_j * sum_l nibble_j[l] x_t[32 j + l], sum_j min_j * sum_l
        x_t[32 j + l]) for each token t. The weights are decoded once for the four (GEMM).
    q6k_isum4(w, x0..x3, b0..b3) -> 4 x int32
        One Q6_K super-block (address w) times four tokens: sum_g scale_g * sum_l (q[l] - 32) x_t[l].
    f16_fast(bits) -> float32: IEEE half to float (vcvtph2ps).
"""

from __future__ import annotations

import numba
from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def _host_has_simd() -> bool:
    if numba.config.CPU_NAME not in (None, "host"):
        return False  # compiling for another CPU (NUMBA_CPU_NAME): stay portable
    try:
        features = llvm.get_host_cpu_features()
    except RuntimeError:
        return False
    return bool(features.get("avx2") and features.get("f16c"))


AVAILABLE = _host_has_simd()

_i8, _i16, _i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_V32I8 = ir.VectorType(_i8, 32)
_V16I8 = ir.VectorType(_i8, 16)
_V16I16 = ir.VectorType(_i16, 16)
_V8I32 = ir.VectorType(_i32, 8)
_V16I32 = ir.VectorType(_i32, 16)


def _fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _load(builder, addr, offset: int, vtype):
    ptr = builder.inttoptr(builder.add(addr, ir.Constant(addr.type, offset)), vtype.as_pointer())
    return builder.load(ptr, align=1)


def _maddubs(builder, u8, s8):
    """<32 x u8> * <32 x i8>, adjacent pairs summed: <16 x i16>."""
    return builder.call(_fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [_V32I8, _V32I8]), [u8, s8])


def _maddwd(builder, a, b):
    """<16 x i16> * <16 x i16>, adjacent pairs summed: <8 x i32>."""
    return builder.call(_fn(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [_V16I16, _V16I16]), [a, b])


def _reduce(builder, v):
    return builder.call(_fn(builder, f"llvm.vector.reduce.add.v{v.type.count}i32", _i32, [v.type]), [v])


def _splat8(v: int):
    return ir.Constant(_V32I8, [v] * 32)


def _shuffle(builder, vec, indices):
    mask = ir.Constant(ir.VectorType(_i32, len(indices)), list(indices))
    return builder.shuffle_vector(vec, ir.Constant(vec.type, ir.Undefined), mask)


def _q4k_weights(builder, qa, words):
    """The 8 sub-blocks' codes (<32 x u8> each) and scales (<16 x i16> splats) of a Q4_K super-block."""
    packed = ir.Constant(ir.VectorType(_i32, 4), ir.Undefined)
    for j, p in enumerate(words):
        packed = builder.insert_element(packed, p, ir.Constant(_i32, j))
    scales = builder.bitcast(packed, ir.VectorType(_i16, 8))
    codes, splats = [], []
    for k in range(4):
        qv = _load(builder, qa, 32 * k, _V32I8)
        codes += [builder.and_(qv, _splat8(15)), builder.lshr(qv, _splat8(4))]
        splats += [_shuffle(builder, scales, [2 * k] * 16), _shuffle(builder, scales, [2 * k + 1] * 16)]
    return codes, splats


def _q6k_weights(builder, wa):
    """The 8 runs of 32 six-bit codes (<32 x u8>) of a Q6_K super-block, their scale pairs
    (<16 x i16>: lanes 0-7 the scale of the run's first 16 weights, 8-15 of the next 16), and
    the 16 scales as <16 x i8>."""
    sc8 = _load(builder, wa, 192, _V16I8)
    sc16 = builder.sext(sc8, ir.VectorType(_i16, 16))
    codes, splats = [], []
    for h in range(2):
        a = _load(builder, wa, 64 * h, _V32I8)
        b = _load(builder, wa, 64 * h + 32, _V32I8)
        hb = _load(builder, wa, 128 + 32 * h, _V32I8)
        codes += [
            builder.or_(builder.and_(a, _splat8(15)), builder.shl(builder.and_(hb, _splat8(3)), _splat8(4))),
            builder.or_(builder.and_(b, _splat8(15)), builder.shl(builder.and_(hb, _splat8(12)), _splat8(2))),
            builder.or_(builder.lshr(a, _splat8(4)), builder.and_(hb, _splat8(48))),
            builder.or_(builder.lshr(b, _splat8(4)), builder.and_(builder.lshr(hb, _splat8(2)), _splat8(48))),
        ]
        for k in range(4):
            g = 8 * h + 2 * k
            splats.append(_shuffle(builder, sc16, [g] * 8 + [g + 1] * 8))
    return codes, splats, sc8


def _isum(builder, codes, splats, xa):
    """sum over runs i of splats[i] . (codes[i] * x[32 i : 32 i + 32]) as int32 (runs of 32 bytes)."""
    parts = [_maddwd(builder, _maddubs(builder, c, _load(builder, xa, 32 * i, _V32I8)), sp)
             for i, (c, sp) in enumerate(zip(codes, splats))]
    while len(parts) > 1:
        parts = [builder.add(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
    return _reduce(builder, parts[0])


def _q6k_offset(builder, sc8, xba):
    """32 * sum_g scale_g * xb[g]: the codes' offset of 32, over the 16 groups of 16."""
    offset = builder.mul(builder.sext(sc8, _V16I32), _load(builder, xba, 0, _V16I32))
    return builder.mul(_reduce(builder, offset), ir.Constant(_i32, 32))


def _q4k_mins(builder, m_lo, m_hi):
    """The 8 six-bit mins (bytes of the two words m_lo, m_hi) as <8 x i32>."""
    pair = builder.insert_element(ir.Constant(ir.VectorType(_i32, 2), ir.Undefined), m_lo, ir.Constant(_i32, 0))
    pair = builder.insert_element(pair, m_hi, ir.Constant(_i32, 1))
    return builder.zext(builder.bitcast(pair, ir.VectorType(_i8, 8)), _V8I32)


def _msum(builder, mins, xba):
    """sum_j mins[j] * (xb[2 j] + xb[2 j + 1]): the mins times the activations' 32-column sums."""
    xb = _load(builder, xba, 0, _V16I32)
    pairs = builder.add(_shuffle(builder, xb, range(0, 16, 2)), _shuffle(builder, xb, range(1, 16, 2)))
    return _reduce(builder, builder.mul(mins, pairs))


_Q4K_ARGS = [types.int64, types.uint32, types.uint32, types.uint32, types.uint32, types.uint32, types.uint32]


@intrinsic
def q4k_isum4(typingctx, q, p0, p1, p2, p3, m_lo, m_hi, x0, x1, x2, x3, b0, b1, b2, b3):
    """q4k_isum for four tokens (activations x0..x3, their 16-column sums b0..b3) at once: the
    weight codes, scales and mins are decoded once for the four (a GEMM's inner step).
    Returns (isum0, msum0, isum1, msum1, ...)."""
    def codegen(context, builder, signature, args):
        codes, splats = _q4k_weights(builder, args[0], args[1:5])
        mins = _q4k_mins(builder, args[5], args[6])
        out = []
        for xa, ba in zip(args[7:11], args[11:15]):
            out += [_isum(builder, codes, splats, xa), _msum(builder, mins, ba)]
        return context.make_tuple(builder, signature.return_type, out)

    return types.UniTuple(types.int32, 8)(*_Q4K_ARGS, *([types.int64] * 8)), codegen


_F32 = ir.FloatType()
_V8F32 = ir.VectorType(_F32, 8)


def _load_scalar(builder, addr, offset: int, typ):
    ptr = builder.inttoptr(builder.add(addr, ir.Constant(addr.type, offset)), typ.as_pointer())
    return builder.load(ptr, align=1)


def _splat_f32(builder, v):
    vec = builder.insert_element(ir.Constant(_V8F32, ir.Undefined), v, ir.Constant(_i32, 0))
    return _shuffle(builder, vec, [0] * 8)


def _q4k_scale_words(builder, wa):
    """The 12-byte scales field at wa: (scales as four int16-pair words, mins as <8 x i32>)."""
    u0, u1, u2 = (_load_scalar(builder, wa, 4 + 4 * i, _i32) for i in range(3))
    m1, m2, m3 = (ir.Constant(_i32, c) for c in (0x3F3F3F3F, 0x0F0F0F0F, 0x03030303))
    c4, c6 = ir.Constant(_i32, 4), ir.Constant(_i32, 6)
    sc_lo = builder.and_(u0, m1)
    sc_hi = builder.or_(builder.and_(u2, m2), builder.shl(builder.and_(builder.lshr(u0, c6), m3), c4))
    mn_lo = builder.and_(u1, m1)
    mn_hi = builder.or_(builder.and_(builder.lshr(u2, c4), m2), builder.shl(builder.and_(builder.lshr(u1, c6), m3), c4))
    pair = ir.Constant(ir.VectorType(_i32, 2), ir.Undefined)
    sc = builder.insert_element(builder.insert_element(pair, sc_lo, ir.Constant(_i32, 0)), sc_hi, ir.Constant(_i32, 1))
    scales16 = builder.zext(builder.bitcast(sc, ir.VectorType(_i8, 8)), ir.VectorType(_i16, 8))
    mins = _q4k_mins(builder, mn_lo, mn_hi)
    return scales16, mins


@intrinsic
def q4k_row_dot(typingctx, w, nsb, x, xb, xd):
    """A whole Q4_K row times one token's int8 activations, as float32: w the row's address,
    nsb its super-blocks, x / xb / xd the addresses of the activations, their 16-column sums
    and their per-256 scales (float32). Float vector accumulators across super-blocks, one
    horizontal sum per row."""
    def codegen(context, builder, signature, args):
        wa, n, xa, xba, xda = args
        acc = cgutils.alloca_once_value(builder, ir.Constant(_V8F32, None))
        with cgutils.for_range(builder, n) as loop:
            s = loop.index
            o = builder.mul(s, ir.Constant(s.type, 144))
            ws = builder.add(wa, o)
            scales16, mins = _q4k_scale_words(builder, ws)
            codes, splats = [], []
            for k in range(4):
                qv = _load(builder, ws, 16 + 32 * k, _V32I8)
                codes += [builder.and_(qv, _splat8(15)), builder.lshr(qv, _splat8(4))]
                splats += [_shuffle(builder, scales16, [2 * k] * 16), _shuffle(builder, scales16, [2 * k + 1] * 16)]
            xs = builder.add(xa, builder.mul(s, ir.Constant(s.type, 256)))
            parts = [_maddwd(builder, _maddubs(builder, c, _load(builder, xs, 32 * i, _V32I8)), sp)
                     for i, (c, sp) in enumerate(zip(codes, splats))]
            while len(parts) > 1:
                parts = [builder.add(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
            xbv = _load(builder, builder.add(xba, builder.mul(s, ir.Constant(s.type, 64))), 0, _V16I32)
            pairs = builder.add(_shuffle(builder, xbv, range(0, 16, 2)), _shuffle(builder, xbv, range(1, 16, 2)))
            msum = builder.mul(mins, pairs)
            d = builder.fpext(_load_scalar(builder, ws, 0, ir.HalfType()), _F32)
            dmin = builder.fpext(_load_scalar(builder, ws, 2, ir.HalfType()), _F32)
            scale = _load_scalar(builder, builder.add(xda, builder.mul(s, ir.Constant(s.type, 4))), 0, _F32)
            term = builder.fsub(builder.fmul(builder.sitofp(parts[0], _V8F32), _splat_f32(builder, builder.fmul(d, scale))),
                                builder.fmul(builder.sitofp(msum, _V8F32), _splat_f32(builder, builder.fmul(dmin, scale))))
            builder.store(builder.fadd(builder.load(acc), term), acc)
        total = builder.load(acc)
        lanes = [builder.extract_element(total, ir.Constant(_i32, i)) for i in range(8)]
        while len(lanes) > 1:
            lanes = [builder.fadd(lanes[i], lanes[i + 1]) for i in range(0, len(lanes), 2)]
        return lanes[0]

    return types.float32(types.int64, types.int64, types.int64, types.int64, types.int64), codegen


@intrinsic
def q6k_row_dot(typingctx, w, nsb, x, xb, xd):
    """A whole Q6_K row times one token's int8 activations, as float32 (arguments as q4k_row_dot)."""
    def codegen(context, builder, signature, args):
        wa, n, xa, xba, xda = args
        acc = cgutils.alloca_once_value(builder, ir.Constant(_V8F32, None))
        with cgutils.for_range(builder, n) as loop:
            s = loop.index
            ws = builder.add(wa, builder.mul(s, ir.Constant(s.type, 210)))
            codes, splats, sc8 = _q6k_weights(builder, ws)
            xs = builder.add(xa, builder.mul(s, ir.Constant(s.type, 256)))
            parts = [_maddwd(builder, _maddubs(builder, c, _load(builder, xs, 32 * i, _V32I8)), sp)
                     for i, (c, sp) in enumerate(zip(codes, splats))]
            while len(parts) > 1:
                parts = [builder.add(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
            # the codes' offset of 32: sum_g scale_g * xb_g, folded to 8 lanes
            off16 = builder.mul(builder.sext(sc8, _V16I32), _load(builder, builder.add(xba, builder.mul(s, ir.Constant(s.type, 64))), 0, _V16I32))
            off8 = builder.add(_shuffle(builder, off16, range(8)), _shuffle(builder, off16, range(8, 16)))
            isum = builder.sub(parts[0], builder.shl(off8, ir.Constant(_V8I32, [5] * 8)))
            d = builder.fpext(_load_scalar(builder, ws, 208, ir.HalfType()), _F32)
            scale = _load_scalar(builder, builder.add(xda, builder.mul(s, ir.Constant(s.type, 4))), 0, _F32)
            term = builder.fmul(builder.sitofp(isum, _V8F32), _splat_f32(builder, builder.fmul(d, scale)))
            builder.store(builder.fadd(builder.load(acc), term), acc)
        total = builder.load(acc)
        lanes = [builder.extract_element(total, ir.Constant(_i32, i)) for i in range(8)]
        while len(lanes) > 1:
            lanes = [builder.fadd(lanes[i], lanes[i + 1]) for i in range(0, len(lanes), 2)]
        return lanes[0]

    return types.float32(types.int64, types.int64, types.int64, types.int64, types.int64), codegen


@intrinsic
def q6k_isum4(typingctx, w, x0, x1, x2, x3, b0, b1, b2, b3):
    """q6k_isum for four tokens (activations x0..x3, their 16-column sums b0..b3) at once."""
    def codegen(context, builder, signature, args):
        codes, splats, sc8 = _q6k_weights(builder, args[0])
        sums = [builder.sub(_isum(builder, codes, splats, xa), _q6k_offset(builder, sc8, ba))
                for xa, ba in zip(args[1:5], args[5:9])]
        return context.make_tuple(builder, signature.return_type, sums)

    sig = types.UniTuple(types.int32, 4)(*([types.int64] * 9))
    return sig, codegen


@intrinsic
def f16_fast(typingctx, bits):
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        v = builder.trunc(v, _i16) if v.type.width > 16 else builder.zext(v, _i16) if v.type.width < 16 else v
        return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen
