"""Scalar decoders for the small float fields inside GGUF blocks, usable from Numba code.

Numba has no float16 on the CPU and no scalar bit-cast, so ``f32_from_bits``
is an LLVM ``bitcast`` intrinsic and the decoders below build float32 values
from integer bit patterns. All are exact (f16 and bf16 embed in f32) and
branch-free enough for LLVM to vectorize loops that use them.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_POW2_112 = np.float32(2.0 ** 112)  # rebias f16 exponents (15) to f32 ones (127)


@intrinsic
def f32_from_bits(typingctx, u):
    """The float32 whose bit pattern is the low 32 bits of integer u."""
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        i32 = ir.IntType(32)
        if v.type.width > 32:
            v = builder.trunc(v, i32)
        elif v.type.width < 32:
            v = builder.zext(v, i32)
        return builder.bitcast(v, ir.FloatType())

    return types.float32(u), codegen


@intrinsic
def bits_of_f32(typingctx, x):
    """The bit pattern of float32 x, as a uint32: an integer, which fast-math cannot assume
    away (it lets LLVM treat a float as never NaN or Inf, and fold the float tests for them)."""
    if not isinstance(x, types.Float) or x.bitwidth != 32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(x), codegen


NON_FINITE = np.uint32(0x7F800000)  # exponent bits all set: Inf or NaN
EXPONENT_ONE = np.uint32(0x00800000)  # the exponent's lowest bit
QUIET_NAN = np.uint32(0x7FC00000)


@nb.njit(inline="always", cache=True)
def f16_to_f32(h):
    """IEEE half (bits in an integer 0..65535) to float32, subnormals, inf and NaN included."""
    em = np.uint32(h) & np.uint32(0x7FFF)
    # exponent and mantissa moved into f32 position read as 2^-112 times the value,
    # subnormal halves becoming f32 subnormals; one exact multiply rebiases them
    f = f32_from_bits(em << np.uint32(13)) * _POW2_112
    if em >= np.uint32(0x7C00):
        f = f32_from_bits((em << np.uint32(13)) | np.uint32(0x7F800000))
    if np.uint32(h) & np.uint32(0x8000):
        f = -f
    return f


@nb.njit(inline="always", cache=True)
def f16_at(w, o):
    """The little-endian f16 at byte o of uint8 array w, as float32."""
    return f16_to_f32(np.uint32(w[o]) | (np.uint32(w[o + 1]) << np.uint32(8)))


@nb.njit(inline="always", cache=True)
def bf16_to_f32(h):
    return f32_from_bits(np.uint32(h) << np.uint32(16))


@nb.njit(inline="always", cache=True)
def e8m0_half(e):
    """MXFP4's shared exponent byte e as the float32 2^(e-128) (the codebook is stored doubled)."""
    if e < 2:
        return f32_from_bits(np.uint32(0x00200000) << np.uint32(e))
    return f32_from_bits((np.uint32(e) - np.uint32(1)) << np.uint32(23))


@nb.njit(inline="always", cache=True)
def k4_scale(w, o, j):
    """6-bit scale of sub-block j from the 12-byte Q4_K/Q5_K scales field at w[o:]."""
    if j < 4:
        return np.int32(w[o + j] & 63)
    return np.int32((w[o + j + 4] & 15) | ((w[o + j - 4] >> 6) << 4))


@nb.njit(inline="always", cache=True)
def k4_min(w, o, j):
    """6-bit min of sub-block j from the 12-byte Q4_K/Q5_K scales field at w[o:]."""
    if j < 4:
        return np.int32(w[o + j + 4] & 63)
    return np.int32((w[o + j + 4] >> 4) | ((w[o + j] >> 6) << 4))


@intrinsic
def _u8_pointer(typingctx, addr):
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())

    return types.CPointer(types.uint8)(addr), codegen


@nb.njit(inline="always", cache=True)
def u8_at(addr, n):
    """The n bytes at address addr as a uint8 array. The caller keeps the memory alive."""
    return nb.carray(_u8_pointer(addr), n)
