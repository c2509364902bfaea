"""A block's attention: gated grouped-query attention with per-head norms and partial RoPE.

    q, k, v, g = x @ Wq, Wk, Wv, Wgate           (x: the normed hidden state)
    q, k       = rope(rms_norm_per_head(q, k))
    out        = softmax(q k^T / sqrt(D)) v       over the visible cache (a sliding window or all)
    return (out * sigmoid(g)[head]) @ Wo

`prefill` takes a chunk of tokens; `decode` one token, step by step (the fused int8 kernel
of runtime.model.decode_kernels does the same in one call where the plan allows).

Shape legend:  T tokens in the chunk  H hidden  D head dim  Nh/Nk heads  S cache slots
"""

from __future__ import annotations

import numpy as np

from runtime.model.attention_kernels import chunk_attention, decode_attention
from runtime.model.kv_cache import LayerKV
from runtime.model.matrix import matmul, matmul_many
from runtime.model.ops import rms_norm, rope, rope_angles


def prefill(s, w, x: np.ndarray, pos: np.ndarray, kv: LayerKV) -> np.ndarray:
    """x [T, H] (normed) at positions pos [T] -> [T, H]; appends the chunk's keys and values to kv.

    A query attends over the cache itself, in slot order, as a decode step does. A chunk longer
    than a ring can take before its first queries' keys are overwritten goes in pieces that fit:
    concatenating the chunk after the ring instead would change the order of the sums."""
    T, D = x.shape[0], s.head_dim
    q, k, v, g = matmul_many(x, [w.q, w.k, w.v, w.gate], s.int8)
    q, k, v = q.reshape(T, s.n_head, D), k.reshape(T, s.n_kv, D), v.reshape(T, s.n_kv, D)
    q = rope(rms_norm(q, w.q_norm, s.eps), pos, s.inv_freq)
    k = rope(rms_norm(k, w.k_norm, s.eps), pos, s.inv_freq)
    pos = pos.astype(np.int64)
    g = np.ascontiguousarray(g.reshape(T, s.n_head))
    out = np.empty_like(q)  # [T, Nh, D]
    step = T if kv.fits_in_place(T) else kv.capacity - kv.window + 1
    for a in range(0, T, step):
        b = min(T, a + step)
        kv.append(k[a:b], v[a:b], pos[a:b])
        keys, kscale, vals, vscale, kpos = kv.view()  # [S, Nk, D], in the cache's types
        chunk_attention(q[a:b], keys, vals, kpos, pos[a:b], s.window or 0, out[a:b], g[a:b], kscale, vscale)
    return matmul(out.reshape(T, s.n_head * D), w.o, s.int8)


def decode(s, w, x: np.ndarray, pos: int, slot: int, kv: LayerKV, scores: np.ndarray) -> np.ndarray:
    """One token: x [1, H] (normed) at position pos, its keys and values written to kv's `slot`
    (reserved by the caller) -> [1, H]. scores: [Nh, >= S] scratch."""
    q, k, v, g = matmul_many(x, [w.q, w.k, w.v, w.gate], s.int8)
    half = s.inv_freq.shape[0]
    cos, sin = np.empty(half, np.float32), np.empty(half, np.float32)
    rope_angles(pos, s.inv_freq, cos, sin)
    out = np.empty(s.n_head * s.head_dim, np.float32)
    decode_attention(q[0], k[0], v[0], g[0], w.q_norm, w.k_norm, np.float32(s.eps), cos, sin, kv.k, kv.v, kv.pos,
                     slot, pos, s.window or 0, scores, out, kv.ks, kv.vs)
    return matmul(out[None], w.o, s.int8)
