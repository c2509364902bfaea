"""Explicit AVX2 inner products for the int8-activation kernels, as Numba intrinsics.

LLVM does not find the best x86 sequence for a 4- or 6-bit weight times an int8
activation on its own: from plain loops it widens to 16 bits, multiplies the scale in
separately and chains every multiply-add on one accumulator. These intrinsics emit
llama.cpp's sequence directly in LLVM IR: ``vpmaddubsw`` (unsigned weight bytes times
signed activation bytes, adjacent pairs summed to int16), then ``vpmaddwd`` against the
sub-block scales (pairs summed to int32), with independent accumulators and one
horizontal sum per 256 weights. About 1.6x the portable kernels' speed per core.

AVAILABLE says whether the host can run them (AVX2 and F16C, and Numba compiling for
the host CPU); the portable loops in ``_q8dot`` are used otherwise.

    q4k_isum(q, p0, p1, p2, p3, m_lo, m_hi, x, xb) -> (int32, int32)
        q: address of the 128 nibble bytes of a Q4_K super-block, p0..p3: its 8 six-bit
        scales, two per uint32 as int16 halves, m_lo, m_hi: its 8 mins, one per byte; x:
        address of its 256 int8 activations, xb: of their 16 int32 sums per 16 columns.
        Returns (sum_j scale_j * sum_{l<32} nibble_j[l] * x[32 j + l],
                 sum_j min_j * sum_{l<32} x[32 j + l]).
    q6k_isum(w, x, xb) -> int32
        w: address of a Q6_K super-block, x: its 256 int8 activations, xb: address of the
        16 int32 sums of x per 16 columns. Returns sum_g scale_g * sum_l (q[l] - 32) * x[l].
    q4k_isum4, q6k_isum4: the same for four tokens at once (weights decoded once).
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
def q4k_isum(typingctx, q, p0, p1, p2, p3, m_lo, m_hi, x, xb):
    """(sum_j scale_j * sum_l nibble_j[l] x[32 j + l], sum_j min_j * sum_l x[32 j + l]); the
    scales packed two per uint32 as int16 halves, the mins as the bytes of m_lo, m_hi."""
    def codegen(context, builder, signature, args):
        codes, splats = _q4k_weights(builder, args[0], args[1:5])
        mins = _q4k_mins(builder, args[5], args[6])
        out = [_isum(builder, codes, splats, args[7]), _msum(builder, mins, args[8])]
        return context.make_tuple(builder, signature.return_type, out)

    return types.UniTuple(types.int32, 2)(*_Q4K_ARGS, types.int64, types.int64), codegen


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


@intrinsic
def q6k_isum(typingctx, w, x, xb):
    def codegen(context, builder, signature, args):
        codes, splats, sc8 = _q6k_weights(builder, args[0])
        return builder.sub(_isum(builder, codes, splats, args[1]), _q6k_offset(builder, sc8, args[2]))

    return types.int32(types.int64, types.int64, types.int64), codegen


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
