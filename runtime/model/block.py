"""One Step-3.5 decoder block over a chunk of consecutive positions, with its KV cache.

    h = h + o_proj(attention(norm(h)) * sigmoid(gate(norm(h))))
    h = h + ffn(norm(h))            ffn: dense SwiGLU, or routed experts + shared expert

Shape legend:  T tokens in the chunk  H hidden  D head dim  Nh/Nk heads  K experts used
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as Q
from quant import int8_kernels as q8kernels

from runtime.base.config import ModelConfig
from runtime.model.attention_kernels import chunk_attention, decode_attention
from runtime.model.decode_kernels import attention_step
from runtime.model.experts import ExpertProvider
from runtime.model.kv_cache import LayerKV
from runtime.model.matrix import matmul, matmul_many, matvec_q8
from runtime.model.ops import group_by_expert, rms_norm, rope, rope_inv_freq, route, route_sorted, sigmoid, swiglu
from runtime.model.weights import FFN, BlockWeights


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
    q8: bool = False  # int8 activations for quantized weights (RuntimeOptions.activations)


def block_spec(cfg: ModelConfig, i: int, rope_factors: np.ndarray | None, q8: bool = False) -> BlockSpec:
    sliding = cfg.sliding[i]
    base = cfg.rope_base_sliding if sliding else cfg.rope_base_full
    return BlockSpec(
        index=i, n_head=cfg.n_head[i], n_kv=cfg.n_head_kv[i], head_dim=cfg.head_dim,
        inv_freq=rope_inv_freq(cfg.n_rot[i], base, None if sliding else rope_factors),
        window=cfg.window if sliding else None, eps=cfg.rms_eps,
        limit=cfg.swiglu_limit[i], limit_shared=cfg.swiglu_limit_shared[i],
        n_expert_used=cfg.n_expert_used, expert_scale=cfg.expert_scale, expert_norm=cfg.expert_norm, q8=q8,
    )


def attention(s: BlockSpec, w: BlockWeights, x: np.ndarray, pos: np.ndarray, kv: LayerKV) -> np.ndarray:
    """x [T, H] (normed) at positions pos [T] -> [T, H]; appends this chunk's K/V to kv."""
    T, D = x.shape[0], s.head_dim
    if T == 1 and s.q8 and w.qkvg_q8 is not None:  # one kernel call for the four projections
        proj = matvec_q8(w.qkvg_q8, x)
        nq, nk = s.n_head * D, s.n_kv * D
        q, k, v, g = (proj[:, :nq], proj[:, nq:nq + nk], proj[:, nq + nk:nq + 2 * nk], proj[:, nq + 2 * nk:])
    else:
        q, k, v, g = matmul_many(x, [w.q, w.k, w.v, w.gate], s.q8)
    if T == 1:  # decode: norms, RoPE, cache write and attention in one kernel call
        p = int(pos[0])
        slot = kv.reserve(p)  # first: it may grow (replace) the cache arrays
        ang = np.float64(p) * s.inv_freq
        out = np.empty(s.n_head * D, np.float32)
        decode_attention(q[0], k[0], v[0], g[0], w.q_norm, w.k_norm, np.float32(s.eps),
                         np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32),
                         kv.k, kv.v, kv.pos, slot, p, s.window or 0, out)
        return matvec_q8(w.o_q8, out[None]) if s.q8 and w.o_q8 is not None else matmul(out[None], w.o, s.q8)
    q, k, v = q.reshape(T, s.n_head, D), k.reshape(T, s.n_kv, D), v.reshape(T, s.n_kv, D)
    q = rope(rms_norm(q, w.q_norm, s.eps), pos, s.inv_freq)
    k = rope(rms_norm(k, w.k_norm, s.eps), pos, s.inv_freq)
    if kv.fits_in_place(T):  # decode and small chunks: attend over the cache itself, no copy
        kv.append(k, v, pos)
        keys, vals, kpos = kv.view()  # [S, Nk, D]
    else:  # a long chunk would overwrite ring slots its first queries still see
        ck, cv, cpos = kv.view()
        keys, vals, kpos = np.concatenate([ck, k]), np.concatenate([cv, v]), np.concatenate([cpos, pos])
        kv.append(k, v, pos)
    out = np.empty_like(q)  # [T, Nh, D]
    chunk_attention(q, keys, vals, kpos, pos.astype(np.int64), s.window or 0, out)
    out *= sigmoid(g)[:, :, None]  # head-wise gate [T, Nh, 1]
    return matmul(out.reshape(T, s.n_head * D), w.o, s.q8)


def dense_ffn(f: FFN, x: np.ndarray, limit: float, q8: bool = False, into: np.ndarray | None = None) -> np.ndarray:
    """SwiGLU FFN of x [T, H]. With `into` [1, H] (one token), the result is added into it."""
    if q8 and x.shape[0] == 1 and f.descriptor is not None:
        return fused_ffns(x, [f.descriptor], [1.0], [limit], into)
    gate, up = matmul_many(x, [f.gate, f.up], q8)
    out = matmul(swiglu(gate, up, limit), f.down, q8)
    return out if into is None else into + out


def fused_ffns(x: np.ndarray, descriptors: list, weights, limits, into: np.ndarray | None = None) -> np.ndarray:
    """One token x [1, H] through SwiGLU FFNs (given by their descriptors), weighted and summed
    in list order, in one int8-activation kernel call, added into `into` [1, H] if given."""
    out = np.zeros((1, x.shape[1]), np.float32) if into is None else into
    q8kernels.swiglu_ffns(np.stack(descriptors), np.asarray(weights, np.float32), np.asarray(limits, np.float32),
                          np.ascontiguousarray(x[0], dtype=np.float32), out[0])
    return out


def moe_ffn(s: BlockSpec, w: BlockWeights, x: np.ndarray, provider: ExpertProvider,
            logits: np.ndarray | None = None, into: np.ndarray | None = None) -> np.ndarray:
    """Routed experts (fetched through the provider) plus the shared expert: x [T, H] -> [T, H].
    `logits` [T, E]: the router's, if already computed; `into` [1, H]: add the result into it."""
    if logits is None:
        logits = matmul(x, w.router, s.q8)
    held = getattr(provider, "held", None)
    if s.q8 and x.shape[0] == 1 and held is not None and w.shared is not None and w.shared.descriptor is not None:
        # one token: hold all its experts at once and run them, with the shared one, in one call
        ids, weights = route_sorted(logits[0], w.router_bias, s.n_expert_used, s.expert_scale, s.expert_norm)
        groups = {int(e): (np.zeros(1, np.int64), np.array([k])) for k, e in enumerate(ids)}
        with held(s.index, ids.tolist()) as got:
            if got is None:
                out = _experts_sum(s, w, x, weights[None], groups, provider.experts(s.index, groups))
            else:
                by_id = dict(got)
                descs = [w.shared.descriptor] + [by_id[e].descriptor for e in ids.tolist()]
                if all(d is not None for d in descs):
                    return fused_ffns(x, descs, [1.0, *weights.tolist()], [s.limit_shared] + [s.limit] * len(ids), into)
                out = _experts_sum(s, w, x, weights[None], groups, got)
        return out if into is None else into + out
    ids, weights = route(logits, w.router_bias, s.n_expert_used, s.expert_scale, s.expert_norm)  # [T, K]
    groups = group_by_expert(ids)
    out = _experts_sum(s, w, x, weights, groups, provider.experts(s.index, groups))
    return out if into is None else into + out


def _experts_sum(s: BlockSpec, w: BlockWeights, x: np.ndarray, weights: np.ndarray,
                 groups: dict, experts) -> np.ndarray:
    """The shared expert plus the routed experts, which arrive as (id, weights) in any order."""
    out = dense_ffn(w.shared, x, s.limit_shared, s.q8)
    # Experts arrive in whatever order the provider has them; sum in expert order so the
    # result is bit-identical whether they came from RAM, the cache or the disk.
    ys = {}
    for e, ew in experts:
        rows, slots = groups[e]
        xe = x[rows]
        gate, up = matmul_many(xe, [ew.gate, ew.up], s.q8)
        ys[e] = matmul(swiglu(gate, up, s.limit), ew.down, s.q8) * weights[rows, slots][:, None]
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
    if h.shape[0] == 1 and s.q8 and w.qkvg_q8 is not None and w.o_q8 is not None:
        return decode_block(s, w, h, int(pos[0]), kv, provider)
    h = h + attention(s, w, rms_norm(h, w.attn_norm, s.eps), pos, kv)
    x = rms_norm(h, w.ffn_norm, s.eps)
    f = moe_ffn(s, w, x, provider) if w.router is not None else dense_ffn(w.dense, x, s.limit_shared, s.q8)
    return h + f


_NO_ROUTER = np.zeros((0, 1), np.float32)
_NO_ROUTER.flags.writeable = False  # the same array type as a router (see BlockWeights.router_f32)


def decode_block(s: BlockSpec, w: BlockWeights, h: np.ndarray, pos: int, kv: LayerKV,
                 provider: ExpertProvider) -> np.ndarray:
    """One token through block s in two kernel calls: the attention half (runtime.model.decode_kernels,
    router logits included), then the FFN half added into the residual."""
    g, o = w.qkvg_q8, w.o_q8
    n = h.shape[1]
    slot = kv.reserve(pos)  # first: it may grow (replace) the cache arrays
    router = w.router_f32 if w.router is not None and w.router.qtype == Q.F32 else _NO_ROUTER
    h_out, x_out = np.empty((1, n), np.float32), np.empty((1, n), np.float32)
    logits = np.empty((1, router.shape[0]), np.float32)
    attention_step(np.ascontiguousarray(h[0], dtype=np.float32), w.attn_norm, w.ffn_norm, np.float32(s.eps),
                   g.qt, g.addr, g.rb, g.starts, o.qt, o.addr, o.rb, o.starts, s.n_head, w.q_norm, w.k_norm,
                   s.inv_freq, kv.k, kv.v, kv.pos, slot, pos, s.window or 0, router, h_out[0], x_out[0], logits[0])
    if w.router is None:
        return dense_ffn(w.dense, x_out, s.limit_shared, s.q8, into=h_out)
    return moe_ffn(s, w, x_out, provider, logits=logits if router.shape[0] else None, into=h_out)



