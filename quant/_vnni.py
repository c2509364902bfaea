"""AVX-512 VNNI GEMM steps over weights repacked 16 rows at a time (see quant.repack).

Why repack: ``vpdpbusd`` multiplies 64 unsigned weight bytes by 64 signed activation
bytes and adds each 4 products into one of 16 int32 lanes: one instruction per 64
multiply-adds, the densest integer dot x86 has. In a GGUF row the 4-byte groups of one
vector would belong to different sub-blocks with different scales. Repacked, lane r of
every vector is row r of a 16-row group, so each lane holds one row's dot product over 4
columns, the activation bytes are broadcast to every lane, and a sub-block's scale is a
vector with one entry per row (one ``vpmulld`` per sub-block, not per weight).

Shape legend (per call of a step)
    G      one group of 16 rows: nsb blocks of BLOCK_BYTES[fmt] bytes at address w
    T      n_tok tokens (1, 2, 4 or 8), token t's data at base + t * stride
    xq     int8 [C]              activations quantized per 256 columns (quant._q8dot)
    xd     float32 [C / 256]     their scales
    xs     int16 [C / 32] (Q4_K) or [C / 16] (Q6_K): sums of xq over 32 or 16 columns
    out    float32 [16]          the 16 rows' results for token t, written (not added)

    q4k_x16_step{n}(w, nsb, xq, xq_stride, xs, xs_stride, xd, xd_stride, out, out_stride)
    q6k_x16_step{n}(...)         the same for Q6_K

The weights are decoded once per super-block for all n tokens; integer sums are exact
within a super-block, as in quant._q8dot, and each token keeps 16 float lanes (one per
row) across super-blocks. Each step prefetches two blocks ahead: the decode work per byte
is large enough that the hardware prefetcher alone leaves DRAM latency exposed (6 against
17 GB/s on one thread when measured).

AVAILABLE says whether the host runs them (AVX-512 F/BW/VL and VNNI, and Numba compiling
for the host CPU).
"""

from __future__ import annotations

import numba
from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._simd import _fn, _load, _load_scalar, _shuffle

ROWS = 16
BLOCK_BYTES = {"q4_k": 2368, "q6_k": 3392}  # as quant.repack
STEP_TOKENS = (8, 4, 2, 1)
PREFETCH_BLOCKS = 2


def _host_has_vnni() -> bool:
    if numba.config.CPU_NAME not in (None, "host"):
        return False
    try:
        features = llvm.get_host_cpu_features()
    except RuntimeError:
        return False
    return all(features.get(f) for f in ("avx512f", "avx512bw", "avx512vl", "avx512vnni", "f16c"))


AVAILABLE = _host_has_vnni()

_i8, _i16, _i32, _f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
_V64I8 = ir.VectorType(_i8, 64)
_V32I16 = ir.VectorType(_i16, 32)
_V16I32 = ir.VectorType(_i32, 16)
_V16F32 = ir.VectorType(_f32, 16)
_V16I8 = ir.VectorType(_i8, 16)
_V16F16 = ir.VectorType(ir.HalfType(), 16)
_ZERO = ir.Constant(_V16I32, None)


def _bytes(v: int):
    return ir.Constant(_V64I8, [v] * 64)


def _dpbusd(b, acc, u8, x4):
    """acc + per lane, the 4 unsigned bytes of u8 times the 4 signed bytes of x4."""
    f = _fn(b, "llvm.x86.avx512.vpdpbusd.512", _V16I32, [_V16I32, _V16I32, _V16I32])
    return b.call(f, [acc, b.bitcast(u8, _V16I32), x4])


def _dpwssd(b, acc, a, c):
    """acc + per lane, the two int16 of a times those of c (LLVM emits vpdpwssd)."""
    f = _fn(b, "llvm.x86.avx512.pmaddw.d.512", _V16I32, [_V32I16, _V32I16])
    return b.add(acc, b.call(f, [b.bitcast(a, _V32I16), b.bitcast(c, _V32I16)]))


def _splat(b, scalar, vtype):
    vec = b.insert_element(ir.Constant(vtype, ir.Undefined), scalar, ir.Constant(_i32, 0))
    return _shuffle(b, vec, [0] * vtype.count)


def _bcast4(b, addr, offset: int):
    """The 4 bytes (or two int16) at addr + offset, in every lane."""
    return _splat(b, _load_scalar(b, addr, offset, _i32), _V16I32)


def _pairs(b, addr, offset: int, signed: bool):
    """Two runs of 16 bytes at addr + offset as int16 pairs: lane r holds (run0[r], run1[r])."""
    v = _load(b, addr, offset, ir.VectorType(_i8, 32))
    v = (b.sext if signed else b.zext)(v, _V32I16)
    return b.bitcast(_shuffle(b, v, [x for r in range(16) for x in (r, 16 + r)]), _V16I32)


def _lanes_i32(b, addr, offset: int, signed: bool):
    return (b.sext if signed else b.zext)(_load(b, addr, offset, _V16I8), _V16I32)


def _halves(b, addr, offset: int):
    return b.fpext(_load(b, addr, offset, _V16F16), _V16F32)


def _prefetch(b, blk, block_bytes: int, part: int = 0, parts: int = 1):
    """Prefetch part `part` of `parts` of the block PREFETCH_BLOCKS ahead of blk."""
    f = _fn(b, "llvm.prefetch.p0", ir.VoidType(), [_i8.as_pointer(), _i32, _i32, _i32])
    lines = range(0, block_bytes, 64)
    per = -(-len(lines) // parts)
    for line in lines[part * per:(part + 1) * per]:
        addr = b.add(blk, ir.Constant(blk.type, PREFETCH_BLOCKS * block_bytes + line))
        b.call(f, [b.inttoptr(addr, _i8.as_pointer()), ir.Constant(_i32, 0), ir.Constant(_i32, 3),
                   ir.Constant(_i32, 1)])


def _q4k_block(b, blk, xq, xs, xd, add):
    """One Q4_K block times each token: add(t, <16 x float>) receives the terms. Layout: d f16
    [16], dmin f16 [16], scales u8 [8][16], mins u8 [8][16], then for chunk k < 4 and 4-column
    group i < 8 a 64-byte vector whose low nibbles are sub-block 2k, columns 4i..4i+3, high
    nibbles 2k+1. The mins' term goes out first, so that only one int32 vector per token stays
    live through the sub-block loop (eight tokens' decoded weights and sums fill the registers)."""
    n = len(xq)
    d, dmin = _halves(b, blk, 0), _halves(b, blk, 32)
    msum = [_ZERO] * n
    for m in range(4):
        mins = _pairs(b, blk, 192 + 32 * m, signed=False)  # (min 2m, min 2m + 1) per row
        for t in range(n):
            msum[t] = _dpwssd(b, msum[t], mins, _bcast4(b, xs[t], 4 * m))
    for t in range(n):
        add(t, b.fneg(b.fmul(b.sitofp(msum[t], _V16F32), b.fmul(dmin, _splat(b, xd[t], _V16F32)))))
    isum = [_ZERO] * n
    for j in range(8):
        _prefetch(b, blk, BLOCK_BYTES["q4_k"], j, 8)
        k, high = divmod(j, 2)
        sc = _lanes_i32(b, blk, 64 + 16 * j, signed=False)
        codes = []
        for i in range(8):
            qv = _load(b, blk, 320 + 512 * k + 64 * i, _V64I8)
            codes.append(b.lshr(qv, _bytes(4)) if high else b.and_(qv, _bytes(15)))
        for t in range(n):
            p = _ZERO
            for i in range(8):
                p = _dpbusd(b, p, codes[i], _bcast4(b, xq[t], 32 * j + 4 * i))
            isum[t] = b.add(isum[t], b.mul(p, sc))
    for t in range(n):
        add(t, b.fmul(b.sitofp(isum[t], _V16F32), b.fmul(d, _splat(b, xd[t], _V16F32))))


def _q6k_block(b, blk, xq, xs, xd, add):
    """One Q6_K block times each token, the terms to add(t, <16 x float>). Layout: d f16 [16],
    scales i8 [16][16], then per 32 columns p < 8, four low-bit vectors (i: low nibbles are
    4-column group 8 p + i, high nibbles group 8 p + 4 + i) and two high-bit vectors (u: bits 2 q,
    2 q + 1 are the top bits of group 8 p + 2 q + u). Each vector is used within its 32 columns
    only, so no decoded value stays live across the loop. Codes are stored offset by 32, which
    comes off through the activations' 16-column sums: they start each token's integer sum."""
    n = len(xq)
    off = [_ZERO] * n
    for m in range(8):
        scales = _pairs(b, blk, 32 + 32 * m, signed=True)  # (scale 2m, scale 2m + 1) per row
        for t in range(n):
            off[t] = _dpwssd(b, off[t], scales, _bcast4(b, xs[t], 4 * m))
    isum = [b.sub(_ZERO, b.shl(o, ir.Constant(_V16I32, [5] * 16))) for o in off]  # -32 * offsets
    for p in range(8):
        _prefetch(b, blk, BLOCK_BYTES["q6_k"], p, 8)
        base = 288 + 384 * p
        low = [_load(b, blk, base + 64 * i, _V64I8) for i in range(4)]
        high = [_load(b, blk, base + 256 + 64 * u, _V64I8) for u in range(2)]
        codes = []
        for e in range(8):
            lo = low[e % 4]
            lo = b.lshr(lo, _bytes(4)) if e >= 4 else b.and_(lo, _bytes(15))
            q = e // 2
            hi = high[e % 2]
            hi = b.shl(b.and_(hi, _bytes(3 << 2 * q)), _bytes(4 - 2 * q)) if q < 2 else \
                b.and_(b.lshr(hi, _bytes(2 * q - 4)), _bytes(48))
            codes.append(b.or_(lo, hi))
        for j in (2 * p, 2 * p + 1):
            sc = _lanes_i32(b, blk, 32 + 16 * j, signed=True)
            for t in range(n):
                acc = _ZERO
                for i in range(4):
                    acc = _dpbusd(b, acc, codes[4 * (j % 2) + i], _bcast4(b, xq[t], 16 * j + 4 * i))
                isum[t] = b.add(isum[t], b.mul(acc, sc))
    d = _halves(b, blk, 0)
    for t in range(n):
        add(t, b.fmul(b.sitofp(isum[t], _V16F32), b.fmul(d, _splat(b, xd[t], _V16F32))))


_FORMATS = {"q4_k": (_q4k_block, 16), "q6_k": (_q6k_block, 32)}  # decoder, xs bytes per block


def _step(fmt: str, n_tok: int):
    block_bytes = BLOCK_BYTES[fmt]
    decode, xs_bytes = _FORMATS[fmt]

    def codegen(context, builder, signature, args):
        w, nsb, xq, xq_stride, xs, xs_stride, xd, xd_stride, out, out_stride = args
        b = builder

        def token(base, stride, t):
            return b.add(base, b.mul(stride, ir.Constant(stride.type, t)))

        # each token's 16 results accumulate in out itself: kept in registers, they would push
        # the decoded weights out of them (8 tokens x 16 lanes) and cost spills per sub-block
        outs = [b.inttoptr(token(out, out_stride, t), _V16F32.as_pointer()) for t in range(n_tok)]
        for ptr in outs:
            b.store(ir.Constant(_V16F32, None), ptr, align=4)

        def add(t, term):
            b.store(b.fadd(b.load(outs[t], align=4), term), outs[t], align=4)

        with cgutils.for_range(b, nsb) as loop:
            s = loop.index

            def at(base, stride, t):
                return b.add(token(base, {"xq": xq_stride, "xs": xs_stride, "xd": xd_stride}[stride], t),
                             b.mul(s, ir.Constant(s.type, {"xq": 256, "xs": xs_bytes, "xd": 4}[stride])))

            blk = b.add(w, b.mul(s, ir.Constant(s.type, block_bytes)))
            decode(b, blk, [at(xq, "xq", t) for t in range(n_tok)], [at(xs, "xs", t) for t in range(n_tok)],
                   [_load_scalar(b, at(xd, "xd", t), 0, _f32) for t in range(n_tok)], add)
        return context.get_dummy_value()

    return codegen


_SIG = types.none(*([types.int64] * 10))


def _make(fmt: str, n_tok: int):
    def step(typingctx, w, nsb, xq, xq_stride, xs, xs_stride, xd, xd_stride, out, out_stride):
        return _SIG, _step(fmt, n_tok)

    step.__name__ = f"{fmt.replace('_', '')}_x16_step{n_tok}"
    return intrinsic(step)


q4k_x16_step8, q4k_x16_step4, q4k_x16_step2, q4k_x16_step1 = (_make("q4_k", n) for n in STEP_TOKENS)
q6k_x16_step8, q6k_x16_step4, q6k_x16_step2, q6k_x16_step1 = (_make("q6_k", n) for n in STEP_TOKENS)
