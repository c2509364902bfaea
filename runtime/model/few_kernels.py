"""A few tokens (an MTP verify pass, a head's draft rows) through one block in two kernel calls.

The one-token decode kernels (runtime.model.decode_kernels, quant's swiglu_ffns) applied to T
tokens at once, T up to a handful: the same steps, each a loop over the tokens, so a verify
pass of 4 tokens pays the per-call overhead of one decode step, not four, and each weight row
is read from memory once for all T tokens (the union of their experts: each expert once).

    attention_half_tokens:  per token t:  x_t = rms_norm(h_t, attn_norm)
                            q,k,v,g = group rows times every x_t        (one parallel pass)
                            keys of every token written to its slot, then the T x Nh queries
                            attend in parallel (causal by position: a later token's key is
                            masked out, exactly as if it had not been written yet)
                            h_t += o_proj(a_t)                          (one parallel pass)
                            x_t = rms_norm(h_t, ffn_norm);  logits_t = router @ x_t
    ffn_tokens:             h_t += sum over token t's entries of weight * SwiGLU FFN(x_t):
                            every FFN of the union runs its rows once for all its tokens

Bit-identical to T one-token steps: every token goes through the same functions the decode
step calls (rms_norm_row, quantize_row, the row dot q8dot, the attention's per-head `_attend`,
swiglu_row, add_weighted_sum), in the same order for that token; only the loops around them
differ. The exceptions are the matrix products, which quant keeps equal to the one-token row
dot to the bit (the batch invariance of the GEMM rests on it, and tests check it): here a row
runs 4 tokens per pass (q8dot4, the GEMM's row step) where the format has one, and the decode
step's GEMV runs most formats' 16-row groups by the GEMM's one-token VNNI step
(gemv_gemm.row_blocks). The fixed-order float code is compiled on its own and called
(quant.jit), never inlined into the fast-math kernels.

Shape legend:  T tokens (<= the scratch's)  H hidden  C a matrix's columns  P projections
    (Nh + 2 Nk) D + Nh   Nh/Nk heads  D head dim  S cache slots  E experts  R/2 rotated pairs
    M FFNs in the union (row 0 the dense FFN or shared expert)   K experts per token
    J = T (1 + K) (token, entry) pairs, pair t (1 + K) + k: token t's entry k
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numba as nb
import numpy as np
from numba import types
from numba.core.errors import TypingError
from numba.extending import overload
from quant.int8_kernels.ffn import add_weighted_sum, swiglu_row
from quant.int8_kernels import avx512_vnni as vnni
from quant.int8_kernels.gemv_gemm import ONE_TOKEN, STEP_BASE, SUMS_PER, bytes_per_256, find, group_steps
from quant.bits import u8_at
from quant.int8_kernels.row_dot import GEMM4_FORMATS, q8dot, q8dot4, quantize_row
from quant.jit import FIXED_ORDER

from runtime.model.attention_kernels import _attend, _gate, _norm_rope
from runtime.model.kv_types import store_row
from runtime.model.ops import LANES, dot, rms_norm_row, rope_angles


# Formats whose 4-token row step (q8dot4, the GEMM's) gives each token the row dot's bits: their
# rows run 4 tokens per pass, decoding each super-block once for four.
_FOUR = np.zeros(256, np.bool_)
for _q in GEMM4_FORMATS:
    _FOUR[int(_q)] = True


class TokensScratch(NamedTuple):
    """Buffers of a few-token block step, allocated once per model for up to T tokens."""
    x: np.ndarray  # float32 [T, H]        normed hidden states, then the FFN's inputs
    wide: np.ndarray  # float32 [T, 2 H]   an MTP head's input: its normed embedding and hidden state
    xq: np.ndarray  # int8 [T, C]          activations as int8 (C = max(2 H, Nh * D))
    xd: np.ndarray  # float32 [T, C / 256]
    xb: np.ndarray  # int32 [T, C / 16]
    proj: np.ndarray  # float32 [T, P]     q, k, v, gate
    cos: np.ndarray  # float32 [T, D / 2]
    sin: np.ndarray  # float32 [T, D / 2]
    att: np.ndarray  # float32 [T, Nh * D]
    o: np.ndarray  # float32 [T, H]
    scores: np.ndarray  # float32 [T * Nh, S]   grown with the largest cache
    logits: np.ndarray  # float32 [T, E]
    slots: np.ndarray  # int64 [T]        the cache slot of each token
    qpos: np.ndarray  # int64 [T]         the position of each token


class TokensFFNScratch(NamedTuple):
    """Buffers of a few-token FFN call: T tokens, each with 1 + K FFNs of width up to I."""
    xq: np.ndarray  # int8 [T, H]            the inputs as int8
    xd: np.ndarray  # float32 [T, H / 256]
    xb: np.ndarray  # int32 [T, H / 16]
    pq: np.ndarray  # int8 [J, H]            the inputs again, a row per pair in CSR order, so that an
    pd: np.ndarray  # float32 [J, H / 256]   FFN's tokens are consecutive rows (4-token row steps)
    pb: np.ndarray  # int32 [J, H / 16]
    ps: np.ndarray  # int16 [J, H / 16]      their sums as the gate/up matrices' GEMM steps take them
    pairs: np.ndarray  # int64 [J]           pairs grouped by FFN (CSR order)
    first: np.ndarray  # int64 [M + 1]       FFN m's pairs: pairs[first[m]:first[m + 1]]
    starts: np.ndarray  # int64 [J + 1]      CSR entry q's hidden vector: act[starts[q]:starts[q + 1]]
    units: np.ndarray  # int64 [2 M + 1]
    gu: np.ndarray  # float32 [2 J I]        gate and up outputs
    act: np.ndarray  # float32 [J I]         SwiGLU outputs
    hq: np.ndarray  # int8 [J I]             ... quantized
    hd: np.ndarray  # float32 [J I / 256]
    hb: np.ndarray  # int32 [J I / 16]
    hs: np.ndarray  # int16 [J I / 16]       their sums for the down matrices' steps
    y: np.ndarray  # float32 [J, H]          each pair's FFN output, in CSR order
    yt: np.ndarray  # float32 [J, H]         ... by pair


def tokens_scratch(n_tok: int, hidden: int, cols: int, proj: int, half: int, n_head: int, n_slots: int,
                   n_expert: int) -> TokensScratch:
    return TokensScratch(np.empty((n_tok, hidden), np.float32), np.empty((n_tok, 2 * hidden), np.float32),
                         np.empty((n_tok, cols), np.int8),
                         np.empty((n_tok, cols // 256), np.float32), np.empty((n_tok, cols // 16), np.int32),
                         np.empty((n_tok, proj), np.float32), np.empty((n_tok, half), np.float32),
                         np.empty((n_tok, half), np.float32), np.empty((n_tok, n_head * 2 * half), np.float32),
                         np.empty((n_tok, hidden), np.float32), np.empty((n_tok * n_head, n_slots), np.float32),
                         np.empty((n_tok, max(n_expert, 1)), np.float32), np.empty(n_tok, np.int64),
                         np.empty(n_tok, np.int64))


def tokens_ffn_scratch(n_tok: int, hidden: int, n_pairs: int, width: int) -> TokensFFNScratch:
    """For T tokens making up to n_pairs (token, FFN) pairs whose widths sum to at most width."""
    h, j, w = hidden, n_pairs, width
    return TokensFFNScratch(np.empty((n_tok, h), np.int8), np.empty((n_tok, h // 256), np.float32),
                            np.empty((n_tok, h // 16), np.int32), np.empty((j, h), np.int8),
                            np.empty((j, h // 256), np.float32), np.empty((j, h // 16), np.int32),
                            np.empty((j, h // 16), np.int16), np.empty(j, np.int64), np.empty(j + 1, np.int64),
                            np.empty(j + 1, np.int64), np.empty(2 * j + 1, np.int64), np.empty(2 * w, np.float32),
                            np.empty(w, np.float32), np.empty(w, np.int8), np.empty(w // 256, np.float32),
                            np.empty(w // 16, np.int32), np.empty(w // 16, np.int16), np.empty((j, h), np.float32),
                            np.empty((j, h), np.float32))


# ---------------------------------------------------------------- fixed-order steps (called)

@nb.njit(parallel=True, fastmath=FIXED_ORDER, cache=True)
def attention_tokens(proj, n_tok, nq, nk, q_norm, k_norm, eps, cos, sin, keys, kscale, vals, vscale, kpos, slots,
                     qpos, window, scores, out):
    """decode_attention for tokens 0..n_tok-1 of proj [T, P] at positions qpos, their keys and
    values written to `slots` first (token order), then every (token, head) in parallel; a
    query sees slots lo < kpos <= its position, so a later token's key counts for nothing."""
    n_kv, d = keys.shape[1], keys.shape[2]
    n_head = nq // d
    group = n_head // n_kv
    for t in range(n_tok):
        slot = slots[t]
        for j in range(n_kv):
            kh = proj[t, nq + j * d:nq + (j + 1) * d]
            _norm_rope(kh, k_norm, eps, cos[t], sin[t])
            store_row(keys, kscale, slot, j, kh)
            store_row(vals, vscale, slot, j, proj[t, nq + nk + j * d:nq + nk + (j + 1) * d])
        kpos[slot] = qpos[t]
    scale = np.float32(1.0 / np.sqrt(d))
    for it in nb.prange(n_tok * n_head):
        t = it // n_head
        h = it - t * n_head
        p = qpos[t]
        lo = p - window if window > 0 else -1
        qh = proj[t, h * d:(h + 1) * d]
        _norm_rope(qh, q_norm, eps, cos[t], sin[t])
        acc = np.empty(d, np.float32)
        total = _attend(qh, keys, kscale, vals, vscale, kpos, h // group, p, lo, scale, scores[it],
                        np.empty(4 * LANES, np.float32), acc)
        f = _gate(proj[t, nq + 2 * nk + h]) / total
        for i in range(d):
            out[t, h * d + i] = acc[i] * f


@nb.njit(parallel=True, fastmath=FIXED_ORDER, cache=True)
def router_tokens(router, x, n_tok, logits):
    """logits [t, E] = router [E, H] @ x [t] for t < n_tok, each row summed as decode sums it."""
    n_e = router.shape[0]
    for it in nb.prange(n_tok * n_e):
        t = it // n_e
        e = it - t * n_e
        logits[t, e] = dot(router[e], x[t], np.empty(LANES, np.float32))


@nb.njit(fastmath=FIXED_ORDER, cache=True)
def residual_norm_tokens(h, o, n_tok, w, eps, x):
    """h [t] += o [t], then x [t] = rms_norm(h [t], w), for t < n_tok (decode's order)."""
    for t in range(n_tok):
        for i in range(h.shape[1]):
            h[t, i] = h[t, i] + o[t, i]
        rms_norm_row(h[t], w, eps, x[t])


# ---------------------------------------------------------------- int8 passes over T tokens

@nb.njit(inline="always", fastmath=True, cache=True)
def _quantize_tokens(x, n_tok, c, xq, xd, xb):
    """Tokens 0..n_tok-1 of x [T, >= c] (their first c columns) to int8."""
    for t in range(n_tok):
        quantize_row(x[t, :c], xq[t, :c], xd[t, :c // 256], xb[t, :c // 16])


@nb.njit(inline="always", fastmath=True, cache=True)
def _row_tokens(formats, qtype, w, xq, xd, xb, n_tok, out, stride, o):
    """Row w times tokens 0..n_tok-1 of xq [>= n_tok, C] (4 per pass, then one at a time, as the
    GEMM's row_steps): token t's product to out[t * stride + o]."""
    t = 0
    while t + 4 <= n_tok:
        a0, a1, a2, a3 = q8dot4(formats, qtype, w, xq, xd, xb, t)
        out[t * stride + o] = a0
        out[(t + 1) * stride + o] = a1
        out[(t + 2) * stride + o] = a2
        out[(t + 3) * stride + o] = a3
        t += 4
    while t < n_tok:
        out[t * stride + o] = q8dot(formats, qtype, w, xq[t], xd[t], xb[t])
        t += 1


@nb.njit(inline="always", fastmath=True, cache=True)
def _group_tokens(formats, qt, addr, rb, starts, n_tok, c, xq, xd, xb, out):
    """out [t, :rows] = the group's rows times token t (its first c columns), t < n_tok: a row
    per parallel unit, run for every token while it is in cache (4 tokens per pass where the
    format has the step, else one at a time)."""
    flat = out.reshape(out.size)
    for g in nb.prange(starts[qt.shape[0]]):
        m = find(starts, g)
        r = g - starts[m]
        w = u8_at(addr[m] + r * rb[m], rb[m])
        if _FOUR[qt[m]]:
            _row_tokens(formats, qt[m], w, xq[:, :c], xd[:, :c // 256], xb[:, :c // 16], n_tok, flat, out.shape[1], g)
        else:
            for t in range(n_tok):
                out[t, g] = q8dot(formats, qt[m], w, xq[t, :c], xd[t, :c // 256], xb[t, :c // 16])


@nb.njit(cache=True)
def _groups(qtype, rows, steps):
    """The 16-row groups of a rows-row matrix of format qtype that run as GEMM steps over an
    FFN's tokens (VNNI hosts, formats whose steps `steps` holds); its other rows run row by row."""
    base = STEP_BASE[qtype]
    if not vnni.AVAILABLE or base < 0 or steps[base + ONE_TOKEN] == 0:
        return 0
    return rows // 16


@nb.njit(cache=True)
def _unit_count(qtype, rows, steps):
    """Parallel units of a matrix: its step groups, then one per row left."""
    g = _groups(qtype, rows, steps)
    return g + rows - 16 * g


@nb.njit(inline="always", cache=True)
def _step_sums(qtype, xb, xs, c):
    """The int16 activation sums over the first c columns that format qtype's steps take (per 32
    columns where SUMS_PER is 2, else per 16: gemv_gemm._activation_sums), from xb [c / 16]."""
    per = SUMS_PER[qtype]
    for i in range(c // 16 // per):
        v = np.int32(0)
        for k in range(per):
            v += xb[per * i + k]
        xs[i] = np.int16(v)


@lru_cache(maxsize=None)
def build(formats: int):
    """The few-token kernels for the int8 format set `formats` (a closure constant):
    gemv(qt, addr, rb, starts, n_tok, c, xq, xd, xb, out)               a group times T tokens
    attention_half(p, keys, kscale, vals, vscale, kpos, n_tok, h, s)   see the module doc (the cache in
                                                                       its stored types: runtime.model.kv_types)
    ffn(desc, entry, weights, limits, n_tok, x, h, f)                  see the module doc
    norm_project(w, eps, n_tok, h, qt, addr, rb, starts, s, out)       out [t] = group @ rms_norm(h [t], w)
    head_input(enorm, hnorm, eps, n_tok, e, h, qt, addr, rb, starts, s, out)
                 out [t] = group @ [rms_norm(e [t], enorm), rms_norm(h [t], hnorm)]  (an MTP head's input)
    The last two are the output head and an MTP head's projections: matrix.matmul's bits (its
    GEMM rows are the GEMV's), in one call instead of a quantize and a GEMM call."""

    @nb.njit(parallel=True, fastmath=True, cache=True)
    def gemv(qt, addr, rb, starts, n_tok, c, xq, xd, xb, out):
        _group_tokens(formats, qt, addr, rb, starts, n_tok, c, xq, xd, xb, out)

    @nb.njit(fastmath=True, cache=True)
    def attention_half(p, keys, kscale, vals, vscale, kpos, n_tok, h, s):
        n = h.shape[1]
        d = keys.shape[2]
        nq = p.n_head * d
        nk = keys.shape[1] * d
        for t in range(n_tok):
            rms_norm_row(h[t], p.attn_norm, p.eps, s.x[t])
        _quantize_tokens(s.x, n_tok, n, s.xq, s.xd, s.xb)
        tokens_gemv_in_kernel(formats, p.qkvg_qt, p.qkvg_addr, p.qkvg_rb, p.qkvg_starts, n_tok, n, s.xq, s.xd,
                              s.xb, s.proj)
        half = p.inv_freq.shape[0]
        for t in range(n_tok):
            rope_angles(s.qpos[t], p.inv_freq, s.cos[t, :half], s.sin[t, :half])
        attention_tokens(s.proj, n_tok, nq, nk, p.q_norm, p.k_norm, p.eps, s.cos[:, :half], s.sin[:, :half], keys,
                         kscale, vals, vscale, kpos, s.slots, s.qpos, p.window, s.scores, s.att)
        _quantize_tokens(s.att, n_tok, nq, s.xq, s.xd, s.xb)
        tokens_gemv_in_kernel(formats, p.o_qt, p.o_addr, p.o_rb, p.o_starts, n_tok, nq, s.xq, s.xd, s.xb, s.o)
        residual_norm_tokens(h, s.o, n_tok, p.ffn_norm, p.eps, s.x)
        if p.router.shape[0]:
            router_tokens(p.router, s.x, n_tok, s.logits)

    @nb.njit(parallel=True, fastmath=True, cache=True)
    def ffn(desc, entry, weights, limits, n_tok, x, out, f, steps):
        # desc [M, 6] the union's FFNs; entry [T, 1 + K] token t's FFNs (rows of desc, in the order
        # its decode step sums them), weights [T, 1 + K]; x [T, H] inputs; out [T, H] added into;
        # steps: the GEMM steps of the FFNs' formats (int8_kernels.gemm_step_addresses)
        m_count = desc.shape[0]
        per = entry.shape[1]
        j_count = n_tok * per
        h = x.shape[1]
        qt = desc[:, 0:2]
        addr = desc[:, 2:5]
        inter = desc[:, 5]
        xq, xd, xb = f.xq, f.xd, f.xb
        for t in range(n_tok):
            quantize_row(x[t], xq[t, :h], xd[t, :h // 256], xb[t, :h // 16])
        # pairs grouped by FFN (counting sort, CSR order q), each one's inputs copied to row q
        first, pairs, st = f.first, f.pairs, f.starts
        for m in range(m_count + 1):
            first[m] = 0
        for p in range(j_count):
            first[entry[p // per, p % per] + 1] += 1
        for m in range(m_count):
            first[m + 1] += first[m]
        fill = np.empty(m_count, np.int64)
        for m in range(m_count):
            fill[m] = first[m]
        for p in range(j_count):
            m = entry[p // per, p % per]
            pairs[fill[m]] = p
            fill[m] += 1
        pq, pd, pb, ps = f.pq, f.pd, f.pb, f.ps
        st[0] = 0
        for m in range(m_count):
            for q in range(first[m], first[m + 1]):
                st[q + 1] = st[q] + inter[m]
                t = pairs[q] // per
                pq[q, :h] = xq[t, :h]
                pd[q, :h // 256] = xd[t, :h // 256]
                pb[q, :h // 16] = xb[t, :h // 16]
                _step_sums(qt[m, 0], pb[q], ps[q], h)
        if st[j_count] > f.act.shape[0]:
            raise ValueError("ffn_tokens: the FFNs are wider than the scratch")
        # gate and up: per matrix, its 16-row groups (one GEMM step over the FFN's tokens each,
        # where the format has steps) then its single rows, every unit in parallel
        gu = f.gu
        units = f.units
        units[0] = 0
        for mm in range(2 * m_count):
            m = mm // 2
            units[mm + 1] = units[mm] + _unit_count(qt[m, 0], inter[m], steps)
        for u in nb.prange(units[2 * m_count]):
            mm = find(units, u)
            m = mm // 2
            i = inter[m]
            which = mm - 2 * m
            a, b = first[m], first[m + 1]
            k = u - units[mm]
            q0 = qt[m, 0]
            rb = h // 256 * bytes_per_256(q0)
            g = _groups(q0, i, steps)
            if k < g:
                if a < b:
                    group_steps(steps, STEP_BASE[q0], addr[m, which] + 16 * k * rb, rb, np.int64(h // 256),
                                np.int64(b - a), pq[a].ctypes.data, np.int64(pq.shape[1]), ps[a].ctypes.data,
                                np.int64(2 * ps.shape[1]), pd[a].ctypes.data, np.int64(4 * pd.shape[1]),
                                gu.ctypes.data + 4 * (2 * st[a] + which * i + 16 * k), np.int64(8 * i))
                continue  # (a unit is a group or a row)
            r = k + 15 * g
            w = u8_at(addr[m, which] + r * rb, rb)
            if not _FOUR[q0]:
                for q in range(a, b):
                    gu[2 * st[q] + which * i + r] = q8dot(formats, q0, w, pq[q, :h], pd[q, :h // 256], pb[q, :h // 16])
            else:
                while a < b:  # 4 per pass, then one at a time (the pairs' rows need not be 2 i
                    if b - a >= 4:  # apart: each written where its own span is)
                        v0, v1, v2, v3 = q8dot4(formats, q0, w, pq[:, :h], pd[:, :h // 256], pb[:, :h // 16], a)
                        gu[2 * st[a] + which * i + r] = v0
                        gu[2 * st[a + 1] + which * i + r] = v1
                        gu[2 * st[a + 2] + which * i + r] = v2
                        gu[2 * st[a + 3] + which * i + r] = v3
                        a += 4
                    else:
                        gu[2 * st[a] + which * i + r] = q8dot(formats, q0, w, pq[a, :h], pd[a, :h // 256],
                                                              pb[a, :h // 16])
                        a += 1
        hq, hd, hb, hs, act = f.hq, f.hd, f.hb, f.hs, f.act
        for q in nb.prange(j_count):
            a, b = st[q], st[q + 1]
            m = entry[pairs[q] // per, pairs[q] % per]
            swiglu_row(gu[2 * a:2 * a + (b - a)], gu[2 * a + (b - a):2 * b], limits[m], act[a:b])
            quantize_row(act[a:b], hq[a:b], hd[a // 256:b // 256], hb[a // 16:b // 16])
            _step_sums(qt[m, 1], hb[a // 16:b // 16], hs[a // 16:b // 16], b - a)
        # down: y [q] for CSR entry q, FFN m's entries' hidden vectors being consecutive spans of
        # width i (a constant stride for the steps)
        y = f.y
        for m in range(m_count):
            units[m + 1] = units[m] + _unit_count(qt[m, 1], h, steps)
        for u in nb.prange(units[m_count]):
            m = find(units[:m_count + 1], u)
            i = inter[m]
            a, b = first[m], first[m + 1]
            k = u - units[m]
            q1 = qt[m, 1]
            rb = i // 256 * bytes_per_256(q1)
            g = _groups(q1, h, steps)
            if k < g:
                if a < b:
                    s0 = st[a]
                    group_steps(steps, STEP_BASE[q1], addr[m, 2] + 16 * k * rb, rb, np.int64(i // 256),
                                np.int64(b - a), hq.ctypes.data + s0, np.int64(i), hs.ctypes.data + 2 * (s0 // 16),
                                np.int64(2 * (i // 16)), hd.ctypes.data + 4 * (s0 // 256), np.int64(4 * (i // 256)),
                                y[a].ctypes.data + 64 * k, np.int64(4 * y.shape[1]))
                continue
            r = k + 15 * g
            w = u8_at(addr[m, 2] + r * rb, rb)
            if not _FOUR[q1]:
                for q in range(a, b):
                    s0, s1 = st[q], st[q + 1]
                    y[q, r] = q8dot(formats, q1, w, hq[s0:s1], hd[s0 // 256:s1 // 256], hb[s0 // 16:s1 // 16])
            else:
                while a < b:
                    if b - a >= 4:
                        s0 = st[a]
                        v0, v1, v2, v3 = q8dot4(formats, q1, w, hq[s0:s0 + 4 * i].reshape((4, i)),
                                                hd[s0 // 256:(s0 + 4 * i) // 256].reshape((4, i // 256)),
                                                hb[s0 // 16:(s0 + 4 * i) // 16].reshape((4, i // 16)), 0)
                        y[a, r] = v0
                        y[a + 1, r] = v1
                        y[a + 2, r] = v2
                        y[a + 3, r] = v3
                        a += 4
                    else:
                        s0, s1 = st[a], st[a + 1]
                        y[a, r] = q8dot(formats, q1, w, hq[s0:s1], hd[s0 // 256:s1 // 256], hb[s0 // 16:s1 // 16])
                        a += 1
        yt = f.yt  # by pair (token t's entries in its order), then each token's sum as decode adds it
        for q in range(j_count):
            yt[pairs[q], :h] = y[q, :h]
        for t in range(n_tok):
            add_weighted_sum(yt[t * per:(t + 1) * per], weights[t], per, out[t])

    @nb.njit(fastmath=True, cache=True)
    def norm_project(w, eps, n_tok, h, qt, addr, rb, starts, s, out):
        c = h.shape[1]
        for t in range(n_tok):
            rms_norm_row(h[t], w, eps, s.x[t, :c])
        _quantize_tokens(s.x, n_tok, c, s.xq, s.xd, s.xb)
        tokens_gemv_in_kernel(formats, qt, addr, rb, starts, n_tok, c, s.xq, s.xd, s.xb, out)

    @nb.njit(fastmath=True, cache=True)
    def head_input(enorm, hnorm, eps, n_tok, e, h, qt, addr, rb, starts, s, out):
        c = h.shape[1]
        for t in range(n_tok):
            rms_norm_row(e[t], enorm, eps, s.wide[t, :c])
            rms_norm_row(h[t], hnorm, eps, s.wide[t, c:2 * c])
        _quantize_tokens(s.wide, n_tok, 2 * c, s.xq, s.xd, s.xb)
        tokens_gemv_in_kernel(formats, qt, addr, rb, starts, n_tok, 2 * c, s.xq, s.xd, s.xb, out)

    return _Kernels(gemv, attention_half, ffn, norm_project, head_input)


class _Kernels(NamedTuple):
    gemv: object
    attention_half: object
    ffn: object
    norm_project: object
    head_input: object


def tokens_gemv_in_kernel(formats, qt, addr, rb, starts, n_tok, c, xq, xd, xb, out):
    """build(formats).gemv(...), callable from Numba code built for the same format set (a
    compile-time constant there): a call of the compiled parallel kernel, not an inlined loop."""
    build(formats).gemv(qt, addr, rb, starts, n_tok, c, xq, xd, xb, out)


@overload(tokens_gemv_in_kernel)
def _tokens_gemv_in_kernel(formats, qt, addr, rb, starts, n_tok, c, xq, xd, xb, out):
    if not isinstance(formats, types.IntegerLiteral):
        raise TypingError("tokens_gemv_in_kernel needs the format set as a compile-time constant")
    gemv = build(formats.literal_value).gemv

    def impl(formats, qt, addr, rb, starts, n_tok, c, xq, xd, xb, out):
        gemv(qt, addr, rb, starts, n_tok, c, xq, xd, xb, out)
    return impl
