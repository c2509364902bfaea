"""One Step-3.5 decoder block, with its KV cache.

    h = h + attention(norm(h))         gated GQA, per-head norms, partial RoPE (runtime.model.attention)
    h = h + ffn(norm(h))               dense SwiGLU, or routed experts + shared expert (runtime.model.ffn)

`prefill` runs a chunk of tokens; `decode` one token, updating its hidden state in place;
`decode_tokens` a few tokens (an MTP verify pass), bit-identical to that many decode steps.
Where the block's decode plan allows (int8 activations, every matrix with an int8 kernel),
decode is two kernel calls: the attention half (runtime.model.decode_kernels) and the FFN
half (quant.int8_kernels.swiglu_ffns); decode_tokens is two calls too, for all its tokens
(runtime.model.few_kernels); otherwise they run the same steps one by one.

Shape legend:  T tokens in the chunk  H hidden  D head dim  Nh/Nk heads  E experts  K experts used
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.base.config import ModelConfig
from runtime.model import attention, ffn
from runtime.model.decode_plan import DecodeBuffers, DecodePlan, build_plan
from runtime.model.experts import ExpertProvider
from runtime.model.kv_cache import LayerKV
from runtime.model.matrix import matmul
from runtime.model.ops import rms_norm, route, rope_inv_freq
from runtime.model.weights import BlockWeights


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
    int8: int = 0  # the int8 format set: activations meeting these formats are rounded to int8 (0: none)


def block_spec(cfg: ModelConfig, i: int, rope_factors: np.ndarray | None, int8: int = 0) -> BlockSpec:
    sliding = cfg.sliding[i]
    base = cfg.rope_base_sliding if sliding else cfg.rope_base_full
    return BlockSpec(
        index=i, n_head=cfg.n_head[i], n_kv=cfg.n_head_kv[i], head_dim=cfg.head_dim,
        inv_freq=rope_inv_freq(cfg.n_rot[i], base, None if sliding else rope_factors),
        window=cfg.window if sliding else None, eps=cfg.rms_eps,
        limit=cfg.swiglu_limit[i], limit_shared=cfg.swiglu_limit_shared[i],
        n_expert_used=cfg.n_expert_used, expert_scale=cfg.expert_scale, expert_norm=cfg.expert_norm, int8=int8,
    )


class Block:
    def __init__(self, cfg: ModelConfig, i: int, weights: BlockWeights, rope_factors: np.ndarray | None, int8: int):
        self.spec = block_spec(cfg, i, rope_factors, int8)
        self.weights = weights
        self.plan: DecodePlan = build_plan(cfg, i, weights, self.spec.inv_freq, int8)

    @property
    def moe(self) -> bool:
        return self.weights.router is not None

    def prefill(self, h: np.ndarray, pos: np.ndarray, kv: LayerKV, experts: ExpertProvider) -> np.ndarray:
        """h [T, H] at positions pos [T] -> [T, H]."""
        s, w = self.spec, self.weights
        h = h + attention.prefill(s, w, rms_norm(h, w.attn_norm, s.eps), pos, kv)
        x = rms_norm(h, w.ffn_norm, s.eps)
        if not self.moe:
            return h + ffn.dense(w.dense, x, s.limit_shared, s.int8)
        return h + ffn.moe(s, w, x, matmul(x, w.router, s.int8), experts)

    def decode(self, h: np.ndarray, pos: int, kv: LayerKV, experts: ExpertProvider, buffers: DecodeBuffers) -> None:
        """One token's hidden state h [H] at position pos, updated in place."""
        s, w, plan = self.spec, self.weights, self.plan
        slot = kv.reserve(pos)  # first: it may grow (replace) the cache arrays
        att = buffers.fit(kv.capacity)
        if plan.attention is not None:  # norm, projections, attention, output, norm, router: one call
            plan.kernel(plan.attention, kv.k, kv.ks, kv.v, kv.vs, kv.pos, slot, pos, h, att)
            x = att.x[None]
        else:
            h += attention.decode(s, w, rms_norm(h[None], w.attn_norm, s.eps), pos, slot, kv, att.scores)[0]
            x = rms_norm(h[None], w.ffn_norm, s.eps)
        if not self.moe:
            ffn.dense_decode(s, w.dense, plan.ffn, x, h, buffers.ffn)
            return
        logits = att.logits[None, :w.router.shape[0]] if plan.router_in_kernel else matmul(x, w.router, s.int8)
        ffn.moe_decode(s, w, plan.ffn, x, logits, experts, h, buffers.ffn)

    def decode_tokens(self, h: np.ndarray, pos: int, kv: LayerKV, experts: ExpertProvider,
                      buffers: DecodeBuffers) -> None:
        """A few tokens' hidden states h [T, H] at positions pos.., updated in place: the same bits
        as T decode steps, in two kernel calls where the plan fuses both halves and the cache
        takes the T keys before the first query attends (see LayerKV.fits_in_place)."""
        n = h.shape[0]
        plan = self.plan
        if n == 1 or not plan.fused or n > buffers.few.x.shape[0] or not kv.fits_in_place(n) \
                or not h.flags.c_contiguous:
            for t in range(n):
                self.decode(h[t], pos + t, kv, experts, buffers)
            return
        s, w = self.spec, self.weights
        slots = [kv.reserve(pos + t) for t in range(n)]  # first: they may grow (replace) the cache arrays
        sc = buffers.fit_few(kv.capacity)
        sc.slots[:n] = slots
        sc.qpos[:n] = np.arange(pos, pos + n)
        plan.few.attention_half(plan.attention, kv.k, kv.ks, kv.v, kv.vs, kv.pos, n, h, sc)
        x = sc.x[:n]
        f = plan.ffn
        if not self.moe:
            plan.few.ffn(f.desc, np.zeros((n, 1), np.int64), np.ones((n, 1), np.float32), f.limits, n, x, h,
                         buffers.few_ffn, plan.few_steps)
            return
        if plan.router_in_kernel:
            logits = sc.logits[:n, :w.router.shape[0]]
        else:  # row by row, as decode does: a float32 GEMM's sums (an F16 router) differ from the GEMV's
            logits = np.concatenate([matmul(x[t:t + 1], w.router, s.int8) for t in range(n)])
        ids, weights = route(logits, w.router_bias, s.n_expert_used, s.expert_scale, s.expert_norm, ascending=True)
        union = np.unique(ids)  # [U] ascending
        with experts.held(s.index, union.tolist()) as got:
            descs = None
            if got is not None:
                by_id = dict(got)
                descs = [by_id[e].descriptor for e in union.tolist()]
            if descs is not None and all(d is not None for d in descs):
                desc = np.empty((1 + union.size, 6), np.int64)
                desc[0] = f.desc[0]
                desc[1:] = descs
                entry = np.zeros((n, 1 + ids.shape[1]), np.int64)
                entry[:, 1:] = 1 + np.searchsorted(union, ids)
                wts = np.ones((n, 1 + ids.shape[1]), np.float32)
                wts[:, 1:] = weights
                limits = np.full(1 + union.size, f.limits[-1], np.float32)
                limits[0] = f.limits[0]
                plan.few.ffn(desc, entry, wts, limits, n, x, h, buffers.few_ffn, plan.few_steps)
                return
        for t in range(n):  # the experts cannot all be held at once: token by token, as decode does
            ffn.moe_decode(s, w, f, x[t:t + 1], logits[t:t + 1], experts, h[t], buffers.ffn)
