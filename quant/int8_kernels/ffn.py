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

from ..bits import u8_at
from ..jit import FIXED_ORDER
from .gemv_gemm import bytes_per_256, find
from .row_dot import q8dot, quantize_row


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
        for g in nb.prange(2 * s[m_count]):
            m = find(s, g // 2)
            j = g - 2 * s[m]  # 0 .. 2 I - 1: gate rows, then up rows
            rbm = h // 256 * bytes_per_256(qt[m, 0])
            which = j // inter[m]
            r = j - which * inter[m]
            w = u8_at(addr[m, which] + r * rbm, rbm)
            gu[g] = q8dot(formats, qt[m, 0], w, xq, xd, xb)
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
        for g in nb.prange(m_count * h):
            m = g // h
            r = g - m * h
            i = inter[m]
            rbm = i // 256 * bytes_per_256(qt[m, 1])
            w = u8_at(addr[m, 2] + r * rbm, rbm)
            y[m, r] = q8dot(formats, qt[m, 1], w, hq[s[m]:s[m + 1]], hd[s[m] // 256:s[m + 1] // 256],
                                     hb[s[m] // 16:s[m + 1] // 16])
        add_weighted_sum(y, weights, m_count, out)

    return swiglu_ffns
