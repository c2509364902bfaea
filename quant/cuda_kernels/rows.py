"""One weight row times int8 activations, per format, on a warp: each lane's float32 share.

A warp's 32 lanes take each 256-column super-block together, 8 weights per lane, reading the
row with 32-bit loads (Q4_K, Q5_K: one word of quants per lane, the warp's loads one 128-byte
line) or 16-bit loads (Q6_K, Q8_0, whose super-blocks and blocks start on even bytes only),
and the activations as int32 / int16 words of four / two int8 values. Products of four bytes
are `dot4`: the card's dp4a instruction, or the same sum spelled out (numba's simulator, or a
numba that cannot emit the instruction). Each lane keeps the integer sums of its sub-blocks
times their scales, and one float32 sum over the row's super-blocks; the warp's sum of the
shares is the row's product: the CPU's integer sums times the same scales, added in another
order (quant.int8_kernels).

The kernels read the arena (its length a multiple of 4) as uint32, uint16 and float16, and
every descriptor's byte offset is a multiple of 4 (quant.cuda_kernels.descriptor checks both). A Q4_K or Q5_K super-block then starts on a
word (144 and 176 bytes); a Q6_K one (210 bytes) and a Q8_0 block (34) on an even byte.

Shape legend
    w32 uint32 [bytes / 4]  w16 uint16 [bytes / 2]  wh float16 [bytes / 2]   (the arena)
    x32 int32 [T, C / 4]  x16 int16 [T, C / 2]      (xq, int8 [T, C], read as words)
    xd  float32 [T, C / 256]                          (quant.int8_kernels.quantize_activations)
    o   the row's byte offset;  nsb  its super-blocks;  l  the lane;  t  the token
    x32r, x16r, xdr   row t of x32, x16, xd
"""

from __future__ import annotations

import numba
from numba import cuda

from . import int32
from .simulator import SIMULATED

I32 = numba.int32
I64 = numba.int64  # every integer load is widened: the same arithmetic in the simulator's numpy scalars
U64 = numba.uint64  # indices: unsigned, so that numba adds no wraparound of negative indices to each load
F32 = numba.float32

# The helpers below are device functions, inlined, on a card. Under numba's simulator a device
# function call swaps the module's globals on every call (about 50 us); as plain functions the
# same code runs 20x faster there, and compiles to the same kernels on a card.
device = (lambda f: f) if SIMULATED else cuda.jit(device=True, inline=True)

Q4_K, Q5_K, Q6_K, Q8_0 = 12, 13, 14, 8  # GGMLQuantizationType values
M4 = 0x0F0F0F0F  # the low nibble of each byte of a word


def _cuda_intrinsic():
    try:
        from numba.cuda.extending import intrinsic
    except ImportError:  # an older numba: its generic intrinsic
        from numba.core.extending import intrinsic
    return intrinsic


def _helpers():
    """(dot4, imad32, k4_scale_min): Python under the simulator; on a card 32-bit IR, and dp4a
    unless the card predates it (sm_61) or this numba's NVVM refuses the inline PTX."""
    if SIMULATED:
        return int32.dot4_py, int32.imad32_py, int32.k4_scale_min_py
    intrinsic = _cuda_intrinsic()
    imad32, k4_scale_min = int32.intrinsics(intrinsic)
    portable = cuda.jit(device=True, inline=True)(int32.dot4_py)
    try:
        from numba import types as nt
        from numba.cuda import dispatcher  # where numba's kernel compiles ask for the card

        dp4a = int32.dp4a_intrinsic(intrinsic)
        cc = tuple(dispatcher.get_current_device().compute_capability)
        if cc < (6, 1):
            return portable, imad32, k4_scale_min

        def probe(a, out):
            out[0] = dp4a(a[0], a[1], 0)

        cuda.compile_ptx(probe, (nt.int32[::1], nt.int32[::1]), cc=cc)
    except Exception:
        return portable, imad32, k4_scale_min
    return dp4a, imad32, k4_scale_min


dot4, imad32, k4_scale_min = _helpers()


@device
def _sum4(x):
    return dot4(x, 0x01010101, 0)


@device
def row_q4_k(w32, wh, o, nsb, l, x32r, xdr):
    """Lane l takes quant word l of each super-block: byte e of it holds weight 4 (l % 8) + e of
    sub-block 2 (l // 8) in its low nibble and of sub-block 2 (l // 8) + 1 in its high one."""
    p = l >> 3
    k8 = l & 7
    acc = F32(0.0)
    wo = o >> 2
    for s in range(nsb):
        b = wo + 36 * s
        q = I64(w32[U64(b + 4 + l)])
        xl = I64(x32r[U64(64 * s + 16 * p + k8)])
        xh = I64(x32r[U64(64 * s + 16 * p + 8 + k8)])
        s0, s1, s2 = I64(w32[U64(b + 1)]), I64(w32[U64(b + 2)]), I64(w32[U64(b + 3)])
        sc0, m0 = k4_scale_min(s0, s1, s2, 2 * p)
        sc1, m1 = k4_scale_min(s0, s1, s2, 2 * p + 1)
        isum = imad32(sc0, dot4(q & M4, xl, 0), imad32(sc1, dot4((q >> 4) & M4, xh, 0), 0))
        msum = imad32(m0, _sum4(xl), imad32(m1, _sum4(xh), 0))
        acc += xdr[U64(s)] * (F32(wh[U64(2 * b)]) * F32(isum) - F32(wh[U64(2 * b + 1)]) * F32(msum))
    return acc


@device
def row_q5_k(w32, wh, o, nsb, l, x32r, xdr):
    """As Q4_K, with the fifth bit of weight e of sub-block j in bit j of qh byte e: lane l's
    four weights e = 4 (l % 8) + 0..3 take theirs from qh word l % 8."""
    p = l >> 3
    k8 = l & 7
    acc = F32(0.0)
    wo = o >> 2
    for s in range(nsb):
        b = wo + 44 * s
        q = I64(w32[U64(b + 12 + l)])
        h = I64(w32[U64(b + 4 + k8)])
        xl = I64(x32r[U64(64 * s + 16 * p + k8)])
        xh = I64(x32r[U64(64 * s + 16 * p + 8 + k8)])
        s0, s1, s2 = I64(w32[U64(b + 1)]), I64(w32[U64(b + 2)]), I64(w32[U64(b + 3)])
        sc0, m0 = k4_scale_min(s0, s1, s2, 2 * p)
        sc1, m1 = k4_scale_min(s0, s1, s2, 2 * p + 1)
        ql = (q & M4) | (((h >> (2 * p)) & 0x01010101) << 4)
        qh = ((q >> 4) & M4) | (((h >> (2 * p + 1)) & 0x01010101) << 4)
        isum = imad32(sc0, dot4(ql, xl, 0), imad32(sc1, dot4(qh, xh, 0), 0))
        msum = imad32(m0, _sum4(xl), imad32(m1, _sum4(xh), 0))
        acc += xdr[U64(s)] * (F32(wh[U64(2 * b)]) * F32(isum) - F32(wh[U64(2 * b + 1)]) * F32(msum))
    return acc


@device
def _i8(v):
    """Byte v (0..255) read as a signed int8."""
    return v - ((v & 128) << 1)


@device
def row_q6_k(w16, wh, w8, o, nsb, l, x16r, xdr):
    """Lane l takes weights j = 2 (l % 16) and j + 1 of half l // 16 of each super-block, in
    its four groups of 32 (ggml's dequantize_row_q6_K: ql[j], ql[j + 32], qh[j] of the half):
    four 16-bit loads of codes, four of activations. A code's 6 bits are taken without its
    offset of 32, which comes off as 32 times the sum of the activations."""
    hf = l >> 4
    j = 2 * (l & 15)
    g = j >> 4  # the scale of each 16 weights
    acc = F32(0.0)
    for s in range(nsb):
        b = o + 210 * s
        a = I64(w16[U64((b + 64 * hf + j) >> 1)])
        c = I64(w16[U64((b + 64 * hf + 32 + j) >> 1)])
        h = I64(w16[U64((b + 128 + 32 * hf + j) >> 1)])
        xo = (256 * s + 128 * hf + j) >> 1
        x0 = I64(x16r[U64(xo)]) & 0xFFFF
        x1 = I64(x16r[U64(xo + 16)]) & 0xFFFF
        x2 = I64(x16r[U64(xo + 32)]) & 0xFFFF
        x3 = I64(x16r[U64(xo + 48)]) & 0xFFFF
        sc = b + 192 + 8 * hf + g
        isum = imad32(_i8(I64(w8[U64(sc)])), dot4((a & 0x0F0F) | ((h & 0x0303) << 4), x0, 0) - 32 * _sum4(x0), 0)
        isum = imad32(_i8(I64(w8[U64(sc + 2)])), dot4((c & 0x0F0F) | ((h & 0x0C0C) << 2), x1, 0) - 32 * _sum4(x1), isum)
        isum = imad32(_i8(I64(w8[U64(sc + 4)])), dot4(((a >> 4) & 0x0F0F) | (h & 0x3030), x2, 0) - 32 * _sum4(x2), isum)
        isum = imad32(_i8(I64(w8[U64(sc + 6)])), dot4(((c >> 4) & 0x0F0F) | ((h >> 2) & 0x3030), x3, 0) - 32 * _sum4(x3), isum)
        acc += xdr[U64(s)] * F32(wh[U64((b + 208) >> 1)]) * F32(isum)
    return acc


@device
def row_q8_0(w16, wh, o, nsb, l, x32r, xdr):
    """Lane l takes weights 8 (l % 4) .. + 7 of block l // 4 of each super-block's eight blocks
    (34 bytes each: an f16 scale, 32 int8): four 16-bit loads, two int32 of activations."""
    k = l >> 2
    e = 8 * (l & 3)
    acc = F32(0.0)
    for s in range(nsb):
        b = (o + 272 * s + 34 * k) >> 1  # the block, in 16-bit words
        q0 = I64(w16[U64(b + 1 + (e >> 1))]) | (I64(w16[U64(b + 2 + (e >> 1))]) << 16)
        q1 = I64(w16[U64(b + 3 + (e >> 1))]) | (I64(w16[U64(b + 4 + (e >> 1))]) << 16)
        xo = 64 * s + 8 * k + (e >> 2)
        isum = dot4(q1, I64(x32r[U64(xo + 1)]), dot4(q0, I64(x32r[U64(xo)]), 0))
        acc += xdr[U64(s)] * F32(wh[U64(b)]) * F32(isum)
    return acc


@device
def bytes_per_256(qt):
    if qt == Q4_K:
        return 144
    if qt == Q5_K:
        return 176
    if qt == Q6_K:
        return 210
    return 272  # Q8_0: 8 blocks of 34


@device
def row_dot(w8, w32, w16, wh, o, qt, nsb, l, x32, x16, xd, t):
    """This lane's share of the row of format qt at byte o (nsb super-blocks) times token t."""
    if qt == Q4_K:
        return row_q4_k(w32, wh, o, nsb, l, x32[t], xd[t])
    if qt == Q5_K:
        return row_q5_k(w32, wh, o, nsb, l, x32[t], xd[t])
    if qt == Q6_K:
        return row_q6_k(w16, wh, w8, o, nsb, l, x16[t], xd[t])
    return row_q8_0(w16, wh, o, nsb, l, x32[t], xd[t])
