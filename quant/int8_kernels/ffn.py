"""A weighted sum of SwiGLU FFNs of one token, in one call (a decode step's experts).

The matrix products are two calls of the format set's compiled GEMV (gemv_gemm.gemv_cols_in_kernel),
not copies of its loop: every FFN's gate and up as one group on x, then every down matrix as
one group, each reading its own FFN's columns of the hidden vectors (the GEMV's col0). The
GEMV's code is compiled once per format set and shared with the decode step's projections
(a first run compiled it three times, 4 s of its wait).

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

from ..bits import EXPONENT_ONE, NON_FINITE, QUIET_NAN, bits_of_f32, f32_from_bits
from ..jit import FIXED_ORDER
from .gemv_gemm import bytes_per_256, gemv_cols_in_kernel
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
    groups: np.ndarray  # int64 [10, 2 M + 1]  the gate/up group's and the down group's qt, addr,
    #                     rb, starts and col0 rows (gemv_gemm.group_gemv)


def ffn_scratch(hidden: int, max_ffns: int, max_width: int) -> FFNScratch:
    """Buffers for swiglu_ffns calls of up to max_ffns FFNs whose widths sum to at most max_width."""
    return FFNScratch(np.empty(hidden, np.int8), np.empty(hidden // 256, np.float32),
                      np.empty(hidden // 16, np.int32), np.empty(max_ffns + 1, np.int64),
                      np.empty(2 * max_width, np.float32), np.empty(max_width, np.float32),
                      np.empty(max_width, np.int8), np.empty(max_width // 256, np.float32),
                      np.empty(max_width // 16, np.int32), np.empty((max_ffns, hidden), np.float32),
                      np.zeros((10, 2 * max_ffns + 1), np.int64))


@nb.njit(fastmath=FIXED_ORDER, cache=True)
def swiglu_row(g, u, lim, out):
    """out [I] = min(silu(g), lim) * clip(u, -lim, lim) (no clamp when lim <= 1e-6), g, u [I].

    Where g or u is Inf or NaN, out is NaN: the clamps would otherwise turn an Inf (a damaged
    weight upstream) into lim and a NaN into either bound, and the damage would go on unseen.
    Tested on the bits, as quantize_row does, which fast-math cannot fold away."""
    for k in range(g.shape[0]):
        gv = g[k]
        uv = u[k]
        bad = (((bits_of_f32(gv) & NON_FINITE) + EXPONENT_ONE)
               | ((bits_of_f32(uv) & NON_FINITE) + EXPONENT_ONE)) >> 31
        a = gv / (np.float32(1.0) + np.exp(-gv))
        if lim > np.float32(1e-6):
            a = min(a, lim)
            uv = min(max(uv, -lim), lim)
        out[k] = f32_from_bits(bits_of_f32(a * uv) | (QUIET_NAN * bad))


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
    """swiglu_ffns(desc, weights, limits, x, out, scratch, steps) for FFNs of the formats in
    `formats`; steps: the GEMV's (gemv_gemm, int8_kernels.step_addresses)."""
    @nb.njit(parallel=True, fastmath=True, cache=True)
    def swiglu_ffns(desc, weights, limits, x, out, scratch, steps):
        m_count = desc.shape[0]
        h = x.shape[0]
        s = scratch.starts
        s[0] = 0
        for m in range(m_count):
            s[m + 1] = s[m] + desc[m, 5]
        if s[m_count] > scratch.act.shape[0]:
            raise ValueError("swiglu_ffns: the FFNs are wider than the scratch (ffn_scratch max_width)")
        # gate and up of every FFN as one group of 2 M matrices on x, in one parallel call:
        # FFN m owns gu[2 s[m] : 2 s[m + 1]], its gate rows then its up rows
        g = scratch.groups
        qt, addr, rb, starts, col0 = g[0, :2 * m_count], g[1, :2 * m_count], g[2, :2 * m_count], g[3, :2 * m_count + 1], g[4, :2 * m_count]
        starts[0] = 0
        for mm in range(2 * m_count):
            m = mm // 2
            qt[mm] = desc[m, 0]
            addr[mm] = desc[m, 2 + mm - 2 * m]
            rb[mm] = h // 256 * bytes_per_256(desc[m, 0])
            starts[mm + 1] = starts[mm] + desc[m, 5]
            col0[mm] = 0
        xq, xd, xb = scratch.xq, scratch.xd, scratch.xb
        quantize_row(x, xq, xd, xb)
        gu = scratch.gu
        gemv_cols_in_kernel(formats, qt, addr, rb, starts, col0, xq, xd, xb, gu[:2 * s[m_count]], steps)
        # SwiGLU and the hidden vectors' quantization, per FFN
        hq, hd, hb, act = scratch.hq, scratch.hd, scratch.hb, scratch.act
        for m in nb.prange(m_count):
            i = desc[m, 5]
            g0 = 2 * s[m]
            swiglu_row(gu[g0:g0 + i], gu[g0 + i:g0 + 2 * i], limits[m], act[s[m]:s[m + 1]])
            quantize_row(act[s[m]:s[m + 1]], hq[s[m]:s[m + 1]], hd[s[m] // 256:s[m + 1] // 256],
                         hb[s[m] // 16:s[m + 1] // 16])
        # the down matrices as one group, FFN m's reading its own columns s[m] .. s[m + 1] of the
        # hidden vectors, into row m of y; then the weighted sum in entry order
        qt, addr, rb, starts, col0 = g[5, :m_count], g[6, :m_count], g[7, :m_count], g[8, :m_count + 1], g[9, :m_count]
        starts[0] = 0
        for m in range(m_count):
            qt[m] = desc[m, 1]
            addr[m] = desc[m, 4]
            rb[m] = desc[m, 5] // 256 * bytes_per_256(desc[m, 1])
            starts[m + 1] = starts[m] + h
            col0[m] = s[m]
        y = scratch.y
        w = s[m_count]
        gemv_cols_in_kernel(formats, qt, addr, rb, starts, col0, hq[:w], hd[:w // 256], hb[:w // 16],
                            y.reshape(y.size)[:m_count * h], steps)
        add_weighted_sum(y, weights, m_count, out)

    return swiglu_ffns
