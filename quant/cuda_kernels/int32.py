"""32-bit integer helpers of the row kernels, as LLVM IR, with their plain-Python meaning.

numba widens every integer operation to 64 bits, and a card runs 64-bit multiplies and shifts
as several instructions. The row kernels' inner loops decode Q4_K scales and multiply integer
sums by them on every super-block; these helpers do it in 32-bit instructions:

    dot4(a, b, c)            c + the four signed byte products of a and b (dp4a.s32.s32)
    imad32(a, b, c)          a * b + c in 32 bits
    k4_scale_min(s0, s1, s2, j)   (scale, min) of sub-block j of a Q4_K / Q5_K super-block
                             whose 12 scale bytes are the words s0, s1, s2 (ggml's get_scale_min_k4)

Each has a `_py` twin that computes the same with Python's integers: numba's simulator runs
those, and tests compare the IR against them on the CPU (`intrinsics(numba.core.extending.
intrinsic)` compiles there too; dp4a is PTX and has no CPU form).
"""

from __future__ import annotations


def dot4_py(a, b, c):
    """Spelled out with masks alone (the same value for Python, numpy and numba ints)."""
    for k in range(4):
        ak = (a >> (8 * k)) & 255
        bk = (b >> (8 * k)) & 255
        c += (ak - ((ak & 128) << 1)) * (bk - ((bk & 128) << 1))
    return c


def imad32_py(a, b, c):
    return a * b + c  # the kernels' values stay far inside 32 bits


def k4_scale_min_py(s0, s1, s2, j):
    sh = 8 * (j & 3)
    a0 = (s0 >> sh) & 255
    a1 = (s1 >> sh) & 255
    a2 = (s2 >> sh) & 255
    if j < 4:
        return a0 & 63, a1 & 63
    return (a2 & 15) | ((a0 >> 6) << 4), (a2 >> 4) | ((a1 >> 6) << 4)


def intrinsics(intrinsic):
    """(imad32, k4_scale_min) as numba intrinsics made with the `intrinsic` decorator given
    (numba.cuda.extending's for the kernels, numba.core.extending's to test on the CPU)."""
    from llvmlite import ir
    from numba import types as nt

    i32 = ir.IntType(32)

    def c32(v):
        return ir.Constant(i32, v)

    def low32(context, builder, sig, args):
        return [context.cast(builder, v, t, nt.int32) for v, t in zip(args, sig.args)]

    def ints(*vs):
        return all(isinstance(v, nt.Integer) for v in vs)

    @intrinsic
    def imad32(typingctx, a, b, c):
        if not ints(a, b, c):
            return None

        def codegen(context, builder, sig, args):
            x, y, z = low32(context, builder, sig, args)
            return builder.add(builder.mul(x, y), z)

        return nt.int32(a, b, c), codegen

    @intrinsic
    def k4_scale_min(typingctx, s0, s1, s2, j):
        if not ints(s0, s1, s2, j):
            return None

        def codegen(context, builder, sig, args):
            w0, w1, w2, jj = low32(context, builder, sig, args)
            sh = builder.shl(builder.and_(jj, c32(3)), c32(3))
            a0, a1, a2 = (builder.and_(builder.lshr(w, sh), c32(255)) for w in (w0, w1, w2))
            lo_sc, lo_m = builder.and_(a0, c32(63)), builder.and_(a1, c32(63))
            hi_sc = builder.or_(builder.and_(a2, c32(15)), builder.shl(builder.lshr(a0, c32(6)), c32(4)))
            hi_m = builder.or_(builder.lshr(a2, c32(4)), builder.shl(builder.lshr(a1, c32(6)), c32(4)))
            low = builder.icmp_unsigned("<", jj, c32(4))
            pair = [builder.select(low, lo_sc, hi_sc), builder.select(low, lo_m, hi_m)]
            return context.make_tuple(builder, sig.return_type, pair)

        return nt.UniTuple(nt.int32, 2)(s0, s1, s2, j), codegen

    return imad32, k4_scale_min


def dp4a_intrinsic(intrinsic):
    """dot4 as the card's one instruction (inline PTX)."""
    from llvmlite import ir
    from numba import types as nt

    @intrinsic
    def dp4a(typingctx, a, b, c):
        if not all(isinstance(v, nt.Integer) for v in (a, b, c)):
            return None

        def codegen(context, builder, sig, args):
            i32 = ir.IntType(32)
            vals = [context.cast(builder, v, t, nt.int32) for v, t in zip(args, sig.args)]  # low 32 bits
            asm = ir.InlineAsm(ir.FunctionType(i32, [i32, i32, i32]), "dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r")
            return builder.call(asm, vals)

        return nt.int32(a, b, c), codegen

    return dp4a
