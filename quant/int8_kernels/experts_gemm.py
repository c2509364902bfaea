"""A prefill chunk's routed experts in one call: each expert's SwiGLU FFN on its own tokens,
weighted, and added into the output in expert order.

Shape legend
    T tokens   H hidden   M experts   I_m expert m's width   W the widest (a multiple of 256)
    J          entries: the experts' tokens, expert m's at starts[m] .. starts[m + 1]
    desc       int64 [M, 6]   per expert: ffn_descriptor's (gate/up format, down format, gate, up
                              and down addresses, I_m), experts in the order their sums are added
    rows       int64 [J]      entry j's token (a row of X)      weights float32 [J]: its routing weight
    starts     int64 [M + 1]  limits float32 [M]: SwiGLU clamps (0: none)
    X          float32 [T, H]
    out        float32 [T, H], added into, entry after entry:
               out[rows[j]] += weights[j] * down_m @ swiglu(gate_m @ x, up_m @ x),  x = X[rows[j]]
    steps      int64: the GEMM steps of every format in desc (step_library.steps_for, summed;
               unused off VNNI hosts)

The arithmetic is the per-expert path's (runtime.model.ffn: matmul_many, swiglu, matmul, the
product with the weight, then the adds in expert order), step for step: each GEMM row comes
from the format's GEMM step or row step, whose bits are the GEMV's; the SwiGLU is swiglu_row;
each weighted output is rounded once before its add. So the outputs are the same bits, and a
token's result does not depend on which path or chunk computed it.

Why one call: a 128-token chunk of a 64-expert layer made about 64 x 6 kernel calls from Python
(quantize, GEMMs, SwiGLU, products), about a fifth of prefill's time on the miniatures. Here the
work runs as five parallel loops per layer over all experts' units at once: 16-row GEMM groups
(or single rows) of every expert, so 2 threads stay busy even on experts with one token.
"""

from __future__ import annotations

from functools import lru_cache

import numba as nb
import numpy as np

from ..bits import u8_at
from ..jit import FIXED_ORDER
from . import avx2
from . import avx512_vnni as vnni
from .ffn import swiglu_row
from .gemv_gemm import SUMS_PER, STEP_BASE, group_steps, row_steps, bytes_per_256, find
from .row_dot import q8dot, quantize_row

ROWS_PER_UNIT = 8  # rows of a unit where a matrix has no 16-row steps (as gemv_gemm.ROWS_PER_CHUNK)


@nb.njit(inline="always", cache=True)
def _grouped(qtype):
    """Whether a matrix of format qtype runs as 16-row GEMM steps (VNNI hosts, step formats)."""
    return vnni.AVAILABLE and STEP_BASE[qtype] >= 0


@nb.njit(inline="always", cache=True)
def _unit_count(qt, r):
    """Units of an r-row matrix of format qt: its 16-row groups, then ROWS_PER_UNIT rows at a time."""
    g = r // 16 if _grouped(qt) else 0
    return g + (r - 16 * g + ROWS_PER_UNIT - 1) // ROWS_PER_UNIT


@nb.njit(cache=True)
def _units(desc, down, hidden):
    """int64 [U, 3]: (expert, matrix, first row) per parallel unit of the gate/up phase (down 0:
    matrices 0 gate and 1 up, I_m rows each) or of the down phase (down 1: matrix 2, `hidden`
    rows). A unit is one 16-row group, or up to ROWS_PER_UNIT rows (those past the last group,
    or every row of a format without steps)."""
    kinds = 1 if down else 2
    count = 0
    for m in range(desc.shape[0]):
        count += kinds * _unit_count(desc[m, 1] if down else desc[m, 0], hidden if down else desc[m, 5])
    units = np.empty((count, 3), np.int64)
    u = 0
    for m in range(desc.shape[0]):
        qt = desc[m, 1] if down else desc[m, 0]
        g = (hidden if down else desc[m, 5]) // 16 if _grouped(qt) else 0
        n = _unit_count(qt, hidden if down else desc[m, 5])
        for k in range(kinds):
            for i in range(n):
                units[u, 0] = m
                units[u, 1] = 2 if down else k
                units[u, 2] = 16 * i if i < g else 16 * g + (i - g) * ROWS_PER_UNIT
                u += 1
    return units


@nb.njit(inline="always", fastmath=True, cache=True)
def _rows_avx2(formats, qtype, w, XQ, XD, XB, out, r0, r1):
    for r in range(r0, r1):
        row_steps(formats, qtype, w, XQ, XD, XB, out, r)


@nb.njit(inline="always", fastmath=True, cache=True)
def _rows_portable(formats, qtype, w, XQ, XD, XB, out, r0, r1):
    for r in range(r0, r1):
        for t in range(XQ.shape[0]):
            out[t, r] = q8dot(formats, qtype, w[r], XQ[t], XD[t], XB[t])


_rows = _rows_avx2 if avx2.AVAILABLE else _rows_portable  # rows of a matrix times every token (the GEMM's row steps)


@nb.njit(fastmath=True, cache=True)
def _unit(formats, u, units, desc, starts, steps, hidden, xq, xd, xb, xs, out):
    """Unit u: rows of one matrix times its expert's entries, into out[entries, its columns]
    (gate: 0 .. I_m, up: I_m .. 2 I_m, down: 0 .. hidden)."""
    m, k, r0 = units[u, 0], units[u, 1], units[u, 2]
    a, b = starts[m], starts[m + 1]
    if a == b:
        return
    qt = desc[m, 1] if k == 2 else desc[m, 0]
    r = hidden if k == 2 else desc[m, 5]
    c = desc[m, 5] if k == 2 else hidden  # columns
    rb = c // 256 * bytes_per_256(qt)
    col = desc[m, 5] if k == 1 else 0
    if _grouped(qt) and r0 + 16 <= r - r % 16:
        group_steps(steps, STEP_BASE[qt], desc[m, 2 + k] + r0 * rb, np.int64(rb), np.int64(c // 256),
                     np.int64(b - a), xq[a].ctypes.data, np.int64(xq.shape[1]), xs[a].ctypes.data,
                     np.int64(2 * xs.shape[1]), xd[a].ctypes.data, np.int64(4 * xd.shape[1]),
                     out[a].ctypes.data + 4 * (col + r0), np.int64(4 * out.shape[1]))
    else:
        w = u8_at(desc[m, 2 + k], r * rb).reshape((r, rb))
        _rows(formats, qt, w, xq[a:b, :c], xd[a:b, :c // 256], xb[a:b, :c // 16], out[a:b, col:col + r], r0,
              min(r0 + ROWS_PER_UNIT, r))


@nb.njit(inline="always", cache=True)
def _step_sums(qt, xb, xs, j, c):
    """Entry j's int16 activation sums over its first c columns, as format qt's GEMM steps take
    them (gemv_gemm._activation_sums)."""
    per = SUMS_PER[qt]
    for i in range(c // 16 // per):
        v = np.int32(0)
        for k in range(per):
            v += xb[j, per * i + k]
        xs[j, i] = np.int16(v)


@nb.njit(fastmath=True, cache=True)
def _entry_in(j, desc, rows, starts, X, xq, xd, xb, xs):
    """Entry j's token, rounded to int8 (quantize_row), and its sums for its expert's gate/up steps."""
    quantize_row(X[rows[j]], xq[j], xd[j], xb[j])
    _step_sums(desc[find(starts, j), 0], xb, xs, j, X.shape[1])


@nb.njit(fastmath=True, cache=True)
def _entry_hidden(j, desc, starts, limits, gu, act, hq, hd, hb, hs):
    """Entry j's SwiGLU of its gate and up outputs, rounded to int8, with its sums for the down steps."""
    m = find(starts, j)
    i = desc[m, 5]
    swiglu_row(gu[j, :i], gu[j, i:2 * i], limits[m], act[j, :i])
    quantize_row(act[j, :i], hq[j, :i], hd[j, :i // 256], hb[j, :i // 16])
    _step_sums(desc[m, 1], hb, hs, j, i)


@lru_cache(maxsize=None)
def build(formats: int):
    """experts(desc, rows, starts, weights, limits, X, out, steps) for experts of the formats in `formats`."""

    @nb.njit(parallel=True, fastmath=True, cache=True)
    def experts(desc, rows, starts, weights, limits, X, out, steps):
        j_count = rows.shape[0]
        h = X.shape[1]
        wmax = 0
        for m in range(desc.shape[0]):
            wmax = max(wmax, desc[m, 5])
        xq = np.empty((j_count, h), np.int8)
        xd = np.empty((j_count, h // 256), np.float32)
        xb = np.empty((j_count, h // 16), np.int32)
        xs = np.empty((j_count, h // 16), np.int16)
        for j in nb.prange(j_count):
            _entry_in(np.int64(j), desc, rows, starts, X, xq, xd, xb, xs)
        gu = np.empty((j_count, 2 * wmax), np.float32)  # entry j: its gate outputs, then its up outputs
        units = _units(desc, np.int64(0), h)
        for u in nb.prange(units.shape[0]):
            _unit(formats, np.int64(u), units, desc, starts, steps, h, xq, xd, xb, xs, gu)
        hq = np.empty((j_count, wmax), np.int8)
        hd = np.empty((j_count, wmax // 256), np.float32)
        hb = np.empty((j_count, wmax // 16), np.int32)
        hs = np.empty((j_count, wmax // 16), np.int16)
        act = np.empty((j_count, wmax), np.float32)
        for j in nb.prange(j_count):
            _entry_hidden(np.int64(j), desc, starts, limits, gu, act, hq, hd, hb, hs)
        y = np.empty((j_count, h), np.float32)
        units = _units(desc, np.int64(1), h)
        for u in nb.prange(units.shape[0]):
            _unit(formats, np.int64(u), units, desc, starts, steps, h, hq, hd, hb, hs, y)
        add_weighted(rows, weights, y, out)

    return experts


@nb.njit(parallel=True, fastmath=FIXED_ORDER, cache=True)
def add_weighted(rows, weights, y, out):
    """out[rows[j]] += weights[j] * y[j] for j in order (each product rounded, then added), in
    parallel over column blocks."""
    h = out.shape[1]
    for cb in nb.prange((h + 255) // 256):
        c0 = 256 * cb
        c1 = min(c0 + 256, h)
        for j in range(rows.shape[0]):
            wj = weights[j]
            t = rows[j]
            for c in range(c0, c1):
                out[t, c] = out[t, c] + wj * y[j, c]
