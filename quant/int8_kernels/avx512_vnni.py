"""AVX-512 VNNI GEMM steps: 16 GGUF rows at a time, for 1 to 8 tokens.

Why 16 rows: ``vpdpbusd`` multiplies 64 unsigned weight bytes by 64 signed activation
bytes and adds each 4 products into one of 16 int32 lanes: one instruction per 64
multiply-adds, the densest integer dot x86 has. When lane r of every weight vector is row r
of a 16-row group, each lane holds one row's dot product over 4 columns, the 4 activation
bytes are broadcast to every lane, and a sub-block's scale is a vector with one entry per
row (one ``vpmulld`` per sub-block, not per weight).

The vectors come straight from the GGUF rows: 16 rows' 64-byte runs are loaded and
transposed in registers (a 16 x 16 transpose of 4-byte words: 64 two-input shuffles), and
the per-row scales are gathered into lanes. No repacking and no second copy of the
weights; on the bench shapes an 8-token GEMM costs 1.8-2.2x the one-token GEMV
(quant.bench). (A repacked 16-row layout measured 1.2-1.5x, but needs a second copy of
every matrix, or a repack on every expert read: it was removed.)

Shape legend (per call of a step)
    G      one group of 16 GGUF rows of row_bytes each, the first at w
    T      n_tok tokens (1, 2, 4 or 8), token t's data at base + t * stride
    xq     int8 [C]              activations quantized per 256 columns (int8_kernels.row_dot)
    xd     float32 [C / 256]     their scales
    xs     int16 [C / 32] (Q4_K) or [C / 16] (Q6_K): sums of xq over 32 or 16 columns
    out    float32 [16]          the 16 rows' results for token t, written (not added)

    step_codegen(fmt, n)(context, builder, signature, args): a step's code for format fmt and n
        tokens, args the 11 int64 (w, row_bytes, nsb, xq, xq_stride, xs, xs_stride, xd, xd_stride,
        out, out_stride); step_library compiles each format's four into a library of its own

The weights are decoded once per super-block for all n tokens; integer sums are exact
within a super-block, as in int8_kernels.row_dot, and each token's 16 results accumulate in
out across super-blocks, each float step rounded once whatever the caller's fast-math flags
(llvm_ir.PINNED): the AVX2 row dots make the same roundings, so a row's product is the same
from the GEMM (any step) and from the one-token GEMV. Software prefetch keeps one stream per thread ahead of the decode
(the next group's rows, a slice per block, into L2): the decode work per byte is large enough
that the hardware prefetcher alone leaves DRAM latency exposed (6 against 17 GB/s on one
thread when measured). The GEMV runs the one-token step for most formats (gemv_gemm.row_blocks).

AVAILABLE says whether Numba compiles them here (AVX-512 F/BW/VL and VNNI on, see
quant.jit.compiles_for); nothing may call them otherwise, as LLVM aborts on the intrinsics.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba.core import cgutils

from gguf import GGMLQuantizationType as T

from ..formats import IQ4_NL_VALUES
from ..iq_grids import GRIDS
from ..jit import compiles_for
from .blocks32 import LAYOUTS, Layout
from .llvm_ir import declare, fadd, fmul, fsub, load, shuffle

ROWS = 16
GGUF_BYTES = {"q4_k": 144, "q6_k": 210, "q5_k": 176, "q3_k": 110, "q2_k": 84, "iq4_xs": 136,
              "q4_0": 144, "q4_1": 160, "q5_0": 176, "q5_1": 192, "iq4_nl": 144, "q8_0": 272, "iq3_s": 110}
STEP_TOKENS = (8, 4, 2, 1)
IQ3S_WORDS = [int(w) for w in GRIDS[T.IQ3_S].astype(np.uint8).view(np.uint32).reshape(-1)]  # 512 grid rows


AVAILABLE = compiles_for("avx512f", "avx512bw", "avx512vl", "avx512vnni", "f16c")
GFNI = AVAILABLE and compiles_for("gfni")  # bit moves in one instruction (Zen 4, Ice Lake on; not Cascade Lake)

_i8, _i16, _i32, _f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
_V64I8 = ir.VectorType(_i8, 64)
_V32I16 = ir.VectorType(_i16, 32)
_V16I32 = ir.VectorType(_i32, 16)
_V16F32 = ir.VectorType(_f32, 16)
_V16F16 = ir.VectorType(ir.HalfType(), 16)
_ZERO = ir.Constant(_V16I32, None)


def _bytes(v: int):
    return ir.Constant(_V64I8, [v] * 64)


def _dpbusd(b, acc, u8, x4):
    """acc + per lane, the 4 unsigned bytes of u8 times the 4 signed bytes of x4."""
    f = declare(b, "llvm.x86.avx512.vpdpbusd.512", _V16I32, [_V16I32, _V16I32, _V16I32])
    return b.call(f, [acc, b.bitcast(u8, _V16I32), x4])


def _dpwssd(b, acc, a, c):
    """acc + per lane, the two int16 of a times those of c (LLVM emits vpdpwssd)."""
    f = declare(b, "llvm.x86.avx512.pmaddw.d.512", _V16I32, [_V32I16, _V32I16])
    return b.add(acc, b.call(f, [b.bitcast(a, _V32I16), b.bitcast(c, _V32I16)]))


def _splat(b, scalar, vtype):
    vec = b.insert_element(ir.Constant(vtype, ir.Undefined), scalar, ir.Constant(_i32, 0))
    return shuffle(b, vec, [0] * vtype.count)


def _bcast4(b, addr, offset: int):
    """The 4 bytes (or two int16) at addr + offset, in every lane."""
    return _splat(b, load(b, addr, offset, _i32), _V16I32)


def _c32(v: int):
    return ir.Constant(_V16I32, [v] * 16)


def _moved_bits(b, v, moves: dict):
    """Each byte of v (<64 x i8>) with bit moves[o] moved to bit o for each o, the other bits
    cleared: one GFNI affine transform (output bit o is the parity of the byte and matrix byte
    7 - o). With byte shifts and masks instead, Q5_K's fifth bits took a third of its step's
    time (one-token step from L2: 19.5 against 27.9 GB/s without them, measured)."""
    f = declare(b, "llvm.x86.vgf2p8affineqb.512", _V64I8, [_V64I8, _V64I8, _i8])
    rows = [0] * 8
    for o, i in moves.items():
        rows[7 - o] = 1 << i
    return b.call(f, [v, ir.Constant(_V64I8, rows * 8), ir.Constant(_i8, 0)])


def _prefetch(b, addr, nbytes: int, part: int, parts: int):
    """Prefetch part `part` of `parts` of the nbytes at addr (an i64 address), into L2
    (prefetcht1): into L1 (prefetcht0), a one-token step over weights in memory ran at half the
    rate (IQ4_NL [8192, 512], one thread: 7.4 against 14.5 GB/s; no prefetch 5.6, measured),
    and prefill was no faster."""
    f = declare(b, "llvm.prefetch.p0", ir.VoidType(), [_i8.as_pointer(), _i32, _i32, _i32])
    lines = range(0, nbytes, 64)
    per = -(-len(lines) // parts)
    for line in lines[part * per:(part + 1) * per]:
        ptr = b.inttoptr(b.add(addr, ir.Constant(addr.type, line)), _i8.as_pointer())
        b.call(f, [ptr, ir.Constant(_i32, 0), ir.Constant(_i32, 2), ir.Constant(_i32, 1)])


def _transpose16(b, rows):
    """16 vectors <16 x i32> (row r, word c) -> 16 vectors (word c, row r): four rounds, each
    swapping the off-diagonal k x k blocks of every 2k x 2k block with two-input shuffles."""
    rows = list(rows)
    for k in (8, 4, 2, 1):
        low = ir.Constant(ir.VectorType(_i32, 16), [c if c & k == 0 else 16 + c - k for c in range(16)])
        high = ir.Constant(ir.VectorType(_i32, 16), [c + k if c & k == 0 else 16 + c for c in range(16)])
        new = list(rows)
        for i in range(16):
            if not i & k:
                new[i] = b.shuffle_vector(rows[i], rows[i + k], low)
                new[i + k] = b.shuffle_vector(rows[i], rows[i + k], high)
        rows = new
    return rows


def _lanes_at(b, addrs, offset: int, typ, vtype):
    """<16 x typ>: the scalar at addrs[r] + offset in lane r."""
    v = ir.Constant(vtype, ir.Undefined)
    for r, a in enumerate(addrs):
        v = b.insert_element(v, load(b, a, offset, typ), ir.Constant(_i32, r))
    return v


def _half_lanes(b, v16):
    """<16 x i16> of IEEE halves -> <16 x float>."""
    return b.fpext(b.bitcast(v16, _V16F16), _V16F32)


# ---------------------------------------------------------------- 16 GGUF rows as lane vectors
# A Q4_K source gives d, dmin (<16 x float>), scale(j) (<16 x i32>, sub-block j < 8),
# minpair(m) (<16 x i32>: the mins of sub-blocks 2m, 2m+1 as int16 pairs), raw(k) (the 8
# vectors <64 x i8> of 32-byte chunk k of qs, whose low nibbles are sub-block 2k and high
# nibbles 2k+1) and prefetch(part, parts). A Q6_K source gives d, scale(j) (j < 16),
# scalepair(m) (m < 8) and codes(p) (the 8 vectors of 6-bit codes of columns 32p .. 32p+31,
# 4 columns each).


class _Q4KRows:
    """Super-block s of 16 GGUF Q4_K rows: addrs[r] is row r's block; ahead is the address
    of this block's slice of the next group (prefetched)."""

    QS = 16  # the byte offset of qs

    def __init__(self, b, addrs, ahead):
        self.b, self.addrs, self.ahead = b, addrs, ahead
        self.chunks = {}
        self._header([_lanes_at(b, addrs, 4 * i, _i32, _V16I32) for i in range(4)])

    def _header(self, words):
        """d, dmin and the packed scales from the super-block's words 0 .. 3, each <16 x i32>."""
        b = self.b
        self.d = _half_lanes(b, b.trunc(words[0], ir.VectorType(_i16, 16)))
        self.dmin = _half_lanes(b, b.trunc(b.lshr(words[0], _c32(16)), ir.VectorType(_i16, 16)))
        self.u = words[1:4]

    def _byte(self, i, k):
        return self.b.and_(self.b.lshr(self.u[i], _c32(8 * k)), _c32(255))

    def scale(self, j):
        b = self.b
        if j < 4:
            return b.and_(self._byte(0, j), _c32(63))
        return b.or_(b.and_(self._byte(2, j - 4), _c32(15)), b.shl(b.lshr(self._byte(0, j - 4), _c32(6)), _c32(4)))

    def _min(self, j):
        b = self.b
        if j < 4:
            return b.and_(self._byte(1, j), _c32(63))
        return b.or_(b.lshr(self._byte(2, j - 4), _c32(4)), b.shl(b.lshr(self._byte(1, j - 4), _c32(6)), _c32(4)))

    def minpair(self, m):
        return self.b.or_(self._min(2 * m), self.b.shl(self._min(2 * m + 1), _c32(16)))

    def raw(self, k):
        half = k // 2  # qs bytes 64 half .. 64 half + 63: words 16 half + 8 (k % 2) + i
        if half not in self.chunks:
            self.chunks[half] = _transpose16(self.b, [load(self.b, a, self.QS + 64 * half, _V16I32) for a in self.addrs])
        return [self.b.bitcast(v, _V64I8) for v in self.chunks[half][8 * (k % 2): 8 * (k % 2) + 8]]

    def prefetch(self, part, parts):
        _prefetch(self.b, self.ahead, ROWS * GGUF_BYTES["q4_k"], part, parts)


def _q6_high(b, v, q: int):
    """Bits 2q, 2q + 1 of each byte of v, moved to bits 4, 5 (the other bits cleared). (A GFNI
    affine transform here, as Q5_K's, measured no faster: Q6_K's step is not bound by it.)"""
    if q < 2:
        return b.shl(b.and_(v, _bytes(3 << 2 * q)), _bytes(4 - 2 * q))
    return b.and_(b.lshr(v, _bytes(2 * q - 4)), _bytes(48))


class _Q6KRows:
    """Super-block s of 16 GGUF Q6_K rows (see _Q4KRows). GGUF column 128 h + 32 k + l has its
    low nibble in ql word 16 h + 8 (k % 2) + l / 4 (shifted by 4 (k / 2)) and its top bits in
    qh word 8 h + l / 4 (shifted by 2 k); the 16 int8 scales are words 48 .. 51."""

    def __init__(self, b, addrs, ahead):
        self.b, self.addrs, self.ahead = b, addrs, ahead
        self.d = _half_lanes(b, _lanes_at(b, addrs, 208, _i16, ir.VectorType(_i16, 16)))
        self.sc = [_lanes_at(b, addrs, 192 + 4 * i, _i32, _V16I32) for i in range(4)]
        self.chunks = {}

    def scale(self, j):
        b = self.b
        return b.ashr(b.shl(self.sc[j // 4], _c32(24 - 8 * (j % 4))), _c32(24))

    def scalepair(self, m):
        return self.b.or_(self.b.and_(self.scale(2 * m), _c32(0xFFFF)), self.b.shl(self.scale(2 * m + 1), _c32(16)))

    def _chunk(self, i):  # 0, 1: ql halves; 2: qh
        if i not in self.chunks:
            self.chunks[i] = _transpose16(self.b, [load(self.b, a, 64 * i, _V16I32) for a in self.addrs])
        return self.chunks[i]

    def codes(self, p):
        b = self.b
        h, k = divmod(p, 4)
        out = []
        for e in range(8):
            lo = b.bitcast(self._chunk(h)[8 * (k % 2) + e], _V64I8)
            lo = b.and_(b.lshr(lo, _bytes(4)) if k >= 2 else lo, _bytes(15))
            hi = b.bitcast(self._chunk(2)[8 * h + e], _V64I8)
            out.append(b.or_(lo, _q6_high(b, hi, k)))
        return out

    def prefetch(self, part, parts):
        _prefetch(self.b, self.ahead, ROWS * GGUF_BYTES["q6_k"], part, parts)


class _Q5KRows(_Q4KRows):
    """Super-block s of 16 GGUF Q5_K rows: Q4_K's fields with qs at 48, and bit j of qh[l] (at
    16) the fifth bit of weight l of sub-block j. codes(j): the 8 code vectors (0..31) of
    sub-block j, column 32 j + 4 i + c in byte c of lane r of vector i."""

    QS = 48

    def __init__(self, b, addrs, ahead):
        """The first 64 bytes of the rows, transposed once, hold both the header (words 0 .. 3)
        and qh (words 4 .. 11): one transpose instead of 64 lane inserts for the header and a
        second transpose for qh."""
        self.b, self.addrs, self.ahead = b, addrs, ahead
        words = _transpose16(b, [load(b, a, 0, _V16I32) for a in addrs])
        self.chunks = {"qh": words[4:12]}
        self._header(words[:4])

    def codes(self, j):
        b = self.b
        k, high = divmod(j, 2)
        low = [b.lshr(q, _bytes(4)) if high else b.and_(q, _bytes(15)) for q in self.raw(k)]
        out = []
        for i, q in enumerate(low):
            hb = b.bitcast(self.chunks["qh"][i], _V64I8)
            if GFNI:
                out.append(b.or_(q, _moved_bits(b, hb, {4: j})))
                continue
            moved = b.shl(hb, _bytes(4 - j)) if j <= 4 else b.lshr(hb, _bytes(j - 4))
            out.append(b.or_(q, b.and_(moved, _bytes(16))))
        return out

    def prefetch(self, part, parts):
        _prefetch(self.b, self.ahead, ROWS * GGUF_BYTES["q5_k"], part, parts)


class _Q2KRows:
    """Super-block s of 16 GGUF Q2_K rows (see _Q4KRows): the 16 bytes at 0 hold scale (low
    nibble) and min (high nibble) of each 16-column sub-block, qs (64 bytes at 16) the 2-bit
    codes, column 128 h + 32 g + l in bits 2 g of qs byte 32 h + l; d at 80, dmin at 82.
    codes(p): the 8 code vectors (0..3) of columns 32 p .. 32 p + 31, 4 columns each."""

    def __init__(self, b, addrs, ahead):
        self.b, self.addrs, self.ahead = b, addrs, ahead
        self.d = _half_lanes(b, _lanes_at(b, addrs, 80, _i16, ir.VectorType(_i16, 16)))
        self.dmin = _half_lanes(b, _lanes_at(b, addrs, 82, _i16, ir.VectorType(_i16, 16)))
        self.sc = [_lanes_at(b, addrs, 4 * i, _i32, _V16I32) for i in range(4)]
        self.qs = None

    def _byte(self, j):
        return self.b.and_(self.b.lshr(self.sc[j // 4], _c32(8 * (j % 4))), _c32(255))

    def scale(self, j):
        return self.b.and_(self._byte(j), _c32(15))

    def minpair(self, m):
        b = self.b
        return b.or_(b.lshr(self._byte(2 * m), _c32(4)), b.shl(b.lshr(self._byte(2 * m + 1), _c32(4)), _c32(16)))

    def codes(self, p):
        b = self.b
        if self.qs is None:
            self.qs = _transpose16(b, [load(b, a, 16, _V16I32) for a in self.addrs])
        h, g = divmod(p, 4)
        return [b.and_(b.lshr(v, _bytes(2 * g)) if g else v, _bytes(3))
                for v in (b.bitcast(w, _V64I8) for w in self.qs[8 * h:8 * h + 8])]

    def prefetch(self, part, parts):
        _prefetch(self.b, self.ahead, ROWS * GGUF_BYTES["q2_k"], part, parts)


class _Q3KRows:
    """Super-block s of 16 GGUF Q3_K rows (see _Q4KRows): hmask (32 bytes at 0), qs (64 bytes
    at 32) as Q2_K's, the 16 six-bit scales packed in 12 bytes at 96, d at 108. codes(p): the 8
    code vectors of columns 32 p .. 32 p + 31, each code low | high << 2 (0..7: the stored
    signed code plus 4), high bit p of hmask byte l. scale(j): sub-block j's scale minus 32."""

    def __init__(self, b, addrs, ahead):
        self.b, self.addrs, self.ahead = b, addrs, ahead
        self.d = _half_lanes(b, _lanes_at(b, addrs, 108, _i16, ir.VectorType(_i16, 16)))
        self.u = [_lanes_at(b, addrs, 96 + 4 * i, _i32, _V16I32) for i in range(3)]
        self.chunks = {}

    def scale(self, j):
        b = self.b
        lo = b.and_(b.lshr(self.u[(j % 8) // 4], _c32(8 * (j % 4) + 4 * (j // 8))), _c32(15))
        hi = b.and_(b.lshr(self.u[2], _c32(8 * (j % 4) + 2 * (j // 4))), _c32(3))
        return b.sub(b.or_(lo, b.shl(hi, _c32(4))), _c32(32))

    def scalepair(self, m):
        return self.b.or_(self.b.and_(self.scale(2 * m), _c32(0xFFFF)), self.b.shl(self.scale(2 * m + 1), _c32(16)))

    def _chunk(self, offset):  # 0: hmask (words 0..7); 32: qs
        if offset not in self.chunks:
            self.chunks[offset] = _transpose16(self.b, [load(self.b, a, offset, _V16I32) for a in self.addrs])
        return self.chunks[offset]

    def codes(self, p):
        b = self.b
        h, g = divmod(p, 4)
        out = []
        for e in range(8):
            q = b.bitcast(self._chunk(32)[8 * h + e], _V64I8)
            low = b.and_(b.lshr(q, _bytes(2 * g)) if g else q, _bytes(3))
            hm = b.bitcast(self._chunk(0)[e], _V64I8)
            high = b.shl(hm, _bytes(2 - p)) if p <= 2 else b.lshr(hm, _bytes(p - 2))
            out.append(b.or_(low, b.and_(high, _bytes(4))))
        return out

    def prefetch(self, part, parts):
        _prefetch(self.b, self.ahead, ROWS * GGUF_BYTES["q3_k"], part, parts)


class _IQ4XSRows:
    """Super-block s of 16 GGUF IQ4_XS rows (see _Q4KRows): d at 0, the scales' high bits (u16 at
    2) and low nibbles (4 bytes at 4), qs (128 bytes at 8): sub-block j's 32 codes are the low
    then the high nibbles of qs bytes 16 j .. 16 j + 15. codes(j): its 8 vectors, columns
    32 j + 4 i .. + 3 in vector i, as unsigned bytes: the IQ4_NL value plus 128 (1 .. 241).
    scale(j): its scale minus 32; scalepair(m): sub-blocks 2m, 2m+1's as int16 pairs."""

    def __init__(self, b, addrs, ahead):
        self.b, self.addrs, self.ahead = b, addrs, ahead
        head = _lanes_at(b, addrs, 0, _i32, _V16I32)
        self.d = _half_lanes(b, b.trunc(head, ir.VectorType(_i16, 16)))
        self.high = b.lshr(head, _c32(16))
        self.low = _lanes_at(b, addrs, 4, _i32, _V16I32)
        self.chunks = {}

    def scale(self, j):
        b = self.b
        lo = b.and_(b.lshr(self.low, _c32(4 * j)), _c32(15))
        hi = b.and_(b.lshr(self.high, _c32(2 * j)), _c32(3))
        return b.sub(b.or_(lo, b.shl(hi, _c32(4))), _c32(32))

    def scalepair(self, m):
        return self.b.or_(self.b.and_(self.scale(2 * m), _c32(0xFFFF)), self.b.shl(self.scale(2 * m + 1), _c32(16)))

    def codes(self, j):
        b = self.b
        h = j // 4
        if h not in self.chunks:
            self.chunks[h] = _transpose16(b, [load(b, a, 8 + 64 * h, _V16I32) for a in self.addrs])
        table = ir.Constant(_V64I8, [(v + 128) & 255 for v in IQ4_NL_VALUES] * 4)
        pshufb = declare(b, "llvm.x86.avx512.pshuf.b.512", _V64I8, [_V64I8, _V64I8])
        words = [b.bitcast(v, _V64I8) for v in self.chunks[h][4 * (j % 4):4 * (j % 4) + 4]]
        nibbles = [b.and_(v, _bytes(15)) for v in words] + [b.lshr(v, _bytes(4)) for v in words]
        return [b.call(pshufb, [table, c]) for c in nibbles]

    def prefetch(self, part, parts):
        _prefetch(self.b, self.ahead, ROWS * GGUF_BYTES["iq4_xs"], part, parts)


LANE_BYTES = 64 * (1 + 8 + 64)  # a decoded super-block of 16 rows: d, 8 scales, 8 x 8 code vectors


class _LaneRows:
    """Super-block s of 16 rows decoded by a format's decoder (decode_codegen) into lane vectors
    at addrs[0] (every row's address is the group's: row_bytes 0): d (<16 x float>) at 0, scale(j)
    (<16 x i32>) at 64 + 64 j, codes(j)'s 8 vectors at 576 + 512 j + 64 i. The source's format
    decides what the codes and scales are (IQ3_S: as _IQ3SRows'). In L1 or L2: no prefetch."""

    def __init__(self, b, addrs, ahead):
        self.b, self.base = b, addrs[0]
        self.d = load(b, self.base, 0, _V16F32)

    def scale(self, j):
        return load(self.b, self.base, 64 + 64 * j, _V16I32)

    def scalepair(self, m):
        return self.b.or_(self.scale(2 * m), self.b.shl(self.scale(2 * m + 1), _c32(16)))

    def codes(self, j):
        return [load(self.b, self.base, 576 + 512 * j + 64 * i, _V64I8) for i in range(8)]

    def prefetch(self, part, parts):
        pass


def decode_codegen(fmt: str):
    """The code of a decoder: args (w, row_bytes, nsb, out), the 16 GGUF rows of format fmt from
    w written to out as nsb super-blocks of LANE_BYTES each (see _LaneRows), so that a GEMM's
    passes over a group's tokens read the decoded lanes instead of decoding each time."""
    rows_source = _DECODED[fmt]

    def codegen(context, builder, signature, args):
        b = builder
        w, row_bytes, nsb, out = args
        row_addrs = [b.add(w, b.mul(row_bytes, ir.Constant(row_bytes.type, r))) for r in range(ROWS)]
        next_group = b.add(w, b.mul(row_bytes, ir.Constant(row_bytes.type, ROWS)))
        with cgutils.for_range(b, nsb) as loop:
            s = loop.index
            gguf = b.mul(s, ir.Constant(s.type, GGUF_BYTES[fmt]))
            ahead = b.add(next_group, b.mul(s, ir.Constant(s.type, ROWS * GGUF_BYTES[fmt])))
            src = rows_source(b, [b.add(a, gguf) for a in row_addrs], ahead)
            at = b.add(out, b.mul(s, ir.Constant(s.type, LANE_BYTES)))

            def store(value, offset):
                ptr = b.inttoptr(b.add(at, ir.Constant(at.type, offset)), value.type.as_pointer())
                b.store(value, ptr, align=64)

            store(src.d, 0)
            for j in range(8):
                src.prefetch(j, 8)
                store(src.scale(j), 64 + 64 * j)
                for i, v in enumerate(src.codes(j)):
                    store(v, 576 + 512 * j + 64 * i)
        return context.get_dummy_value()

    return codegen


def _fshr(b, hi, lo, bits: int):
    """Per lane, the 32 bits from bit `bits` of the 64-bit hi:lo (vpshrdd where the host has it)."""
    f = declare(b, "llvm.fshr.v16i32", _V16I32, [_V16I32, _V16I32, _V16I32])
    return b.call(f, [hi, lo, _c32(bits)])


# the 4 bits at 4 i of a word spread to bit 4 of its 4 bytes: (x * 0x00204081) & 0x01010101 puts bit c
# of x (x < 16) at bit 8 c, the four shifted copies of x not overlapping
_SPREAD = 0x00204081


def _gather(b, table, index):
    """<16 x i32>: table[index[r]] in lane r (table: a module constant of i32 words; vpgatherdd)."""
    f = declare(b, "llvm.x86.avx512.mask.gather.dpi.512", _V16I32,
                [_V16I32, ir.PointerType(), _V16I32, ir.VectorType(ir.IntType(1), 16), _i32])
    base = b.bitcast(table, ir.PointerType())
    every = ir.Constant(ir.VectorType(ir.IntType(1), 16), [1] * 16)
    return b.call(f, [ir.Constant(_V16I32, None), base, index, every, ir.Constant(_i32, 4)])


def _grid_table(b):
    """IQ3_S's 512 grid rows (4 magnitudes of 1..15 in the bytes of a word), a module constant."""
    module = b.module
    if "stepstream_iq3s_grid" not in module.globals:
        typ = ir.ArrayType(_i32, len(IQ3S_WORDS))
        g = ir.GlobalVariable(module, typ, "stepstream_iq3s_grid")
        g.linkage = "private"
        g.global_constant = True
        g.initializer = ir.Constant(typ, [ir.Constant(_i32, w) for w in IQ3S_WORDS])
    return module.globals["stepstream_iq3s_grid"]


class _IQ3SRows:
    """Super-block s of 16 GGUF IQ3_S rows (see _Q4KRows): d at 0, qs (64 bytes at 2: the low 8
    bits of the grid rows, 4 columns each), qh (8 bytes at 66: the ninth bits, a byte per
    sub-block), the signs (32 bytes at 74: a byte per 8 columns) and the scales (4 bytes at 106,
    a nibble per sub-block). The 64 bytes from 2 and the 64 from 46 (qh, signs and scales on
    word boundaries) are transposed. codes(j): sub-block j's 8 vectors, columns 32 j + 4 i .. + 3
    in vector i, grid row looked up per lane (vpgatherdd), its signs applied, plus 16 (1 .. 31,
    unsigned). scale(j): 2 s_j + 1; scalepair(m): sub-blocks 2m, 2m+1's as int16 pairs."""

    TAIL = 46  # 110 - 64: qh at word 5, the signs at words 7 .. 14, the scales at word 15

    def __init__(self, b, addrs, ahead):
        self.b, self.addrs, self.ahead = b, addrs, ahead
        self.d = _half_lanes(b, _lanes_at(b, addrs, 0, _i16, ir.VectorType(_i16, 16)))
        self.chunks = {}

    def _words(self, offset):
        if offset not in self.chunks:
            self.chunks[offset] = _transpose16(self.b, [load(self.b, a, offset, _V16I32) for a in self.addrs])
        return self.chunks[offset]

    def scale(self, j):
        b = self.b
        nibble = b.and_(b.lshr(self._words(self.TAIL)[15], _c32(4 * j)), _c32(15))
        return b.add(b.shl(nibble, _c32(1)), _c32(1))

    def scalepair(self, m):
        return self.b.or_(self.scale(2 * m), self.b.shl(self.scale(2 * m + 1), _c32(16)))

    def codes(self, j):
        b = self.b
        qs, tail = self._words(2), self._words(self.TAIL)
        qh = tail[5 + j // 4]
        signs = tail[7 + j]
        table = _grid_table(b)
        out = []
        for i in range(8):
            low = b.and_(b.lshr(qs[2 * j + i // 4], _c32(8 * (i % 4))), _c32(255))
            high = b.shl(b.and_(b.lshr(qh, _c32(8 * (j % 4) + i)), _c32(1)), _c32(8))
            grid = b.bitcast(_gather(b, table, b.or_(low, high)), _V64I8)
            nibble = b.and_(b.lshr(signs, _c32(4 * i)), _c32(15))  # group i // 2's byte, half i % 2
            mask = b.bitcast(b.mul(b.and_(b.mul(nibble, _c32(_SPREAD)), _c32(0x01010101)), _c32(255)), _V64I8)
            out.append(b.add(b.sub(b.xor(grid, mask), mask), _bytes(16)))
        return out

    def prefetch(self, part, parts):
        _prefetch(self.b, self.ahead, ROWS * GGUF_BYTES["iq3_s"], part, parts)


class _Blocks32Rows:
    """Super-block s of 16 GGUF rows of a 32-weight block format (blocks32.LAYOUTS, or Q8_0's
    34-byte blocks): its 8 blocks, block k at byte k * nbytes. Blocks do not start on 4-byte
    words, so the rows' super-blocks are transposed as words (64-byte chunks, the last one
    ending at the super-block's end) and each field is taken from two words by a funnel shift.
    d(k), m(k): block k's scales (<16 x float>); codes(k): its 8 code vectors, columns
    32 k + 4 i .. + 3 in vector i, unsigned (nibbles plus the fifth bit: 0 .. 31; IQ4_NL and
    Q8_0: the value plus 128, taken off with lay.offset = 128 through the 32-column sums)."""

    def __init__(self, b, addrs, ahead, name: str, lay: Layout):
        self.b, self.addrs, self.ahead, self.name, self.lay = b, addrs, ahead, name, lay
        total = 8 * lay.nbytes
        self.chunk_starts = list(range(0, total - 63, 64)) + ([total - 64] if total % 64 else [])
        self.chunks = {}

    def _word(self, w):
        b = self.b
        for start in self.chunk_starts:
            if start // 4 <= w < start // 4 + 16:
                if start not in self.chunks:
                    self.chunks[start] = _transpose16(b, [load(b, a, start, _V16I32) for a in self.addrs])
                return self.chunks[start][w - start // 4]
        raise AssertionError(f"word {w} is past the super-block")

    def _field(self, offset):
        """The 4 bytes at offset in each row's super-block, as <16 x i32>."""
        w, sh = divmod(offset, 4)
        return self._word(w) if sh == 0 else _fshr(self.b, self._word(w + 1), self._word(w), 8 * sh)

    def _half(self, offset):
        return _half_lanes(self.b, self.b.trunc(self._field(offset), ir.VectorType(_i16, 16)))

    def d(self, k):
        return self._half(k * self.lay.nbytes)

    def m(self, k):
        return self._half(k * self.lay.nbytes + self.lay.m)

    def codes(self, k):
        b, lay = self.b, self.lay
        o = k * lay.nbytes
        if self.name == "q8_0":  # 32 signed bytes at 2, made unsigned by flipping the sign bit
            return [b.xor(b.bitcast(self._field(o + 2 + 4 * i), _V64I8), _bytes(128)) for i in range(8)]
        words = [b.bitcast(self._field(o + lay.qs + 4 * i), _V64I8) for i in range(4)]
        out = [b.and_(v, _bytes(15)) for v in words] + [b.lshr(v, _bytes(4)) for v in words]
        if lay.qh >= 0:
            qh = self._field(o + lay.qh)
            for i in range(8):
                nib = b.and_(b.lshr(qh, _c32(4 * i)) if i else qh, _c32(15))
                spread = b.shl(b.and_(b.mul(nib, _c32(_SPREAD)), _c32(0x01010101)), _c32(4))
                out[i] = b.or_(out[i], b.bitcast(spread, _V64I8))
        if lay.lookup:
            table = ir.Constant(_V64I8, [(v + 128) & 255 for v in IQ4_NL_VALUES] * 4)
            pshufb = declare(b, "llvm.x86.avx512.pshuf.b.512", _V64I8, [_V64I8, _V64I8])
            out = [b.call(pshufb, [table, c]) for c in out]
        return out

    def prefetch(self, part, parts):
        _prefetch(self.b, self.ahead, ROWS * 8 * self.lay.nbytes, part, parts)


# ---------------------------------------------------------------- the arithmetic, per source

def _q4k(b, src, xq, xs, xd, add):
    """One Q4_K super-block of 16 rows times each token: add(t, <16 x float>) gets the terms.
    The mins' term goes out first, so that only one int32 vector per token stays live through
    the sub-block loop (eight tokens' decoded weights and sums fill the registers)."""
    n = len(xq)
    msum = [_ZERO] * n
    for m in range(4):
        pair = src.minpair(m)
        for t in range(n):
            msum[t] = _dpwssd(b, msum[t], pair, _bcast4(b, xs[t], 4 * m))
    for t in range(n):
        add(t, b.fneg(fmul(b, b.sitofp(msum[t], _V16F32), fmul(b, src.dmin, _splat(b, xd[t], _V16F32)))))
    isum = [_ZERO] * n
    for j in range(8):
        src.prefetch(j, 8)
        k, high = divmod(j, 2)
        sc = src.scale(j)
        codes = [b.lshr(q, _bytes(4)) if high else b.and_(q, _bytes(15)) for q in src.raw(k)]
        for t in range(n):
            p = _ZERO
            for i in range(8):
                p = _dpbusd(b, p, codes[i], _bcast4(b, xq[t], 32 * j + 4 * i))
            isum[t] = b.add(isum[t], b.mul(p, sc))
    for t in range(n):
        add(t, fmul(b, b.sitofp(isum[t], _V16F32), fmul(b, src.d, _splat(b, xd[t], _V16F32))))


def _q6k(b, src, xq, xs, xd, add):
    """One Q6_K super-block of 16 rows times each token. Codes are stored offset by 32, which
    comes off through the activations' 16-column sums: they start each token's integer sum."""
    n = len(xq)
    off = [_ZERO] * n
    for m in range(8):
        pair = src.scalepair(m)
        for t in range(n):
            off[t] = _dpwssd(b, off[t], pair, _bcast4(b, xs[t], 4 * m))
    isum = [b.sub(_ZERO, b.shl(o, _c32(5))) for o in off]  # -32 * offsets
    for p in range(8):
        src.prefetch(p, 8)
        codes = src.codes(p)
        for j in (2 * p, 2 * p + 1):
            sc = src.scale(j)
            for t in range(n):
                acc = _ZERO
                for i in range(4):
                    acc = _dpbusd(b, acc, codes[4 * (j % 2) + i], _bcast4(b, xq[t], 16 * j + 4 * i))
                isum[t] = b.add(isum[t], b.mul(acc, sc))
    for t in range(n):
        add(t, fmul(b, b.sitofp(isum[t], _V16F32), fmul(b, src.d, _splat(b, xd[t], _V16F32))))


def _q5k(b, src, xq, xs, xd, add):
    """One Q5_K super-block of 16 rows times each token: xd * (d * I - dmin * M) per row, each
    float step rounded once as avx2's Q5_K row dot rounds it. The mins' sums come after the
    codes' loop, so that only the code sums stay live through it."""
    isum = _scaled_codes32(b, src, xq, [_ZERO] * len(xq))
    _scaled_minus_mins(b, src, 4, xs, xd, isum, add)


def _scaled_codes32(b, src, xq, isum):
    """isum[t] plus, over the 8 sub-blocks j of 32 columns, src.scale(j) times src.codes(j) .
    token t's activations (exact int32 lanes; the codes decoded once for all the tokens)."""
    isum = list(isum)
    for j in range(8):
        src.prefetch(j, 8)
        sc = src.scale(j)
        codes = src.codes(j)
        for t in range(len(xq)):
            p = _ZERO
            for i in range(8):
                p = _dpbusd(b, p, codes[i], _bcast4(b, xq[t], 32 * j + 4 * i))
            isum[t] = b.add(isum[t], b.mul(p, sc))
    return isum


def _scaled_minus_mins(b, src, pairs, xs, xd, isum, add):
    """add(t, xd * (d * I_t - dmin * M_t)), M_t = sum over sub-blocks of min times the token's
    sums (src.minpair(m): two sub-blocks' mins as int16 pairs, against xs's pairs m)."""
    for t in range(len(isum)):
        msum = _ZERO
        for m in range(pairs):
            msum = _dpwssd(b, msum, src.minpair(m), _bcast4(b, xs[t], 4 * m))
        both = fsub(b, fmul(b, src.d, b.sitofp(isum[t], _V16F32)), fmul(b, src.dmin, b.sitofp(msum, _V16F32)))
        add(t, fmul(b, _splat(b, xd[t], _V16F32), both))


def _q2k(b, src, xq, xs, xd, add):
    """One Q2_K super-block of 16 rows times each token: xd * (d * I - dmin * M), I the codes
    (0..3) times their 16-column sub-blocks' scales, M the mins times the 16-column sums."""
    n = len(xq)
    isum = [_ZERO] * n
    for p in range(8):
        src.prefetch(p, 8)
        codes = src.codes(p)
        for j in (2 * p, 2 * p + 1):
            sc = src.scale(j)
            for t in range(n):
                acc = _ZERO
                for i in range(4):
                    acc = _dpbusd(b, acc, codes[4 * (j % 2) + i], _bcast4(b, xq[t], 16 * j + 4 * i))
                isum[t] = b.add(isum[t], b.mul(acc, sc))
    _scaled_minus_mins(b, src, 8, xs, xd, isum, add)


def _q3k(b, src, xq, xs, xd, add):
    """One Q3_K super-block of 16 rows times each token: (d * xd) * I, I = sum of (scale - 32)
    times the codes (stored code + 4) minus 4 times the scales against the 16-column sums."""
    n = len(xq)
    off = [_ZERO] * n
    for m in range(8):
        pair = src.scalepair(m)
        for t in range(n):
            off[t] = _dpwssd(b, off[t], pair, _bcast4(b, xs[t], 4 * m))
    isum = [b.sub(_ZERO, b.shl(o, _c32(2))) for o in off]  # -4 * offsets
    for p in range(8):
        src.prefetch(p, 8)
        codes = src.codes(p)
        for j in (2 * p, 2 * p + 1):
            sc = src.scale(j)
            for t in range(n):
                acc = _ZERO
                for i in range(4):
                    acc = _dpbusd(b, acc, codes[4 * (j % 2) + i], _bcast4(b, xq[t], 16 * j + 4 * i))
                isum[t] = b.add(isum[t], b.mul(acc, sc))
    for t in range(n):
        add(t, fmul(b, fmul(b, src.d, _splat(b, xd[t], _V16F32)), b.sitofp(isum[t], _V16F32)))


def _offset_codes(shift: int):
    """The arithmetic of a format whose codes are its values plus 2^shift over 32-column
    sub-blocks with integer scales: one super-block of 16 rows times each token, (d * xd) * I,
    I = sum over sub-blocks of scale times (codes . x), minus 2^shift times the scales against
    the 32-column sums. IQ4_XS (values + 128, scale - 32) and IQ3_S (grid values times signs
    + 16, odd scales): their row dots' integer, and their rounding."""
    def arith(b, src, xq, xs, xd, add):
        n = len(xq)
        off = [_ZERO] * n
        for m in range(4):
            pair = src.scalepair(m)
            for t in range(n):
                off[t] = _dpwssd(b, off[t], pair, _bcast4(b, xs[t], 4 * m))
        isum = _scaled_codes32(b, src, xq, [b.sub(_ZERO, b.shl(o, _c32(shift))) for o in off])  # -2^shift * offsets
        for t in range(n):
            add(t, fmul(b, fmul(b, src.d, _splat(b, xd[t], _V16F32)), b.sitofp(isum[t], _V16F32)))
    return arith


def _blocks32(lay: Layout):
    """The arithmetic of a 32-weight block format over 16 rows: per block k and token, the exact
    integer T_k - offset X_k (X_k: the block's 32-column activation sum), p_k = d_k (that) [+ m_k
    X_k], summed p_0 + p_1 + ... + p_7 left to right, times xd: blocks32's row dot's roundings."""
    def arith(b, src, xq, xs, xd, add):
        n = len(xq)
        sb = [None] * n
        for k in range(8):
            src.prefetch(k, 8)
            codes = src.codes(k)
            d = src.d(k)
            m = src.m(k) if lay.m >= 0 else None
            for t in range(n):
                acc = _ZERO
                for i in range(8):
                    acc = _dpbusd(b, acc, codes[i], _bcast4(b, xq[t], 32 * k + 4 * i))
                x = _splat(b, b.sext(load(b, xs[t], 2 * k, _i16), _i32), _V16I32)
                if lay.offset:
                    acc = b.sub(acc, b.mul(x, _c32(lay.offset)))
                p = fmul(b, d, b.sitofp(acc, _V16F32))
                if m is not None:
                    p = fadd(b, p, fmul(b, m, b.sitofp(x, _V16F32)))
                sb[t] = p if k == 0 else fadd(b, sb[t], p)
        for t in range(n):
            add(t, fmul(b, _splat(b, xd[t], _V16F32), sb[t]))
    return arith


def _blocks32_source(name: str, lay: Layout):
    def source(b, addrs, ahead):
        return _Blocks32Rows(b, addrs, ahead, name, lay)
    return source


_Q8_0 = Layout(34, -1, -1, 2, 128, False)  # as blocks32's: signed bytes at 2, made unsigned (+ 128)
_BLOCKS32 = {T(code).name.lower(): (lay._replace(offset=128) if lay.lookup else lay) for code, lay in LAYOUTS.items()}
_BLOCKS32["q8_0"] = _Q8_0


_FORMATS = {"q4_k": (_q4k, _Q4KRows, 16), "q6_k": (_q6k, _Q6KRows, 32), "q5_k": (_q5k, _Q5KRows, 16),
            "q2_k": (_q2k, _Q2KRows, 32), "q3_k": (_q3k, _Q3KRows, 32), "iq4_xs": (_offset_codes(7), _IQ4XSRows, 16),
            "iq3_s": (_offset_codes(4), _LaneRows, 16),
            **{name: (_blocks32(lay), _blocks32_source(name, lay), 16) for name, lay in _BLOCKS32.items()}}


def step_codegen(fmt: str, n_tok: int):
    """The code of a step over one group, emitted where it is called: codegen(context, builder,
    signature, args), args the 11 int64 values (w, row_bytes, nsb, xq, xq_stride, xs, xs_stride,
    xd, xd_stride, out, out_stride)."""
    arith, rows_source, xs_bytes = _FORMATS[fmt]
    stride = LANE_BYTES if fmt in _DECODED else GGUF_BYTES[fmt]  # a super-block's bytes in a row (lanes: in the group)

    def codegen(context, builder, signature, args):
        b = builder
        w, row_bytes, nsb, xq, xq_stride, xs, xs_stride, xd, xd_stride, out, out_stride = args

        def token(base, stride, t):
            return b.add(base, b.mul(stride, ir.Constant(stride.type, t)))

        # each token's 16 results accumulate in out itself: kept in registers, they would push
        # the decoded weights out of them (8 tokens x 16 lanes) and cost spills per sub-block
        outs = [b.inttoptr(token(out, out_stride, t), _V16F32.as_pointer()) for t in range(n_tok)]
        for ptr in outs:
            b.store(ir.Constant(_V16F32, None), ptr, align=4)

        def add(t, term):
            b.store(fadd(b, b.load(outs[t], align=4), term), outs[t], align=4)

        row_addrs = [token(w, row_bytes, r) for r in range(ROWS)]
        next_group = token(w, row_bytes, ROWS)
        with cgutils.for_range(b, nsb) as loop:
            s = loop.index

            def at(base, stride, t, per):
                return b.add(token(base, stride, t), b.mul(s, ir.Constant(s.type, per)))

            gguf = b.mul(s, ir.Constant(s.type, stride))
            ahead = b.add(next_group, b.mul(s, ir.Constant(s.type, ROWS * stride)))
            src = rows_source(b, [b.add(a, gguf) for a in row_addrs], ahead)
            arith(b, src, [at(xq, xq_stride, t, 256) for t in range(n_tok)],
                  [at(xs, xs_stride, t, xs_bytes) for t in range(n_tok)],
                  [load(b, at(xd, xd_stride, t, 4), 0, _f32) for t in range(n_tok)], add)
        return context.get_dummy_value()

    return codegen


_DECODED = {"iq3_s": _IQ3SRows}  # formats whose steps read lanes their decoder wrote (decode_codegen)
DECODED = tuple(_DECODED)
SUMS_BYTES = {name: xs_bytes for name, (_, _, xs_bytes) in _FORMATS.items()}  # a step's sums per super-block
