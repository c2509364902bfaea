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
I32 = np.int32
F0 = np.float32(0.0)
_POW3 = np.array([1, 3, 9, 27, 81], np.int32)
_POW3.setflags(write=False)


@nb.njit(inline="always", cache=True)
def _block_sum(xb, s):
    x = I32(0)
    for j in range(16):
        x = I32(x + xb[16 * s + j])
    return x


@nb.njit(inline="always", cache=True)
def _trits(w, qo, n, pw, xq, xo):
    """sum_m t(w[qo + m] at power pw) xq[xo + m] over m < n."""
    t = I32(0)
    for m in range(n):
        b = (I32(w[qo + m]) * pw) & I32(255)
        t = I32(t + ((b * I32(3)) >> I32(8)) * I32(xq[xo + m]))
    return t


@nb.njit(**_CALLED)
def q8dot_tq1_0(w, xq, xd, xb):
    acc = F0
    for s in range(xq.shape[0] // 256):
        o = 54 * s
        xo = 256 * s
        t = I32(0)
        for p in range(5):
            t = I32(t + _trits(w, o, 32, _POW3[p], xq, xo + 32 * p)
                    + _trits(w, o + 32, 16, _POW3[p], xq, xo + 160 + 16 * p))
        for p in range(4):
            t = I32(t + _trits(w, o + 48, 4, _POW3[p], xq, xo + 240 + 4 * p))
        acc += (f16_at(w, o + 52) * xd[s]) * np.float32(I32(t - _block_sum(xb, s)))
    return acc


@nb.njit(**_CALLED)
def q8dot_tq2_0(w, xq, xd, xb):
    acc = F0
    for s in range(xq.shape[0] // 256):
        o = 66 * s
        t = I32(0)
        for c in range(2):
            for p in range(4):
                xo = 256 * s + 128 * c + 32 * p
                for m in range(32):
                    t = I32(t + ((I32(w[o + 32 * c + m]) >> I32(2 * p)) & I32(3)) * I32(xq[xo + m]))
        acc += (f16_at(w, o + 64) * xd[s]) * np.float32(I32(t - _block_sum(xb, s)))
    return acc


PORTABLE = {int(T.TQ1_0): q8dot_tq1_0, int(T.TQ2_0): q8dot_tq2_0}
