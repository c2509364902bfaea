"""Attention kernels: one new token over the KV cache (decode), and a chunk of queries (prefill).

For a single new token, `decode_attention` does, per query head h (KV head h // G):
    q, k   <- RMS-norm per head (weights q_norm / k_norm), then NeoX RoPE on the first R dims
    k, v   -> written into the cache at `slot`
    out[h] = softmax(q . keys / sqrt(D) over the visible slots) @ values, times sigmoid(gate[h])
For one token, numpy spent more time in its ~30 small calls than in arithmetic.
`chunk_attention` does the softmax attention of a chunk of queries; unlike a dense numpy
version it skips the empty slots of a sliding layer's ring (3.5x faster on a 128-token
prompt with a 528-slot ring).

Both run one function per (query, head), `_attend`, and sum in a fixed order
(quant.jit.FIXED_ORDER, runtime.model.ops.dot) over the slots in slot order, so a position's
attention output is bit-identical from decode and from any prefill chunk. decode_attention is
never inlined: the fused decode kernel, compiled with full fast-math for its integer GEMVs,
calls it, and its sums keep their order there.

The cache is read and written in its stored types (runtime.model.kv_types: f32, f16 or q8_0,
each array pair (data, scale)): a Numba specialization per type, converting element by element
inside the loops. kscale/vscale may be left out (None) for float32 and f16 caches.

Shape legend:  Nh query heads  Nk KV heads  D head dim  S cache slots  R/2 = cos.shape[0]  T chunk
    q [Nh*D]  k, v [Nk*D]  gate [Nh]  (the projections of the token)
    keys, vals [S, Nk, D]  kscale, vscale [S, Nk, D/32] (q8_0; else any)  kpos [S] (the position each slot holds, -1 if empty)
    cos, sin [R/2] float32 (the token's RoPE angles)     out [Nh*D]
    scores [Nh, >= S] float32 scratch
"""

from __future__ import annotations

import numba as nb
import numpy as np
from quant.jit import FIXED_ORDER

from runtime.model.kv_types import add_value, add_values4, key_dot, key_dot4, store_row
from runtime.model.ops import LANES, rms_norm_row


@nb.njit(inline="always", fastmath=FIXED_ORDER, cache=True)
def _norm_rope(x, w, eps, cos, sin):
    """x [D] in place: RMS-norm with weight w, then NeoX RoPE on the first 2 * len(cos) dims."""
    rms_norm_row(x, w, eps, x)
    half = cos.shape[0]
    for j in range(half):
        a = x[j]
        b = x[j + half]
        x[j] = a * cos[j] - b * sin[j]
        x[j + half] = b * cos[j] + a * sin[j]


@nb.njit(inline="always", fastmath=FIXED_ORDER, cache=True)
def _attend(qh, keys, kscale, vals, vscale, kpos, j, qpos, lo, scale, row, part, acc):
    """acc [D] = sum over the visible slots s (lo < kpos[s] <= qpos) of softmax(q . k_s * scale)
    times v_s, unnormalized; returns the softmax's denominator. Slots are visited in slot order,
    which is position order up to a rotation fixed by the cache (a ring's slot is pos % C), so a
    query sums the same terms in the same order however its chunk was cut. row: [>= S] scratch;
    part: [4 * LANES] scratch. Keys are dotted and values added four slots at a time (key_dot4,
    add_values4: each sum in the one-slot order, so the same bits), as the one-slot chains' add
    latency bound them (12 heads over 129 f16 keys of 128: 28 against 17 us for the keys)."""
    n_slots = kpos.shape[0]
    d = acc.shape[0]
    some = np.empty(4, np.int64)
    e4 = np.empty(4, np.float32)
    best = np.float32(-np.inf)
    m = 0
    for s in range(n_slots):
        p = kpos[s]
        if p >= 0 and p <= qpos and p > lo:
            some[m] = s
            m += 1
            if m == 4:
                t0, t1, t2, t3 = key_dot4(qh, keys, kscale, some, j, part)
                row[some[0]] = t0 * scale
                row[some[1]] = t1 * scale
                row[some[2]] = t2 * scale
                row[some[3]] = t3 * scale
                best = max(best, max(max(row[some[0]], row[some[1]]), max(row[some[2]], row[some[3]])))
                m = 0
    for i in range(m):
        t = key_dot(qh, keys, kscale, some[i], j, part) * scale
        row[some[i]] = t
        best = max(best, t)
    total = np.float32(0.0)
    for s in range(n_slots):
        p = kpos[s]
        e = np.float32(0.0)
        if p >= 0 and p <= qpos and p > lo:
            e = np.exp(row[s] - best)
        row[s] = e
        total += e
    for i in range(d):
        acc[i] = 0.0
    m = 0
    for s in range(n_slots):
        e = row[s]
        if e > 0:
            some[m] = s
            e4[m] = e
            m += 1
            if m == 4:
                add_values4(acc, e4, vals, vscale, some, j)
                m = 0
    for i in range(m):
        add_value(acc, e4[i], vals, vscale, some[i], j)
    return total


@nb.njit(inline="always", fastmath=FIXED_ORDER, cache=True)
def _gate(x):
    """sigmoid(x), as decode and prefill both compute the head gate."""
    return np.float32(1.0) / (np.float32(1.0) + np.exp(-x))


@nb.njit(parallel=True, fastmath=FIXED_ORDER, cache=True)
def decode_attention(q, k, v, gate, q_norm, k_norm, eps, cos, sin, keys, vals, kpos, slot, qpos, window, scores,
                     out, kscale=None, vscale=None):
    """See the module doc. window <= 0 means full attention. Writes k/v/qpos into slot `slot`
    (rounded to the cache's types); q is normed and rotated in place."""
    n_kv, d = keys.shape[1], keys.shape[2]
    n_head = q.shape[0] // d
    group = n_head // n_kv
    for j in range(n_kv):
        kh = k[j * d:(j + 1) * d]
        _norm_rope(kh, k_norm, eps, cos, sin)
        store_row(keys, kscale, slot, j, kh)
        store_row(vals, vscale, slot, j, v[j * d:(j + 1) * d])
    kpos[slot] = qpos
    scale = np.float32(1.0 / np.sqrt(d))
    lo = qpos - window if window > 0 else -1  # visible: lo < kpos <= qpos
    for h in nb.prange(n_head):
        qh = q[h * d:(h + 1) * d]
        _norm_rope(qh, q_norm, eps, cos, sin)
        acc = np.empty(d, np.float32)
        total = _attend(qh, keys, kscale, vals, vscale, kpos, h // group, qpos, lo, scale, scores[h],
                        np.empty(4 * LANES, np.float32), acc)
        f = _gate(gate[h]) / total
        for i in range(d):
            out[h * d + i] = acc[i] * f


@nb.njit(parallel=True, fastmath=FIXED_ORDER, cache=True)
def chunk_attention(q, keys, vals, kpos, qpos, window, out, gate, kscale=None, vscale=None):
    """Softmax attention of a chunk: q [T, Nh, D] (normed and rotated) over keys/vals [S, Nk, D]
    at positions kpos [S] (-1: empty), for queries at qpos [T] -> out [T, Nh, D]. A query sees
    the keys with 0 <= kpos <= qpos (and kpos > qpos - window when window > 0). Each head's
    output is times sigmoid(gate [T, Nh]), in decode_attention's arithmetic, so a position's
    output is the same from either kernel. Heads and queries run in parallel."""
    t_count, n_head, d = q.shape
    n_kv = keys.shape[1]
    group = n_head // n_kv
    n_slots = kpos.shape[0]
    scale = np.float32(1.0 / np.sqrt(d))
    for it in nb.prange(t_count * n_head):
        t = it // n_head
        h = it - t * n_head
        qp = qpos[t]
        lo = qp - window if window > 0 else -1
        acc = np.empty(d, np.float32)
        total = _attend(q[t, h], keys, kscale, vals, vscale, kpos, h // group, qp, lo, scale,
                        np.empty(n_slots, np.float32), np.empty(4 * LANES, np.float32), acc)
        f = _gate(gate[t, h]) / total
        for i in range(d):
            out[t, h, i] = acc[i] * f
