"""One decode step of a block's attention half in one Numba call (int8 activations).

    x      = rms_norm(h, attn_norm)
    q,k,v,g = the block's projection group times x          (int8 activations)
    a      = attention over the cache (runtime.model.attention_kernels.attend_one), k/v written to `slot`
    h_out  = h + o_proj(a)
    x_out  = rms_norm(h_out, ffn_norm)
    logits = router @ x_out                                  (MoE blocks; float32 router)

The FFN half follows in one more call (quant.q8kernels.swiglu_ffns, adding into h_out), so
a decode step costs two kernel calls per block instead of a dozen numpy and kernel calls:
at a few microseconds of Python per call, that overhead was a sixth of the step.

Shape legend:  H hidden  Nh/Nk heads  D head dim  S cache slots  E experts  R/2 rotated pairs
    h, h_out, x_out [H]   keys, vals [S, Nk, D]   kpos [S]   inv_freq [R/2] float64
    (qt, addr, rb, starts) of the q/k/v/gate and output groups: see quant.q8kernels.Group
    router [E, H] float32 ([0, H] on dense blocks), logits [E]
"""

from __future__ import annotations

import numba as nb
import numpy as np
from quant.int8_kernels.gemv_gemm import group_gemv
from quant.int8_kernels.row_dot import quantize_row
from quant.jit import FIXED_ORDER

from runtime.model.attention_kernels import attend_one
from runtime.model.ops import LANES, dot


@nb.njit(inline="always", fastmath=FIXED_ORDER, cache=True)
def _rms(x, w, eps, out):
    n = x.shape[0]
    part = np.empty(LANES, np.float32)
    ss = dot(x, x, part)
    inv = np.float32(1.0) / np.sqrt(ss / np.float32(n) + eps)
    for i in range(n):
        out[i] = x[i] * inv * w[i]


@nb.njit(parallel=True, fastmath=True, cache=True)
def attention_step(h, attn_norm, ffn_norm, eps, qkvg_qt, qkvg_addr, qkvg_rb, qkvg_starts, o_qt, o_addr, o_rb,
                   o_starts, n_head, q_norm, k_norm, inv_freq, keys, vals, kpos, slot, pos, window, router,
                   h_out, x_out, logits):
    n = h.shape[0]
    d = keys.shape[2]
    nq = n_head * d
    nk = keys.shape[1] * d
    x = np.empty(n, np.float32)
    _rms(h, attn_norm, eps, x)
    xq = np.empty(n, np.int8)
    xd = np.empty(n // 256, np.float32)
    xb = np.empty(n // 16, np.int32)
    quantize_row(x, xq, xd, xb)
    proj = np.empty(qkvg_starts[-1], np.float32)
    group_gemv(qkvg_qt, qkvg_addr, qkvg_rb, qkvg_starts, xq, xd, xb, proj)
    half = inv_freq.shape[0]
    cos = np.empty(half, np.float32)
    sin = np.empty(half, np.float32)
    for j in range(half):
        ang = np.float64(pos) * inv_freq[j]
        cos[j] = np.float32(np.cos(ang))
        sin[j] = np.float32(np.sin(ang))
    att = np.empty(nq, np.float32)
    attend_one(proj[:nq], proj[nq:nq + nk], proj[nq + nk:nq + 2 * nk], proj[nq + 2 * nk:], q_norm, k_norm,
               eps, cos, sin, keys, vals, kpos, slot, pos, window, att)
    aq = np.empty(nq, np.int8)
    ad = np.empty(nq // 256, np.float32)
    ab = np.empty(nq // 16, np.int32)
    quantize_row(att, aq, ad, ab)
    o = np.empty(n, np.float32)
    group_gemv(o_qt, o_addr, o_rb, o_starts, aq, ad, ab, o)
    for i in range(n):
        h_out[i] = h[i] + o[i]
    _rms(h_out, ffn_norm, eps, x_out)
    for e in nb.prange(router.shape[0]):
        logits[e] = dot(router[e], x_out, np.empty(LANES, np.float32))
