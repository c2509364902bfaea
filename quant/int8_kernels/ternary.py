"""TQ1_0 and TQ2_0 rows (ternary weights) times int8 activations: portable loops.

Shape legend (as row_dot's)
    C    columns, a multiple of 256        nsb = C / 256 super-blocks
    xq   int8 [C]   xd float32 [C / 256]   xb int32 [C / 16]   (row_dot.quantize_row)
    w    uint8 [nsb * 54] (TQ1_0) or [nsb * 66] (TQ2_0): one GGUF row

Both store w = d (t - 1) with t in {0, 1, 2} and one f16 d per super-block:

    TQ2_0  qs [64] | f16 d         t of weight 128 c + 32 p + m = (qs[32 c + m] >> 2 p) & 3
    TQ1_0  qs [48] | qh [4] | f16 d   five trits per byte, read as t = ((b 3^p mod 256) * 3) >> 8:
           weights 32 p + m from qs[m] (p < 5), 160 + 16 p + m from qs[32 + m] (p < 5),
           240 + 4 p + m from qh[m] (p < 4)

so per super-block sum_c w x = (d xd) I with I = sum t xq - sum xq, the second sum from xb
(an exact integer, |I| < 2^16). Each row dot adds (d * xd) * I per super-block to its float32
sum, left to right (FIXED_ORDER), as llama.cpp's ggml_vec_dot_tq*_q8_K do.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from gguf import GGMLQuantizationType as T

from ..bits import f16_at
from ..jit import FIXED_ORDER

_CALLED = dict(fastmath=FIXED_ORDER, cache=True)  # as row_dot's portable loops (see there)
I16 = np.int16
I32 = np.int32
F0 = np.float32(0.0)


@nb.njit(inline="always", cache=True)
def _block_sum(xb, s):
    x = I32(0)
    for j in range(16):
        x = I32(x + xb[16 * s + j])
    return x


@nb.njit(inline="always", cache=True)
def _trit(b, pw):
    """Trit p of byte b (pw = 3^p): ((b pw mod 256) * 3) >> 8, as int16."""
    return I16(((b * pw) & I32(255)) * I32(3) >> I32(8))


@nb.njit(inline="always", cache=True)
def _five_trits(w, qo, n, xq, xo):
    """sum over m < n of the five trits of byte w[qo + m] times xq[xo + p n + m] (p < 5). The
    byte is read once for its five weights: LLVM vectorizes the loop over m (a loop per trit
    would run scalar)."""
    t = I32(0)
    for m in range(n):
        b = I32(w[qo + m])
        t = I32(t + I32(_trit(b, I32(1))) * I32(xq[xo + m]) + I32(_trit(b, I32(3))) * I32(xq[xo + n + m])
                + I32(_trit(b, I32(9))) * I32(xq[xo + 2 * n + m]) + I32(_trit(b, I32(27))) * I32(xq[xo + 3 * n + m])
                + I32(_trit(b, I32(81))) * I32(xq[xo + 4 * n + m]))
    return t


@nb.njit(**_CALLED)
def q8dot_tq1_0(w, xq, xd, xb):
    acc = F0
    for s in range(xq.shape[0] // 256):
        o = 54 * s
        xo = 256 * s
        t = I32(_five_trits(w, o, 32, xq, xo) + _five_trits(w, o + 32, 16, xq, xo + 160))
        for m in range(4):  # qh: four trits a byte, weights 240 + 4 p + m
            b = I32(w[o + 48 + m])
            t = I32(t + I32(_trit(b, I32(1))) * I32(xq[xo + 240 + m]) + I32(_trit(b, I32(3))) * I32(xq[xo + 244 + m])
                    + I32(_trit(b, I32(9))) * I32(xq[xo + 248 + m]) + I32(_trit(b, I32(27))) * I32(xq[xo + 252 + m]))
        acc += (f16_at(w, o + 52) * xd[s]) * np.float32(I32(t - _block_sum(xb, s)))
    return acc


@nb.njit(**_CALLED)
def q8dot_tq2_0(w, xq, xd, xb):
    acc = F0
    for s in range(xq.shape[0] // 256):
        o = 66 * s
        t = I32(0)
        for c in range(2):  # a byte holds weights 128 c + 32 p + m, p < 4: read once for the four
            qo = o + 32 * c
            xo = 256 * s + 128 * c
            for m in range(32):
                b = I32(w[qo + m])
                t = I32(t + I32(I16(b & I32(3))) * I32(xq[xo + m])
                        + I32(I16((b >> I32(2)) & I32(3))) * I32(xq[xo + 32 + m])
                        + I32(I16((b >> I32(4)) & I32(3))) * I32(xq[xo + 64 + m])
                        + I32(I16(b >> I32(6))) * I32(xq[xo + 96 + m]))
        acc += (f16_at(w, o + 64) * xd[s]) * np.float32(I32(t - _block_sum(xb, s)))
    return acc


PORTABLE = {int(T.TQ1_0): q8dot_tq1_0, int(T.TQ2_0): q8dot_tq2_0}
