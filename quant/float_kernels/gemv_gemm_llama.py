"""GEMV / GEMM drivers for the formats of llama.cpp's low-bit presets (rows in rows_lowbit) and
its code-book formats (rows in rows_iq).

One driver pair per format, each a one-line call of gemv_gemm's generic bodies with the
format's row function inlined (see gemv_gemm for why). Shapes are gemv_gemm's.
"""

from __future__ import annotations

import numba as nb

from .gemv_gemm import _gemm, _gemv, _tile_dots_2x4, _tile_dots_4x4
from .rows_iq import (deq_iq1_m, deq_iq1_s, deq_iq2_s, deq_iq2_xs, deq_iq2_xxs, deq_iq3_s, deq_iq3_xxs,
                      dot_iq1_m, dot_iq1_s, dot_iq2_s, dot_iq2_xs, dot_iq2_xxs, dot_iq3_s, dot_iq3_xxs)
from .rows_lowbit import (deq_iq4_nl, deq_q2_k, deq_q3_k, deq_q4_1, deq_q5_0, deq_q5_1, deq_tq1_0, deq_tq2_0,
                          dot_iq4_nl, dot_q2_k, dot_q3_k, dot_q4_1, dot_q5_0, dot_q5_1, dot_tq1_0, dot_tq2_0)

_PAR = dict(parallel=True, fastmath=True, cache=True)


@nb.njit(**_PAR)
def gemv_q4_1(w, x, xs, lut, out):
    _gemv(dot_q4_1, w, x, xs, lut, out)


@nb.njit(**_PAR)
def gemm_q4_1(w, X, lut, scratch, out):
    _gemm(deq_q4_1, _tile_dots_4x4, w, X, lut, scratch, out)


@nb.njit(**_PAR)
def gemv_q5_0(w, x, xs, lut, out):
    _gemv(dot_q5_0, w, x, xs, lut, out)


@nb.njit(**_PAR)
def gemm_q5_0(w, X, lut, scratch, out):
    _gemm(deq_q5_0, _tile_dots_4x4, w, X, lut, scratch, out)


@nb.njit(**_PAR)
def gemv_q5_1(w, x, xs, lut, out):
    _gemv(dot_q5_1, w, x, xs, lut, out)


@nb.njit(**_PAR)
def gemm_q5_1(w, X, lut, scratch, out):
    _gemm(deq_q5_1, _tile_dots_4x4, w, X, lut, scratch, out)


@nb.njit(**_PAR)
def gemv_iq4_nl(w, x, xs, lut, out):
    _gemv(dot_iq4_nl, w, x, xs, lut, out)


@nb.njit(**_PAR)
def gemm_iq4_nl(w, X, lut, scratch, out):
    _gemm(deq_iq4_nl, _tile_dots_4x4, w, X, lut, scratch, out)


@nb.njit(**_PAR)
def gemv_q2_k(w, x, xs, lut, out):
    _gemv(dot_q2_k, w, x, xs, lut, out)


@nb.njit(**_PAR)
def gemm_q2_k(w, X, lut, scratch, out):
    _gemm(deq_q2_k, _tile_dots_4x4, w, X, lut, scratch, out)


@nb.njit(**_PAR)
def gemv_q3_k(w, x, xs, lut, out):
    _gemv(dot_q3_k, w, x, xs, lut, out)


@nb.njit(**_PAR)
def gemm_q3_k(w, X, lut, scratch, out):
    _gemm(deq_q3_k, _tile_dots_4x4, w, X, lut, scratch, out)


@nb.njit(**_PAR)
def gemv_tq1_0(w, x, xs, lut, out):
    _gemv(dot_tq1_0, w, x, xs, lut, out)


@nb.njit(**_PAR)
def gemm_tq1_0(w, X, lut, scratch, out):
    _gemm(deq_tq1_0, _tile_dots_2x4, w, X, lut, scratch, out)


@nb.njit(**_PAR)
def gemv_tq2_0(w, x, xs, lut, out):
    _gemv(dot_tq2_0, w, x, xs, lut, out)


@nb.njit(**_PAR)
def gemm_tq2_0(w, X, lut, scratch, out):
    _gemm(deq_tq2_0, _tile_dots_4x4, w, X, lut, scratch, out)


@nb.njit(**_PAR)
def gemv_iq2_xxs(w, x, xs, lut, out):
    _gemv(dot_iq2_xxs, w, x, xs, lut, out)


@nb.njit(**_PAR)
def gemm_iq2_xxs(w, X, lut, scratch, out):
    _gemm(deq_iq2_xxs, _tile_dots_2x4, w, X, lut, scratch, out)


@nb.njit(**_PAR)
def gemv_iq2_xs(w, x, xs, lut, out):
    _gemv(dot_iq2_xs, w, x, xs, lut, out)


@nb.njit(**_PAR)
def gemm_iq2_xs(w, X, lut, scratch, out):
    _gemm(deq_iq2_xs, _tile_dots_2x4, w, X, lut, scratch, out)


@nb.njit(**_PAR)
def gemv_iq2_s(w, x, xs, lut, out):
    _gemv(dot_iq2_s, w, x, xs, lut, out)


@nb.njit(**_PAR)
def gemm_iq2_s(w, X, lut, scratch, out):
    _gemm(deq_iq2_s, _tile_dots_2x4, w, X, lut, scratch, out)


@nb.njit(**_PAR)
def gemv_iq3_xxs(w, x, xs, lut, out):
    _gemv(dot_iq3_xxs, w, x, xs, lut, out)


@nb.njit(**_PAR)
def gemm_iq3_xxs(w, X, lut, scratch, out):
    _gemm(deq_iq3_xxs, _tile_dots_2x4, w, X, lut, scratch, out)


@nb.njit(**_PAR)
def gemv_iq3_s(w, x, xs, lut, out):
    _gemv(dot_iq3_s, w, x, xs, lut, out)


@nb.njit(**_PAR)
def gemm_iq3_s(w, X, lut, scratch, out):
    _gemm(deq_iq3_s, _tile_dots_2x4, w, X, lut, scratch, out)


@nb.njit(**_PAR)
def gemv_iq1_s(w, x, xs, lut, out):
    _gemv(dot_iq1_s, w, x, xs, lut, out)


@nb.njit(**_PAR)
def gemm_iq1_s(w, X, lut, scratch, out):
    _gemm(deq_iq1_s, _tile_dots_2x4, w, X, lut, scratch, out)


@nb.njit(**_PAR)
def gemv_iq1_m(w, x, xs, lut, out):
    _gemv(dot_iq1_m, w, x, xs, lut, out)


@nb.njit(**_PAR)
def gemm_iq1_m(w, X, lut, scratch, out):
    _gemm(deq_iq1_m, _tile_dots_2x4, w, X, lut, scratch, out)
