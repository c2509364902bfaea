"""IQ1/IQ2/IQ3 rows times int8 activations: the portable loops (hosts without AVX2; their AVX2
versions, in iq_avx2, give the same bits).

Shape legend (as row_dot's)
    C    columns, a multiple of 256        nsb = C / 256 super-blocks
    xq   int8 [C]   xd float32 [C / 256]   xb int32 [C / 16]   (row_dot.quantize_row)
    w    uint8 [nsb * B]: one GGUF row, B bytes per super-block (dispatch.BYTES_PER_256)
    grid int8 [G, 8] (IQ2, IQ1): quant.iq_grids.GRIDS; IQ3: int32 [G], each 4-value row packed in a word
    sign int8 [128 or 256, 8]: +-1 per weight of a group of 8, from a 7-bit KSIGNS index or a raw byte
         (IQ3: the 8 sign bits themselves, int32 [128] for KSIGNS)

Weight 32 j + 8 l + k is sub-block j, group l, position k of its super-block (as reference_iq).
Every format is w = d c q with q an integer (grid value times sign, IQ1: plus its delta),
d the super-block's f16 scale and c a power of two, so per super-block

    IQ2_XXS  q = (2 s_j + 1) g s           c = 1/8   s_j: 4 bits of the u32 aux of sub-block j,
                                                    signs KSIGNS[7 bits of aux per group]
    IQ2_XS   q = (2 s_i + 1) g s           c = 1/8   u16 per group: 9-bit grid row, 7-bit sign
                                                    index; s_i a nibble per 16 weights
    IQ2_S    q = (2 s_i + 1) g s           c = 1/8   10-bit grid row (qs | 2 bits of qh), a sign
                                                    byte per group, s_i a nibble per 16 weights
    IQ3_XXS  q = (2 s_j + 1) g s           c = 1/4   two 4-weight grid rows per group, aux as IQ2_XXS
    IQ3_S    q = (2 s_j + 1) g s           c = 1     9-bit grid rows (qs | a bit of qh), sign bytes
    IQ1_S    q = (2 s_j + 1) (8 g + e_j)   c = 1/8   e_j = +-1 (the +-1/8 delta, times 8): the term
                                                    sum e_j x is e_j (xb[2j] + xb[2j + 1])
    IQ1_M    q = (2 s_i + 1) (8 g + e_l)   c = 1/8   e_l per group of 8 (folded into the weight:
                                                    xb sums 16), d from the scales' top nibbles

and sum_c w x = (d c xd) I with I = sum q xq an exact integer (|I| < 2^26). Each row dot adds
((d * c) * xd) * I per super-block to its float32 sum, left to right, in that order
(FIXED_ORDER: no reassociation, no contraction; d * c is exact). The products of a group are
int16 weights times int8 activations summed in int32 (np.int16/np.int32 wrappers, so LLVM
keeps the lanes narrow), scaled by the sub-block's odd scale once per 16 or 32 weights.

llama.cpp computes the same integers (ggml_vec_dot_iq*_q8_K); its IQ1_S/IQ1_M add the
delta term in float, where here it is a part of I.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from gguf import GGMLQuantizationType as T

from ..bits import f16_at, f16_to_f32
from ..iq_grids import GRIDS, KSIGNS
from ..jit import FIXED_ORDER, opaque

_CALLED = dict(fastmath=FIXED_ORDER, cache=True)  # as row_dot's portable loops (see there)
I16 = np.int16
I32 = np.int32
F0 = np.float32(0.0)
EIGHTH = np.float32(0.125)
QUARTER = np.float32(0.25)


def _byte_signs() -> np.ndarray:
    """int8 [256, 8]: -1 where bit k of the byte is set, else +1."""
    bits = (np.arange(256, dtype=np.uint8)[:, None] >> np.arange(8, dtype=np.uint8)) & np.uint8(1)
    return (1 - 2 * bits.astype(np.int8)).astype(np.int8)


_SIGN_BYTE = _byte_signs()          # a raw sign byte (IQ2_S, IQ3_S)
_SIGN_K = _SIGN_BYTE[KSIGNS]        # int8 [128, 8]: a 7-bit KSIGNS index (IQ2_XXS, IQ2_XS, IQ3_XXS)
_G2XXS = np.ascontiguousarray(GRIDS[T.IQ2_XXS])  # int8 [256, 8]
_G2XS = np.ascontiguousarray(GRIDS[T.IQ2_XS])    # int8 [512, 8]
_G2S = np.ascontiguousarray(GRIDS[T.IQ2_S])      # int8 [1024, 8]
# IQ3's 4-weight rows packed as one little-endian word each (values 1..62, so bytes are values)
_G3XXS = np.ascontiguousarray(GRIDS[T.IQ3_XXS]).view(np.int32).reshape(-1)  # int32 [256]
_G3S = np.ascontiguousarray(GRIDS[T.IQ3_S]).view(np.int32).reshape(-1)      # int32 [512]
_KSIGN_BITS = KSIGNS.astype(np.int32)  # int32 [128]: a 7-bit index -> its 8 sign bits
assert GRIDS[T.IQ3_XXS].min() > 0 and GRIDS[T.IQ3_S].min() > 0
_G1 = np.ascontiguousarray(GRIDS[T.IQ1_S])       # int8 [2048, 8], IQ1_M's too
for _a in (_SIGN_BYTE, _SIGN_K, _G2XXS, _G2XS, _G2S, _G3XXS, _G3S, _KSIGN_BITS, _G1):
    _a.setflags(write=False)


@nb.njit(inline="always", cache=True)
def _u16(w, o):
    return I32(w[o]) | (I32(w[o + 1]) << I32(8))


@nb.njit(inline="always", cache=True)
def _u32(w, o):
    """The little-endian u32 at byte o, as int32 (shift it right with a mask: bit 31 is the sign)."""
    return I32(w[o]) | (I32(w[o + 1]) << I32(8)) | (I32(w[o + 2]) << I32(16)) | (I32(w[o + 3]) << I32(24))


@nb.njit(inline="always", cache=True)
def _group8(grid, g, sign, si, xq, xo, k8):
    """sum_k grid[g, k] sign[si, k] xq[xo + k] over a group of k8 = 8 weights (int32). k8 comes
    from quant.jit.opaque: with a literal 8 LLVM unrolls the loop and vectorizes the groups
    around it with gathers, 2-3x slower (as the float kernels' rows_iq found)."""
    t = I32(0)
    for k in range(k8):
        t = I32(t + I32(I16(I16(grid[g, k]) * I16(sign[si, k]))) * I32(xq[xo + k]))
    return t


@nb.njit(inline="always", cache=True)
def _row4(v, sg, xq, xo):
    """sum_k byte k of v (an IQ3 grid row) times -1 where bit k of sg is set, times xq[xo + k],
    over k < 4: scalar code on the packed row, twice as fast as a 4-long loop LLVM would not
    vectorize (a trip count below its vector width)."""
    t = I32(0)
    for k in range(4):
        q = I32((v >> I32(8 * k)) & I32(255)) * (I32(1) - I32(2) * ((sg >> I32(k)) & I32(1)))
        t = I32(t + q * I32(xq[xo + k]))
    return t


@nb.njit(**_CALLED)
def q8dot_iq2_xxs(w, xq, xd, xb):
    acc = F0
    k8 = opaque(xq.shape[0], 256) // 32  # 8, opaque to LLVM: see _group8
    for s in range(xq.shape[0] // 256):
        o = 66 * s
        isum = I32(0)
        for j in range(8):
            b = o + 2 + 8 * j  # u8 grid rows [4], u32 aux (4 sign indices of 7 bits, scale in the top 4)
            aux = _u32(w, b + 4)
            t = I32(0)
            for l in range(4):
                t = I32(t + _group8(_G2XXS, w[b + l], _SIGN_K, (aux >> I32(7 * l)) & I32(127), xq,
                                    256 * s + 32 * j + 8 * l, k8))
            isum = I32(isum + I32(2 * ((aux >> I32(28)) & I32(15)) + 1) * t)
        acc += ((f16_at(w, o) * EIGHTH) * xd[s]) * np.float32(isum)
    return acc


@nb.njit(**_CALLED)
def q8dot_iq2_xs(w, xq, xd, xb):
    acc = F0
    k8 = opaque(xq.shape[0], 256) // 32  # 8, opaque to LLVM: see _group8
    for s in range(xq.shape[0] // 256):
        o = 74 * s  # f16 d | u16 qs [32] | scales [8]
        isum = I32(0)
        for i in range(16):  # 16 weights: two groups, one scale nibble
            ls = I32(2 * ((I32(w[o + 66 + i // 2]) >> I32(4 * (i % 2))) & I32(15)) + 1)
            t = I32(0)
            for h in range(2):
                q = 2 * i + h
                v = _u16(w, o + 2 + 2 * q)
                t = I32(t + _group8(_G2XS, v & I32(511), _SIGN_K, v >> I32(9), xq, 256 * s + 8 * q, k8))
            isum = I32(isum + ls * t)
        acc += ((f16_at(w, o) * EIGHTH) * xd[s]) * np.float32(isum)
    return acc


@nb.njit(**_CALLED)
def q8dot_iq2_s(w, xq, xd, xb):
    acc = F0
    k8 = opaque(xq.shape[0], 256) // 32  # 8, opaque to LLVM: see _group8
    for s in range(xq.shape[0] // 256):
        o = 82 * s  # f16 d | qs [32] | signs [32] | qh [8] | scales [8]
        isum = I32(0)
        for i in range(16):
            ls = I32(2 * ((I32(w[o + 74 + i // 2]) >> I32(4 * (i % 2))) & I32(15)) + 1)
            t = I32(0)
            for h in range(2):
                q = 2 * i + h
                g = I32(w[o + 2 + q]) | (((I32(w[o + 66 + q // 4]) >> I32(2 * (q % 4))) & I32(3)) << I32(8))
                t = I32(t + _group8(_G2S, g, _SIGN_BYTE, w[o + 34 + q], xq, 256 * s + 8 * q, k8))
            isum = I32(isum + ls * t)
        acc += ((f16_at(w, o) * EIGHTH) * xd[s]) * np.float32(isum)
    return acc


@nb.njit(**_CALLED)
def q8dot_iq3_xxs(w, xq, xd, xb):
    acc = F0
    for s in range(xq.shape[0] // 256):
        o = 98 * s  # f16 d | qs [64] (4-weight grid rows) | u32 aux [8]
        isum = I32(0)
        for j in range(8):
            aux = _u32(w, o + 66 + 4 * j)
            t = I32(0)
            for l in range(4):
                b = o + 2 + 8 * j + 2 * l
                sg = _KSIGN_BITS[(aux >> I32(7 * l)) & I32(127)]
                xo = 256 * s + 32 * j + 8 * l
                t = I32(t + _row4(_G3XXS[w[b]], sg, xq, xo) + _row4(_G3XXS[w[b + 1]], sg >> I32(4), xq, xo + 4))
            isum = I32(isum + I32(2 * ((aux >> I32(28)) & I32(15)) + 1) * t)
        acc += ((f16_at(w, o) * QUARTER) * xd[s]) * np.float32(isum)
    return acc


@nb.njit(**_CALLED)
def q8dot_iq3_s(w, xq, xd, xb):
    acc = F0
    for s in range(xq.shape[0] // 256):
        o = 110 * s  # f16 d | qs [64] | qh [8] | signs [32] | scales [4]
        isum = I32(0)
        for j in range(8):
            ls = I32(2 * ((I32(w[o + 106 + j // 2]) >> I32(4 * (j % 2))) & I32(15)) + 1)
            hb = I32(w[o + 66 + j])  # bit 8 of the sub-block's 8 grid rows
            t = I32(0)
            for l in range(4):
                e = 8 * j + 2 * l
                g0 = I32(w[o + 2 + e]) | (((hb >> I32(2 * l)) & I32(1)) << I32(8))
                g1 = I32(w[o + 3 + e]) | (((hb >> I32(2 * l + 1)) & I32(1)) << I32(8))
                sg = I32(w[o + 74 + 4 * j + l])
                xo = 256 * s + 32 * j + 8 * l
                t = I32(t + _row4(_G3S[g0], sg, xq, xo) + _row4(_G3S[g1], sg >> I32(4), xq, xo + 4))
            isum = I32(isum + ls * t)
        acc += (f16_at(w, o) * xd[s]) * np.float32(isum)
    return acc


@nb.njit(**_CALLED)
def q8dot_iq1_s(w, xq, xd, xb):
    acc = F0
    k8 = opaque(xq.shape[0], 256) // 32  # 8, opaque to LLVM: see _group8
    for s in range(xq.shape[0] // 256):
        o = 50 * s  # f16 d | qs [32] | u16 qh [8]: 4 x 3 high grid bits, 3-bit scale, delta sign
        isum = I32(0)
        for j in range(8):
            qh = _u16(w, o + 34 + 2 * j)
            t = I32(0)
            for l in range(4):
                g = I32(w[o + 2 + 4 * j + l]) | (((qh >> I32(3 * l)) & I32(7)) << I32(8))
                xo = 256 * s + 32 * j + 8 * l
                for k in range(k8):
                    t = I32(t + I32(_G1[g, k]) * I32(xq[xo + k]))
            x = I32(xb[16 * s + 2 * j] + xb[16 * s + 2 * j + 1])
            sub = I32(I32(8) * t + (-x if qh & I32(0x8000) else x))
            isum = I32(isum + I32(2 * ((qh >> I32(12)) & I32(7)) + 1) * sub)
        acc += ((f16_at(w, o) * EIGHTH) * xd[s]) * np.float32(isum)
    return acc


@nb.njit(**_CALLED)
def q8dot_iq1_m(w, xq, xd, xb):
    acc = F0
    k8 = opaque(xq.shape[0], 256) // 32  # 8, opaque to LLVM: see _group8
    for s in range(xq.shape[0] // 256):
        o = 56 * s  # qs [32] | qh [16] (a nibble per group: 3 high grid bits, delta sign) | u16 scales [4]
        u0, u1, u2, u3 = _u16(w, o + 48), _u16(w, o + 50), _u16(w, o + 52), _u16(w, o + 54)
        d = f16_to_f32((u0 >> I32(12)) | ((u1 >> I32(8)) & I32(0xF0)) | ((u2 >> I32(4)) & I32(0xF00))
                       | (u3 & I32(0xF000)))
        isum = I32(0)
        for i in range(16):  # 16 weights: two groups, one 3-bit scale
            ls = I32(2 * ((_u16(w, o + 48 + 2 * (i // 4)) >> I32(3 * (i % 4))) & I32(7)) + 1)
            t = I32(0)
            for h in range(2):
                q = 2 * i + h
                nib = (I32(w[o + 32 + q // 2]) >> I32(4 * (q % 2))) & I32(15)
                g = I32(w[o + q]) | ((nib & I32(7)) << I32(8))
                e = I16(-1) if nib & I32(8) else I16(1)
                xo = 256 * s + 8 * q
                for k in range(k8):
                    t = I32(t + I32(I16(I16(8) * I16(_G1[g, k]) + e)) * I32(xq[xo + k]))
            isum = I32(isum + ls * t)
        acc += ((d * EIGHTH) * xd[s]) * np.float32(isum)
    return acc


PORTABLE = {int(T.IQ2_XXS): q8dot_iq2_xxs, int(T.IQ2_XS): q8dot_iq2_xs, int(T.IQ2_S): q8dot_iq2_s,
            int(T.IQ3_XXS): q8dot_iq3_xxs, int(T.IQ3_S): q8dot_iq3_s, int(T.IQ1_S): q8dot_iq1_s,
            int(T.IQ1_M): q8dot_iq1_m}
