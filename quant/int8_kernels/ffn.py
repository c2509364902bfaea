"""A weighted sum of SwiGLU FFNs of one token, in one parallel call (a decode step's experts).

Shape legend
    H  hidden   I_m  FFN m's width   M  FFNs
    desc     int64 [M, 6]   per FFN: gate/up format, down format, gate, up and down addresses, I_m
                            (int8_kernels.ffn_descriptor)
    weights  float32 [M]    limits float32 [M] (SwiGLU clamp, 0 for none)
    x        float32 [H]    out float32 [H], added into:
    out += sum_m weights[m] * down_m @ (min(silu(g), L_m) * clip(u, -L_m, L_m)),  g, u = gate_m @ x, up_m @ x
    scratch  FFNScratch, from ffn_scratch(H, M, sum I_m) or larger: every buffer the call needs
Terms are summed in entry order, then added to out: out[r] + (w_0 y_0[r] + w_1 y_1[r] + ...).

The SwiGLU and that sum are separately compiled functions in a fixed order (quant.jit.FIXED_ORDER),
called, not inlined, by the fast-math kernel: a chunk of tokens (runtime.model.ops.swiglu, and
the MoE sum of runtime.model.ffn) makes the same roundings, so one token's FFN output is the same
whether a decode step or a prefill chunk computed it.
"""

from __future__ import annotations

from typing import NamedTuple

import numba as nb
import numpy as np

from ..jit import FIXED_ORDER
from .gemv_gemm import activation_sums, bytes_per_256, find, gemv_unit, row_blocks
from .row_dot import quantize_row


class FFNScratch(NamedTuple):
    """The buffers of one swiglu_ffns call, allocated once by its caller."""
    xq: np.ndarray  # int8 [H]
    xd: np.ndarray  # float32 [H / 256]
    xb: np.ndarray  # int32 [H / 16]
    starts: np.ndarray  # int64 [M + 1]
    gu: np.ndarray  # float32 [2 W]   gate and up outputs       (W: the sum of the FFNs' widths)
    act: np.ndarray  # float32 [W]    SwiGLU outputs
    hq: np.ndarray  # int8 [W]        ... quantized
    hd: np.ndarray  # float32 [W / 256]
    hb: np.ndarray  # int32 [W / 16]
    y: np.ndarray  # float32 [M, H]  each FFN's output, summed in entry order at the end


def ffn_scratch(hidden: int, max_ffns: int, max_width: int) -> FFNScratch:
    """Buffers for swiglu_ffns calls of up to max_ffns FFNs whose widths sum to at most max_width."""
    return FFNScratch(np.empty(hidden, np.int8), np.empty(hidden // 256, np.float32),
                      np.empty(hidden // 16, np.int32), np.empty(max_ffns + 1, np.int64),
                      np.empty(2 * max_width, np.float32), np.empty(max_width, np.float32),
                      np.empty(max_width, np.int8), np.empty(max_width // 256, np.float32),
                      np.empty(max_width // 16, np.int32), np.empty((max_ffns, hidden), np.float32))


@nb.njit(fastmath=FIXED_ORDER, cache=True)
def swiglu_row(g, u, lim, out):
    """out [I] = min(silu(g), lim) * clip(u, -lim, lim) (no clamp when lim <= 1e-6), g, u [I]."""
    for k in range(g.shape[0]):
        gv = g[k]
        uv = u[k]
        a = gv / (np.float32(1.0) + np.exp(-gv))
        if lim > np.float32(1e-6):
            a = min(a, lim)
            uv = min(max(uv, -lim), lim)
        out[k] = a * uv


@nb.njit(fastmath=FIXED_ORDER, cache=True)
def add_weighted_sum(y, weights, m_count, out):
    """out [H] += sum over m < m_count of weights[m] * y[m] (y [>= M, H]), summed in entry order
    first: the order in which a prefill chunk adds the shared expert and the routed ones."""
    for r in range(out.shape[0]):
        t = weights[0] * y[0, r]
        for m in range(1, m_count):
            t = t + weights[m] * y[m, r]
        out[r] = out[r] + t


def build(formats: int):
    """swiglu_ffns(desc, weights, limits, x, out, scratch) for FFNs of the formats in `formats`."""

    @nb.njit(parallel=True, fastmath=True, cache=True)
    def swiglu_ffns(desc, weights, limits, x, out, scratch):
        m_count = desc.shape[0]
        qt = desc[:, 0:2]
        addr = desc[:, 2:5]
        inter = desc[:, 5]
        h = x.shape[0]
        xq, xd, xb = scratch.xq, scratch.xd, scratch.xb
        quantize_row(x, xq, xd, xb)
        # gate and up rows of every expert, one parallel loop: expert m owns gu[2 * s[m] : 2 * s[m + 1]]
        s = scratch.starts
        s[0] = 0
        for m in range(m_count):
            s[m + 1] = s[m] + inter[m]
        if s[m_count] > scratch.act.shape[0]:
            raise ValueError("swiglu_ffns: the FFNs are wider than the scratch (ffn_scratch max_width)")
        gu = scratch.gu
        xs4 = np.empty(h // 32, np.int16)
        xs6 = np.empty(h // 16, np.int16)
        activation_sums(xb, xs4, xs6)
        # units (16-row blocks or rows, see gemv_gemm.gemv_unit) of matrix 2 m (gate) and 2 m + 1 (up)
        units = np.empty(2 * m_count + 1, np.int64)
        units[0] = 0
        for mm in range(2 * m_count):
            units[mm + 1] = units[mm] + inter[mm // 2] - 15 * row_blocks(formats, qt[mm // 2, 0], inter[mm // 2], h // 256)
        for u in nb.prange(units[2 * m_count]):
            mm = find(units, u)
            m = mm // 2
            i = inter[m]
            o = 2 * s[m] + (mm - 2 * m) * i
            gemv_unit(formats, qt[m, 0], addr[m, mm - 2 * m], h // 256 * bytes_per_256(qt[m, 0]), i, u - units[mm],
                      xq, xd, xb, xs4, xs6, gu[o:o + i])
        # SwiGLU and the hidden vectors' quantization, per expert
        hq, hd, hb, act = scratch.hq, scratch.hd, scratch.hb, scratch.act
        for m in nb.prange(m_count):
            i = inter[m]
            g0 = 2 * s[m]
            swiglu_row(gu[g0:g0 + i], gu[g0 + i:g0 + 2 * i], limits[m], act[s[m]:s[m + 1]])
            quantize_row(act[s[m]:s[m + 1]], hq[s[m]:s[m + 1]], hd[s[m] // 256:s[m + 1] // 256],
                         hb[s[m] // 16:s[m + 1] // 16])
        # down rows of every expert, then the weighted sum in entry order
        y = scratch.y
        hs4 = np.empty(s[m_count] // 32, np.int16)
        hs6 = np.empty(s[m_count] // 16, np.int16)
        activation_sums(hb[:s[m_count] // 16], hs4, hs6)
        for m in range(m_count):
            units[m + 1] = units[m] + h - 15 * row_blocks(formats, qt[m, 1], h, inter[m] // 256)
        for u in nb.prange(units[m_count]):
            m = find(units[:m_count + 1], u)
            a, b = s[m], s[m + 1]
            gemv_unit(formats, qt[m, 1], addr[m, 2], (b - a) // 256 * bytes_per_256(qt[m, 1]), h, u - units[m],
                      hq[a:b], hd[a // 256:b // 256], hb[a // 16:b // 16], hs4[a // 32:b // 32], hs6[a // 16:b // 16],
                      y[m])
        add_weighted_sum(y, weights, m_count, out)

    return swiglu_ffns
