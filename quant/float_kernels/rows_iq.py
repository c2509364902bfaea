"""Row dot and row decode for llama.cpp's code-book formats: IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS,
IQ3_S, IQ1_S and IQ1_M (layouts in quant.formats; weight 32j + 8l + k of a super-block is
sub-block j, group l, position k).

Shape legend (as in row_dot and row_decode)
    w     uint8   [row_bytes]   one row of GGUF blocks
    x     float32 [C]           activations
    lut   float32 [G + S, W]    the format's table (``table``): rows 0..G-1 the grid (W = 8, or 4
                                for IQ3), then S rows of +-1 sign patterns
    tile  float32 [RT, CT]      decode target: row i receives W[c0:c0+n] in its first n entries

A group of 8 weights is one grid row (two for IQ3) times one sign row, so its dot is a
plain loop over 8 contiguous floats of each: LLVM turns it into vector loads and
multiply-adds. Its trip count comes from ``quant.jit.opaque``: with a literal 8 LLVM
unrolls it and vectorizes the groups instead, with gathers, 4x slower. The tables are built once (``table``) from quant.iq_grids and passed in, so
the kernels stay pure functions of their arguments.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from gguf import GGMLQuantizationType as T

from ..bits import f16_at, f16_to_f32
from ..iq_grids import GRIDS, IQ1_DELTA, KSIGNS
from ..jit import opaque

_JIT = dict(inline="always", fastmath=True, cache=True)
F0 = np.float32(0.0)
HALF = np.float32(0.5)
QUARTER = np.float32(0.25)

# first sign row of each table: the grid's row count
S_IQ2_XXS, S_IQ2_XS, S_IQ2_S, S_IQ3_XXS, S_IQ3_S = 256, 512, 1024, 256, 512


def table(qtype) -> np.ndarray:
    """The read-only float32 table the kernels of ``qtype`` take as ``lut``."""
    qtype = T(qtype)
    grid = GRIDS[qtype].astype(np.float32)
    bits = np.arange(8, dtype=np.uint8)
    if qtype in (T.IQ2_XXS, T.IQ2_XS, T.IQ3_XXS):
        sign_bytes = KSIGNS             # a 7-bit sign index -> its 8 signs
    elif qtype in (T.IQ2_S, T.IQ3_S):
        sign_bytes = np.arange(256, dtype=np.uint8)  # the block stores the 8 sign bits themselves
    else:
        sign_bytes = np.zeros(0, np.uint8)  # IQ1: no signs
    signs = np.where((sign_bytes[:, None] >> bits) & np.uint8(1), np.float32(-1), np.float32(1))
    out = np.ascontiguousarray(np.concatenate([grid, signs.reshape(-1, grid.shape[1])]), np.float32)
    out.setflags(write=False)
    return out


@nb.njit(**_JIT)
def _u32_at(w, o):
    return (np.uint32(w[o]) | (np.uint32(w[o + 1]) << np.uint32(8)) | (np.uint32(w[o + 2]) << np.uint32(16))
            | (np.uint32(w[o + 3]) << np.uint32(24)))


@nb.njit(**_JIT)
def _u16_at(w, o):
    return np.int32(w[o]) | (np.int32(w[o + 1]) << 8)


@nb.njit(**_JIT)
def _dot8(lut, g, sg, x, xo, k8):
    """sum_k grid[g, k] * sign[sg, k] * x[xo + k] over one group of k8 = 8 (8-wide table)."""
    t = F0
    for k in range(k8):
        t += lut[g, k] * lut[sg, k] * x[xo + k]
    return t


@nb.njit(**_JIT)
def _dot44(lut, g0, g1, sg, x, xo, k4):
    """The same for a 4-wide table: grid rows g0, g1 with sign rows sg, sg + 1 (k4 = 4)."""
    t = F0
    for k in range(k4):
        t += lut[g0, k] * lut[sg, k] * x[xo + k] + lut[g1, k] * lut[sg + 1, k] * x[xo + 4 + k]
    return t


@nb.njit(**_JIT)
def _grid_sum8(lut, g, x, xo, k8):
    """sum_k grid[g, k] * x[xo + k] and sum_k x[xo + k] (IQ1: no signs, a shift delta)."""
    t = F0
    u = F0
    for k in range(k8):
        t += lut[g, k] * x[xo + k]
        u += x[xo + k]
    return t, u


@nb.njit(**_JIT)
def _put8(tile, i, t, a, lut, g, sg, k8):
    for k in range(k8):
        tile[i, t + k] = a * lut[g, k] * lut[sg, k]


@nb.njit(**_JIT)
def _put44(tile, i, t, a, lut, g0, g1, sg, k4):
    for k in range(k4):
        tile[i, t + k] = a * lut[g0, k] * lut[sg, k]
        tile[i, t + 4 + k] = a * lut[g1, k] * lut[sg + 1, k]


# ---------------------------------------------------------------- IQ2_XXS, IQ2_XS, IQ2_S

@nb.njit(**_JIT)
def dot_iq2_xxs(w, x, xs, lut):
    acc = F0
    k8 = opaque(x.shape[0], 256) // 32  # 8, opaque: see row_dot
    for s in range(x.shape[0] // 256):
        o = 66 * s
        sb = F0
        for j in range(8):
            qo = o + 2 + 8 * j
            aux = _u32_at(w, qo + 4)
            t = F0
            for l in range(4):
                si = np.int32((aux >> np.uint32(7 * l)) & np.uint32(127))
                t += _dot8(lut, np.int32(w[qo + l]), S_IQ2_XXS + si, x, 256 * s + 32 * j + 8 * l, k8)
            sb += (HALF + np.float32(np.int32(aux >> np.uint32(28)))) * t
        acc += f16_at(w, o) * QUARTER * sb
    return acc


@nb.njit(**_JIT)
def deq_iq2_xxs(w, c0, n, lut, tile, i):
    b0 = c0 // 256
    k8 = opaque(n, 256) // 32
    for s in range(n // 256):
        o = 66 * (b0 + s)
        d = f16_at(w, o)
        for j in range(8):
            qo = o + 2 + 8 * j
            aux = _u32_at(w, qo + 4)
            db = d * (HALF + np.float32(np.int32(aux >> np.uint32(28)))) * QUARTER
            for l in range(4):
                si = np.int32((aux >> np.uint32(7 * l)) & np.uint32(127))
                _put8(tile, i, 256 * s + 32 * j + 8 * l, db, lut, np.int32(w[qo + l]), S_IQ2_XXS + si, k8)


@nb.njit(**_JIT)
def _iq2_ls(w, so, j, l):
    """IQ2_XS / IQ2_S scale of group l of sub-block j (scales at w[so:]): one nibble per 16 weights."""
    return np.float32((np.int32(w[so + j]) >> (4 * (l >> 1))) & 15)


@nb.njit(**_JIT)
def dot_iq2_xs(w, x, xs, lut):
    acc = F0
    k8 = opaque(x.shape[0], 256) // 32  # 8, opaque: see row_dot
    for s in range(x.shape[0] // 256):
        o = 74 * s
        sb = F0
        for j in range(8):
            for l in range(4):
                v = _u16_at(w, o + 2 + 8 * j + 2 * l)
                t = _dot8(lut, v & 511, S_IQ2_XS + (v >> 9), x, 256 * s + 32 * j + 8 * l, k8)
                sb += (HALF + _iq2_ls(w, o + 66, j, l)) * t
        acc += f16_at(w, o) * QUARTER * sb
    return acc


@nb.njit(**_JIT)
def deq_iq2_xs(w, c0, n, lut, tile, i):
    b0 = c0 // 256
    k8 = opaque(n, 256) // 32
    for s in range(n // 256):
        o = 74 * (b0 + s)
        d = f16_at(w, o)
        for j in range(8):
            for l in range(4):
                v = _u16_at(w, o + 2 + 8 * j + 2 * l)
                db = d * (HALF + _iq2_ls(w, o + 66, j, l)) * QUARTER
                _put8(tile, i, 256 * s + 32 * j + 8 * l, db, lut, v & 511, S_IQ2_XS + (v >> 9), k8)


@nb.njit(**_JIT)
def _iq2s_row(w, o, j, l):
    return np.int32(w[o + 2 + 4 * j + l]) | (((np.int32(w[o + 66 + j]) >> (2 * l)) & 3) << 8)


@nb.njit(**_JIT)
def dot_iq2_s(w, x, xs, lut):
    acc = F0
    k8 = opaque(x.shape[0], 256) // 32  # 8, opaque: see row_dot
    for s in range(x.shape[0] // 256):
        o = 82 * s
        sb = F0
        for j in range(8):
            for l in range(4):
                t = _dot8(lut, _iq2s_row(w, o, j, l), S_IQ2_S + np.int32(w[o + 34 + 4 * j + l]), x,
                          256 * s + 32 * j + 8 * l, k8)
                sb += (HALF + _iq2_ls(w, o + 74, j, l)) * t
        acc += f16_at(w, o) * QUARTER * sb
    return acc


@nb.njit(**_JIT)
def deq_iq2_s(w, c0, n, lut, tile, i):
    b0 = c0 // 256
    k8 = opaque(n, 256) // 32
    for s in range(n // 256):
        o = 82 * (b0 + s)
        d = f16_at(w, o)
        for j in range(8):
            for l in range(4):
                db = d * (HALF + _iq2_ls(w, o + 74, j, l)) * QUARTER
                _put8(tile, i, 256 * s + 32 * j + 8 * l, db, lut, _iq2s_row(w, o, j, l),
                      S_IQ2_S + np.int32(w[o + 34 + 4 * j + l]), k8)


# ---------------------------------------------------------------- IQ3_XXS, IQ3_S

@nb.njit(**_JIT)
def dot_iq3_xxs(w, x, xs, lut):
    acc = F0
    k4 = opaque(x.shape[0], 256) // 64  # 4, opaque: see row_dot
    for s in range(x.shape[0] // 256):
        o = 98 * s
        sb = F0
        for j in range(8):
            aux = _u32_at(w, o + 66 + 4 * j)
            t = F0
            for l in range(4):
                si = np.int32((aux >> np.uint32(7 * l)) & np.uint32(127))
                qo = o + 2 + 8 * j + 2 * l
                t += _dot44(lut, np.int32(w[qo]), np.int32(w[qo + 1]), S_IQ3_XXS + 2 * si, x,
                            256 * s + 32 * j + 8 * l, k4)
            sb += (HALF + np.float32(np.int32(aux >> np.uint32(28)))) * t
        acc += f16_at(w, o) * HALF * sb
    return acc


@nb.njit(**_JIT)
def deq_iq3_xxs(w, c0, n, lut, tile, i):
    b0 = c0 // 256
    k4 = opaque(n, 256) // 64
    for s in range(n // 256):
        o = 98 * (b0 + s)
        d = f16_at(w, o)
        for j in range(8):
            aux = _u32_at(w, o + 66 + 4 * j)
            db = d * (HALF + np.float32(np.int32(aux >> np.uint32(28)))) * HALF
            for l in range(4):
                si = np.int32((aux >> np.uint32(7 * l)) & np.uint32(127))
                qo = o + 2 + 8 * j + 2 * l
                _put44(tile, i, 256 * s + 32 * j + 8 * l, db, lut, np.int32(w[qo]), np.int32(w[qo + 1]),
                       S_IQ3_XXS + 2 * si, k4)


@nb.njit(**_JIT)
def _iq3s_row(w, o, e):
    """Grid row of 4-weight entry e of an IQ3_S block at w[o:]: 8 bits in qs, the ninth in qh."""
    return np.int32(w[o + 2 + e]) | (((np.int32(w[o + 66 + (e >> 3)]) >> (e & 7)) & 1) << 8)


@nb.njit(**_JIT)
def _iq3s_scale(w, o, j):
    return np.float32(1 + 2 * ((np.int32(w[o + 106 + (j >> 1)]) >> (4 * (j & 1))) & 15))


@nb.njit(**_JIT)
def dot_iq3_s(w, x, xs, lut):
    acc = F0
    k4 = opaque(x.shape[0], 256) // 64  # 4, opaque: see row_dot
    for s in range(x.shape[0] // 256):
        o = 110 * s
        sb = F0
        for j in range(8):
            t = F0
            for l in range(4):
                e = 8 * j + 2 * l
                t += _dot44(lut, _iq3s_row(w, o, e), _iq3s_row(w, o, e + 1),
                            S_IQ3_S + 2 * np.int32(w[o + 74 + 4 * j + l]), x, 256 * s + 32 * j + 8 * l, k4)
            sb += _iq3s_scale(w, o, j) * t
        acc += f16_at(w, o) * sb
    return acc


@nb.njit(**_JIT)
def deq_iq3_s(w, c0, n, lut, tile, i):
    b0 = c0 // 256
    k4 = opaque(n, 256) // 64
    for s in range(n // 256):
        o = 110 * (b0 + s)
        d = f16_at(w, o)
        for j in range(8):
            db = d * _iq3s_scale(w, o, j)
            for l in range(4):
                e = 8 * j + 2 * l
                _put44(tile, i, 256 * s + 32 * j + 8 * l, db, lut, _iq3s_row(w, o, e), _iq3s_row(w, o, e + 1),
                       S_IQ3_S + 2 * np.int32(w[o + 74 + 4 * j + l]), k4)


# ---------------------------------------------------------------- IQ1_S, IQ1_M

@nb.njit(**_JIT)
def _delta(flag):
    return -IQ1_DELTA if flag else IQ1_DELTA


@nb.njit(**_JIT)
def dot_iq1_s(w, x, xs, lut):
    acc = F0
    k8 = opaque(x.shape[0], 256) // 32  # 8, opaque: see row_dot
    for s in range(x.shape[0] // 256):
        o = 50 * s
        sb = F0
        for j in range(8):
            qh = _u16_at(w, o + 34 + 2 * j)
            t = F0
            u = F0
            for l in range(4):
                g = np.int32(w[o + 2 + 4 * j + l]) | (((qh >> (3 * l)) & 7) << 8)
                tl, ul = _grid_sum8(lut, g, x, 256 * s + 32 * j + 8 * l, k8)
                t += tl
                u += ul
            sb += np.float32(2 * ((qh >> 12) & 7) + 1) * (t + _delta(qh & 0x8000) * u)
        acc += f16_at(w, o) * sb
    return acc


@nb.njit(**_JIT)
def deq_iq1_s(w, c0, n, lut, tile, i):
    b0 = c0 // 256
    k8 = opaque(n, 256) // 32
    for s in range(n // 256):
        o = 50 * (b0 + s)
        d = f16_at(w, o)
        for j in range(8):
            qh = _u16_at(w, o + 34 + 2 * j)
            dl = d * np.float32(2 * ((qh >> 12) & 7) + 1)
            delta = _delta(qh & 0x8000)
            for l in range(4):
                g = np.int32(w[o + 2 + 4 * j + l]) | (((qh >> (3 * l)) & 7) << 8)
                t = 256 * s + 32 * j + 8 * l
                for k in range(k8):
                    tile[i, t + k] = dl * (lut[g, k] + delta)


@nb.njit(**_JIT)
def _iq1m_d(w, o):
    """IQ1_M's f16 super-block scale, spread over the top nibbles of its four u16 scales."""
    return f16_to_f32((np.int32(w[o + 49]) >> 4) | (np.int32(w[o + 51]) & 0xF0)
                      | ((np.int32(w[o + 53]) >> 4) << 8) | ((np.int32(w[o + 55]) & 0xF0) << 8))


@nb.njit(**_JIT)
def _iq1m_group(w, o, j, l):
    """(grid row, delta flag, 3-bit scale) of group l of sub-block j of an IQ1_M block at w[o:]."""
    h = (np.int32(w[o + 32 + 2 * j + (l >> 1)]) >> (4 * (l & 1))) & 15
    g = np.int32(w[o + 4 * j + l]) | ((h & 7) << 8)
    sc = (_u16_at(w, o + 48 + 2 * (j >> 1)) >> (3 * (2 * (j & 1) + (l >> 1)))) & 7
    return g, h & 8, sc


@nb.njit(**_JIT)
def dot_iq1_m(w, x, xs, lut):
    acc = F0
    k8 = opaque(x.shape[0], 256) // 32  # 8, opaque: see row_dot
    for s in range(x.shape[0] // 256):
        o = 56 * s
        sb = F0
        for j in range(8):
            for l in range(4):
                g, flag, sc = _iq1m_group(w, o, j, l)
                t, u = _grid_sum8(lut, g, x, 256 * s + 32 * j + 8 * l, k8)
                sb += np.float32(2 * sc + 1) * (t + _delta(flag) * u)
        acc += _iq1m_d(w, o) * sb
    return acc


@nb.njit(**_JIT)
def deq_iq1_m(w, c0, n, lut, tile, i):
    b0 = c0 // 256
    k8 = opaque(n, 256) // 32
    for s in range(n // 256):
        o = 56 * (b0 + s)
        d = _iq1m_d(w, o)
        for j in range(8):
            for l in range(4):
                g, flag, sc = _iq1m_group(w, o, j, l)
                dl = d * np.float32(2 * sc + 1)
                delta = _delta(flag)
                t = 256 * s + 32 * j + 8 * l
                for k in range(k8):
                    tile[i, t + k] = dl * (lut[g, k] + delta)
