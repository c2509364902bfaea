"""LLVM IR building blocks shared by the AVX2 and AVX-512 VNNI intrinsics.

Addresses are i64 values (the kernels pass raw addresses); loads are unaligned unless
the caller knows better.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils

I32 = ir.IntType(32)


def declare(builder, name: str, ret, args):
    """The function `name` (an LLVM intrinsic) of type ret(args), declared once per module."""
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def load(builder, addr, offset: int, typ):
    """The value of LLVM type `typ` (a vector or a scalar) at address addr + offset."""
    ptr = builder.inttoptr(builder.add(addr, ir.Constant(addr.type, offset)), typ.as_pointer())
    return builder.load(ptr, align=1)


def shuffle(builder, vec, indices):
    """vec's lanes picked by `indices` (one vector operand)."""
    mask = ir.Constant(ir.VectorType(I32, len(indices)), list(indices))
    return builder.shuffle_vector(vec, ir.Constant(vec.type, ir.Undefined), mask)


# Numba's fast-math pass gives every float instruction that has no flags of its own the
# caller's flags ("fast": reassociation and contraction included). The float arithmetic of
# the row dots must be the same sequence of roundings in every kernel that inlines them (a
# one-token GEMV and a many-token GEMM of the same row agree to the bit), so it carries a
# flag that permits neither: "nsz" (only the sign of a zero may change).
PINNED = ("nsz",)


def _pinned(instr):
    instr.flags.extend(PINNED)
    return instr


def fadd(builder, a, b):
    """a + b, rounded once, whatever the enclosing kernel's fast-math flags."""
    return _pinned(builder.fadd(a, b))


def fsub(builder, a, b):
    """a - b, rounded once (see fadd)."""
    return _pinned(builder.fsub(a, b))


def fmul(builder, a, b):
    """a * b, rounded once and never fused into an add (see fadd)."""
    return _pinned(builder.fmul(a, b))
