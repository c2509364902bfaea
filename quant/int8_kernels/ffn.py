"""A weighted sum of SwiGLU FFNs of one token, in one parallel call (a decode step's experts).

Shape legend
    H  hidden   I_m  FFN m's width   M  FFNs
    desc     int64 [M, 6]   per FFN: gate/up format, down format, gate, up and down addresses, I_m
                            (int8_kernels.ffn_descriptor)
    weights  float32 [M]    limits float32 [M] (SwiGLU clamp, 0 for none)
    x        float32 [H]    out float32 [H], added into:
    out += sum_m weights[m] * down_m @ (min(silu(g), L_m) * clip(u, -L_m, L_m)),  g, u = gate_m @ x, up_m @ x
Terms are added to out in entry order.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ..bits import u8_at
from .gemv_gemm import bytes_per_256, find
from .row_dot import q8dot, quantize_row


@nb.njit(parallel=True, fastmath=True, cache=True)
def swiglu_ffns(desc, weights, limits, x, out):
    m_count = desc.shape[0]
    qt = desc[:, 0:2]
    addr = desc[:, 2:5]
    inter = desc[:, 5]
    h = x.shape[0]
    xq = np.empty(h, np.int8)
    xd = np.empty(h // 256, np.float32)
    xb = np.empty(h // 16, np.int32)
    quantize_row(x, xq, xd, xb)
    # gate and up rows of every expert, one parallel loop: expert m owns gu[2 * s[m] : 2 * s[m + 1]]
    s = np.zeros(m_count + 1, np.int64)
    for m in range(m_count):
        s[m + 1] = s[m] + inter[m]
    gu = np.empty(2 * s[m_count], np.float32)
    for g in nb.prange(2 * s[m_count]):
        m = find(s, g // 2)
        j = g - 2 * s[m]  # 0 .. 2 I - 1: gate rows, then up rows
        rbm = h // 256 * bytes_per_256(qt[m, 0])
        which = j // inter[m]
        r = j - which * inter[m]
        w = u8_at(addr[m, which] + r * rbm, rbm)
        gu[g] = q8dot(qt[m, 0], w, xq, xd, xb)
    # SwiGLU and the hidden vectors' quantization, per expert
    hq = np.empty(s[m_count], np.int8)
    hd = np.empty(s[m_count] // 256, np.float32)
    hb = np.empty(s[m_count] // 16, np.int32)
    act = np.empty(s[m_count], np.float32)
    for m in nb.prange(m_count):
        lim = limits[m]
        i = inter[m]
        g0 = 2 * s[m]
        for k in range(i):
            gv = gu[g0 + k]
            uv = gu[g0 + i + k]
            a = gv / (np.float32(1.0) + np.exp(-gv))
            if lim > np.float32(1e-6):
                a = min(a, lim)
                uv = min(max(uv, -lim), lim)
            act[s[m] + k] = a * uv
        quantize_row(act[s[m]:s[m + 1]], hq[s[m]:s[m + 1]], hd[s[m] // 256:s[m + 1] // 256],
                     hb[s[m] // 16:s[m + 1] // 16])
    # down rows of every expert, then the weighted sum in entry order
    y = np.empty((m_count, h), np.float32)
    for g in nb.prange(m_count * h):
        m = g // h
        r = g - m * h
        i = inter[m]
        rbm = i // 256 * bytes_per_256(qt[m, 1])
        w = u8_at(addr[m, 2] + r * rbm, rbm)
        y[m, r] = q8dot(qt[m, 1], w, hq[s[m]:s[m + 1]], hd[s[m] // 256:s[m + 1] // 256],
                        hb[s[m] // 16:s[m + 1] // 16])
    for m in range(m_count):
        wt = weights[m]
        for r in range(h):
            out[r] += wt * y[m, r]
