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
from runtime.model.ops import rms_norm, rope, sigmoid


def prefill(s, w, x: np.ndarray, pos: np.ndarray, kv: LayerKV) -> np.ndarray:
    """x [T, H] (normed) at positions pos [T] -> [T, H]; appends the chunk's keys and values to kv."""
    T, D = x.shape[0], s.head_dim
    q, k, v, g = matmul_many(x, [w.q, w.k, w.v, w.gate], s.int8)
    q, k, v = q.reshape(T, s.n_head, D), k.reshape(T, s.n_kv, D), v.reshape(T, s.n_kv, D)
    q = rope(rms_norm(q, w.q_norm, s.eps), pos, s.inv_freq)
    k = rope(rms_norm(k, w.k_norm, s.eps), pos, s.inv_freq)
    if kv.fits_in_place(T):  # attend over the cache itself, no copy
        kv.append(k, v, pos)
        keys, vals, kpos = kv.view()  # [S, Nk, D]
    else:  # a long chunk would overwrite ring slots its first queries still see
        ck, cv, cpos = kv.view()
        keys, vals, kpos = np.concatenate([ck, k]), np.concatenate([cv, v]), np.concatenate([cpos, pos])
        kv.append(k, v, pos)
    out = np.empty_like(q)  # [T, Nh, D]
    chunk_attention(q, keys, vals, kpos, pos.astype(np.int64), s.window or 0, out)
    out *= sigmoid(g)[:, :, None]  # head-wise gate [T, Nh, 1]
    return matmul(out.reshape(T, s.n_head * D), w.o, s.int8)


def decode(s, w, x: np.ndarray, pos: int, slot: int, kv: LayerKV, scores: np.ndarray) -> np.ndarray:
    """One token: x [1, H] (normed) at position pos, its keys and values written to kv's `slot`
    (reserved by the caller) -> [1, H]. scores: [Nh, >= S] scratch."""
    q, k, v, g = matmul_many(x, [w.q, w.k, w.v, w.gate], s.int8)
    ang = np.float64(pos) * s.inv_freq
    out = np.empty(s.n_head * s.head_dim, np.float32)
    decode_attention(q[0], k[0], v[0], g[0], w.q_norm, w.k_norm, np.float32(s.eps), np.cos(ang).astype(np.float32),
                     np.sin(ang).astype(np.float32), kv.k, kv.v, kv.pos, slot, pos, s.window or 0, scores, out)
    return matmul(out[None], w.o, s.int8)
