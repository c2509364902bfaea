"""One Step-3.5 decoder block over a chunk of consecutive positions, with its KV cache.

    h = h + o_proj(attention(norm(h)) * sigmoid(gate(norm(h))))
    h = h + ffn(norm(h))            ffn: dense SwiGLU, or routed experts + shared expert

Shape legend:  T tokens in the chunk  H hidden  D head dim  Nh/Nk heads  K experts used
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.config import ModelConfig
from runtime.experts import ExpertProvider
from runtime.kv_cache import LayerKV
from runtime.layers import attend, group_by_expert, rms_norm, rope, rope_inv_freq, route, sigmoid, swiglu, visible
from runtime.tensors import matmul
from runtime.weights import FFN, BlockWeights


@dataclass(frozen=True)
class BlockSpec:
    """What block i needs from the config, resolved once."""

    index: int
    n_head: int
    n_kv: int
    head_dim: int
    inv_freq: np.ndarray  # [R/2] RoPE speeds
    window: int | None  # None on full-attention blocks
    eps: float
    limit: float  # routed experts' SwiGLU clamp
    limit_shared: float  # shared expert / dense MLP clamp
    n_expert_used: int
    expert_scale: float
    expert_norm: bool


def block_spec(cfg: ModelConfig, i: int, rope_factors: np.ndarray | None) -> BlockSpec:
    sliding = cfg.sliding[i]
    base = cfg.rope_base_sliding if sliding else cfg.rope_base_full
    return BlockSpec(
        index=i, n_head=cfg.n_head[i], n_kv=cfg.n_head_kv[i], head_dim=cfg.head_dim,
        inv_freq=rope_inv_freq(cfg.n_rot[i], base, None if sliding else rope_factors),
        window=cfg.window if sliding else None, eps=cfg.rms_eps,
        limit=cfg.swiglu_limit[i], limit_shared=cfg.swiglu_limit_shared[i],
        n_expert_used=cfg.n_expert_used, expert_scale=cfg.expert_scale, expert_norm=cfg.expert_norm,
    )


def attention(s: BlockSpec, w: BlockWeights, x: np.ndarray, pos: np.ndarray, kv: LayerKV) -> np.ndarray:
    """x [T, H] (normed) at positions pos [T] -> [T, H]; appends this chunk's K/V to kv."""
    T, D = x.shape[0], s.head_dim
    q = matmul(x, w.q).reshape(T, s.n_head, D)
    k = matmul(x, w.k).reshape(T, s.n_kv, D)
    v = matmul(x, w.v).reshape(T, s.n_kv, D)
    q = rope(rms_norm(q, w.q_norm, s.eps), pos, s.inv_freq)
    k = rope(rms_norm(k, w.k_norm, s.eps), pos, s.inv_freq)
    if kv.fits_in_place(T):  # decode and small chunks: attend over the cache itself, no copy
        kv.append(k, v, pos)
        keys, vals, kpos = kv.view()  # [S, Nk, D]
    else:  # a long chunk would overwrite ring slots its first queries still see
        ck, cv, cpos = kv.view()
        keys, vals, kpos = np.concatenate([ck, k]), np.concatenate([cv, v]), np.concatenate([cpos, pos])
        kv.append(k, v, pos)
    out = attend(q, keys, vals, visible(pos, kpos, s.window))  # [T, Nh, D]
    out *= sigmoid(matmul(x, w.gate))[:, :, None]  # head-wise gate [T, Nh, 1]
    return matmul(out.reshape(T, s.n_head * D), w.o)


def dense_ffn(f: FFN, x: np.ndarray, limit: float) -> np.ndarray:
    return matmul(swiglu(matmul(x, f.gate), matmul(x, f.up), limit), f.down)


def moe_ffn(s: BlockSpec, w: BlockWeights, x: np.ndarray, provider: ExpertProvider) -> np.ndarray:
    """Routed experts (fetched through the provider) plus the shared expert: x [T, H] -> [T, H]."""
    ids, weights = route(matmul(x, w.router), w.router_bias, s.n_expert_used, s.expert_scale, s.expert_norm)  # [T, K]
    groups = group_by_expert(ids)
    out = dense_ffn(w.shared, x, s.limit_shared)
    # Experts arrive in whatever order the provider has them; sum in expert order so the
    # result is bit-identical whether they came from RAM, the cache or the disk.
    ys = {}
    for e, ew in provider.experts(s.index, groups):
        rows, slots = groups[e]
        xe = x[rows]
        ys[e] = matmul(swiglu(matmul(xe, ew.gate), matmul(xe, ew.up), s.limit), ew.down) * weights[rows, slots][:, None]
    for e in sorted(ys):
        out[groups[e][0]] += ys[e]
    return out


def guess_experts(s: BlockSpec, w: BlockWeights, h: np.ndarray) -> np.ndarray:
    """Block s's likely experts for hidden states h [T, H] of an earlier block, most likely first.

    Its router on those states; experts are ranked by how many tokens pick them, then by
    the best rank any token gives them.
    """
    ids, _ = route(matmul(rms_norm(h, w.ffn_norm, s.eps), w.router), w.router_bias, s.n_expert_used,
                   s.expert_scale, s.expert_norm)  # [T, K], each row best first
    votes: dict[int, tuple[int, int]] = {}
    for rank, e in zip(np.tile(np.arange(ids.shape[1]), ids.shape[0]).tolist(), ids.ravel().tolist()):
        n, best = votes.get(e, (0, rank))
        votes[e] = (n + 1, min(best, rank))
    return np.asarray(sorted(votes, key=lambda e: (-votes[e][0], votes[e][1])), dtype=np.int64)


def block(s: BlockSpec, w: BlockWeights, h: np.ndarray, pos: np.ndarray, kv: LayerKV,
          provider: ExpertProvider) -> np.ndarray:
    """h [T, H] -> [T, H]."""
    h = h + attention(s, w, rms_norm(h, w.attn_norm, s.eps), pos, kv)
    x = rms_norm(h, w.ffn_norm, s.eps)
    f = moe_ffn(s, w, x, provider) if w.router is not None else dense_ffn(w.dense, x, s.limit_shared)
    return h + f
