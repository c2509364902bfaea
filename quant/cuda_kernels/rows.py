"""One 256-column super-block of one weight row times int8 activations, per format, on a warp.

Each of a warp's 32 lanes takes 8 of the super-block's 256 weights: for the K-quants with
scales per 32 weights, 4 lanes per sub-block, so a lane decodes one scale and one min
(Q4_K, Q5_K); for Q6_K and Q8_0, the bytes the CPU's loop takes at its step l = lane
(quant.int8_kernels.row_dot). A warp's loads of one super-block stay within its bytes. A lane returns its float32 share of the super-block's dot
product; the warp's sum of the shares is the super-block's term, the same integer sums as
the CPU's times the same scales, added in another order.

Shape legend
    w     uint8 [bytes]    the arena; `o` the byte offset of the super-block (any alignment)
    xq    int8 [T, C]  xd float32 [T, C/256]  xb int32 [T, C/16]   (quant.int8_kernels)
    t     the token (row of xq),  s  the super-block (256 columns)
"""

from __future__ import annotations

import numba
from numba import cuda

from .simulator import SIMULATED

I32 = numba.int32
F32 = numba.float32

# The arithmetic helpers below are device functions, inlined, on a card. Under numba's simulator a
# device function call swaps the module's globals on every call (about 50 us), which made one
# super-block of one row cost 0.1 s there; as plain functions the same code runs 20x faster in
# the simulator, and compiles to the same kernels on a card.
device = (lambda f: f) if SIMULATED else cuda.jit(device=True, inline=True)

Q4_K, Q5_K, Q6_K, Q8_0 = 12, 13, 14, 8  # GGMLQuantizationType values


@device
def f16(w, o):
    """The IEEE half at w[o:o + 2] (little-endian) as float32."""
    h = I32(w[o]) | (I32(w[o + 1]) << 8)
    e = (h >> 10) & 31
    m = h & 1023
    if e == 0:
        v = F32(m) * F32(5.9604644775390625e-08)  # 2**-24
    elif e == 31:
        v = F32(3.0e38) * F32(10.0)  # inf (NaN payloads too: no valid weight holds either)
    else:
        v = F32(1024 + m) * F32(1 << e) * F32(2.9802322387695312e-08)  # (1024 + m) 2**(e - 25)
    return -v if (h >> 15) & 1 else v


@device
def k4_scale(w, o, j):
    if j < 4:
        return I32(w[o + j] & 63)
    return I32((w[o + j + 4] & 15) | ((w[o + j - 4] >> 6) << 4))


@device
def k4_min(w, o, j):
    if j < 4:
        return I32(w[o + j + 4] & 63)
    return I32((w[o + j + 4] >> 4) | ((w[o + j] >> 6) << 4))


@device
def lane_q4_k(w, o, l, xq, xd, xb, t, s):
    """Lanes 4j..4j+3 take sub-block j (8 weights each): one scale and min per lane."""
    j = l >> 2
    e0 = (l & 3) * 8
    q0 = o + 16 + 32 * (j >> 1) + e0
    sh = 4 * (j & 1)
    xo = 256 * s + 32 * j + e0
    acc = I32(0)
    for i in range(8):
        acc += ((I32(w[q0 + i]) >> sh) & 15) * I32(xq[t, xo + i])
    acc *= k4_scale(w, o + 4, j)
    msum = I32(0)
    if (l & 3) == 0:
        msum = k4_min(w, o + 4, j) * (xb[t, 16 * s + 2 * j] + xb[t, 16 * s + 2 * j + 1])
    return xd[t, s] * (f16(w, o) * F32(acc) - f16(w, o + 2) * F32(msum))


@device
def lane_q5_k(w, o, l, xq, xd, xb, t, s):
    """As Q4_K, with the fifth bit of weight e of sub-block j in bit j of qh[e]."""
    j = l >> 2
    e0 = (l & 3) * 8
    q0 = o + 48 + 32 * (j >> 1) + e0
    sh = 4 * (j & 1)
    xo = 256 * s + 32 * j + e0
    acc = I32(0)
    for i in range(8):
        q = ((I32(w[q0 + i]) >> sh) & 15) | (((I32(w[o + 16 + e0 + i]) >> j) & 1) << 4)
        acc += q * I32(xq[t, xo + i])
    acc *= k4_scale(w, o + 4, j)
    msum = I32(0)
    if (l & 3) == 0:
        msum = k4_min(w, o + 4, j) * (xb[t, 16 * s + 2 * j] + xb[t, 16 * s + 2 * j + 1])
    return xd[t, s] * (f16(w, o) * F32(acc) - f16(w, o + 2) * F32(msum))


@device
def lane_q6_k(w, o, l, xq, xd, xb, t, s):
    acc = I32(0)
    g = 0 if l < 16 else 1  # the scale of each 16-weight group
    for hf in range(2):
        a = I32(w[o + 64 * hf + l])
        b = I32(w[o + 64 * hf + 32 + l])
        hb = I32(w[o + 128 + 32 * hf + l])
        sc = o + 192 + 8 * hf + g
        xo = 256 * s + 128 * hf + l
        acc += I32(numba.int8(w[sc])) * (((a & 15) | ((hb & 3) << 4)) - 32) * I32(xq[t, xo])
        acc += I32(numba.int8(w[sc + 2])) * (((b & 15) | ((hb & 12) << 2)) - 32) * I32(xq[t, xo + 32])
        acc += I32(numba.int8(w[sc + 4])) * (((a >> 4) | (hb & 48)) - 32) * I32(xq[t, xo + 64])
        acc += I32(numba.int8(w[sc + 6])) * (((b >> 4) | ((hb >> 2) & 48)) - 32) * I32(xq[t, xo + 96])
    return xd[t, s] * f16(w, o + 208) * F32(acc)


@device
def lane_q8_0(w, o, l, xq, xd, xb, t, s):
    sb = F32(0.0)
    for k in range(8):
        b = o + 34 * k
        sb += f16(w, b) * F32(I32(numba.int8(w[b + 2 + l])) * I32(xq[t, 256 * s + 32 * k + l]))
    return xd[t, s] * sb


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
def lane_dot(w, o, qt, l, xq, xd, xb, t, s):
    """This lane's share of super-block s (starting at byte o) of a row of format qt, times token t."""
    if qt == Q4_K:
        return lane_q4_k(w, o, l, xq, xd, xb, t, s)
    if qt == Q5_K:
        return lane_q5_k(w, o, l, xq, xd, xb, t, s)
    if qt == Q6_K:
        return lane_q6_k(w, o, l, xq, xd, xb, t, s)
    return lane_q8_0(w, o, l, xq, xd, xb, t, s)
