"""The attention half of one decode step in one Numba call (int8 activations).

    x      = rms_norm(h, attn_norm)
    q,k,v,g = the block's projection group times x          (int8 activations)
    a      = decode_attention(q, k, v, g) over the cache     (k/v written to `slot`)
    h     += o_proj(a)                                       (in place)
    x      = rms_norm(h, ffn_norm)                           -> scratch.x, the FFN's input
    logits = router @ x                                      -> scratch.logits (MoE blocks)

The FFN half follows in one more call (quant.int8_kernels.swiglu_ffns, adding into h), so a
decode step costs two kernel calls per block instead of a dozen numpy and kernel calls: at
a few microseconds of Python per call, that overhead was a sixth of the step.

Every step is a call of a separately compiled kernel: the int8 GEMVs (full fast-math), and
the norms, the attention and the router in a fixed summation order (quant.jit.FIXED_ORDER).
Inlined, the fixed-order code took this function's fast-math flags, and a fresh compile and
its cached copy disagreed. Calling compiled kernels also keeps this function out of
Numba's parallel passes, which made it the slowest kernel to compile.

Shape legend:  H hidden  Nh/Nk heads  D head dim  S cache slots  E experts  R/2 rotated pairs
    p        runtime.model.decode_plan.AttentionPlan (the block's constant arrays)
    keys, vals [S, Nk, D]   kscale, vscale [S, Nk, D/32 | 0]   kpos [S]   h [H], updated in place
             (the cache in its stored types: runtime.model.kv_types)
    s        runtime.model.decode_plan.DecodeScratch (buffers of the model, reused by every block)
"""

from __future__ import annotations

from functools import lru_cache

import numba as nb
import numpy as np
from quant.int8_kernels import gemv_in_kernel
from quant.int8_kernels.row_dot import quantize_row
from quant.jit import FIXED_ORDER

from runtime.model.attention_kernels import decode_attention
from runtime.model.ops import LANES, dot, dot4, rms_norm_row, rope_angles


@nb.njit(parallel=True, fastmath=FIXED_ORDER, cache=True)
def router_logits(router, x, logits):
    """logits [E] = router [E, H] @ x [H], each row summed in a fixed order: four rows at a time
    (dot4, the same bits as dot), as one row's chain of adds bounds dot (64 x 1024, two
    threads: 5-6 against 11-14 us one row at a time)."""
    n = router.shape[0]
    for g in nb.prange(n // 4):
        e = 4 * g
        logits[e], logits[e + 1], logits[e + 2], logits[e + 3] = dot4(
            x, router[e], router[e + 1], router[e + 2], router[e + 3], np.empty(4 * LANES, np.float32))
    for e in range(n - n % 4, n):
        logits[e] = dot(router[e], x, np.empty(LANES, np.float32))


@lru_cache(maxsize=None)
def attention_half(formats: int):
    """The kernel attention_half(p, keys, kscale, vals, vscale, kpos, slot, pos, h, s) for the int8 format set
    `formats` (quant.int8_kernels.format_set), a closure constant: its cache entry is its own."""

    @nb.njit(fastmath=True, cache=True)
    def attention_half(p, keys, kscale, vals, vscale, kpos, slot, pos, h, s):
        n = h.shape[0]
        d = keys.shape[2]
        nq = p.n_head * d
        nk = keys.shape[1] * d
        rms_norm_row(h, p.attn_norm, p.eps, s.x)
        xq, xd, xb = s.xq[:n], s.xd[:n // 256], s.xb[:n // 16]
        quantize_row(s.x, xq, xd, xb)
        proj = s.proj[:p.qkvg_starts[-1]]
        gemv_in_kernel(formats, p.qkvg_qt, p.qkvg_addr, p.qkvg_rb, p.qkvg_starts, xq, xd, xb, proj, p.steps)
        half = p.inv_freq.shape[0]
        cos = s.cos[:half]
        sin = s.sin[:half]
        rope_angles(pos, p.inv_freq, cos, sin)
        att = s.att[:nq]
        decode_attention(proj[:nq], proj[nq:nq + nk], proj[nq + nk:nq + 2 * nk], proj[nq + 2 * nk:], p.q_norm,
                         p.k_norm, p.eps, cos, sin, keys, vals, kpos, slot, pos, p.window, s.scores, att, kscale,
                         vscale)
        aq, ad, ab = s.xq[:nq], s.xd[:nq // 256], s.xb[:nq // 16]
        quantize_row(att, aq, ad, ab)
        gemv_in_kernel(formats, p.o_qt, p.o_addr, p.o_rb, p.o_starts, aq, ad, ab, s.o, p.steps)
        for i in range(n):
            h[i] = h[i] + s.o[i]
        rms_norm_row(h, p.ffn_norm, p.eps, s.x)
        router_logits(p.router, s.x, s.logits[:p.router.shape[0]])

    return attention_half
