"""One Step-3.5 decoder block, with its KV cache.

    h = h + attention(norm(h))         gated GQA, per-head norms, partial RoPE (runtime.model.attention)
    h = h + ffn(norm(h))               dense SwiGLU, or routed experts + shared expert (runtime.model.ffn)

`prefill` runs a chunk of tokens; `decode` one token, updating its hidden state in place.
Where the block's decode plan allows (int8 activations, every matrix with an int8 kernel),
decode is two kernel calls: the attention half (runtime.model.decode_kernels) and the FFN
half (quant.int8_kernels.swiglu_ffns); otherwise it runs the same steps one by one.

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
from runtime.model.ops import rms_norm, rope_inv_freq
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
            plan.kernel(plan.attention, kv.k, kv.v, kv.pos, slot, pos, h, att)
            x = att.x[None]
        else:
            h += attention.decode(s, w, rms_norm(h[None], w.attn_norm, s.eps), pos, slot, kv, att.scores)[0]
            x = rms_norm(h[None], w.ffn_norm, s.eps)
        if not self.moe:
            ffn.dense_decode(s, w.dense, plan.ffn, x, h, buffers.ffn)
            return
        logits = att.logits[None, :w.router.shape[0]] if plan.router_in_kernel else matmul(x, w.router, s.int8)
        ffn.moe_decode(s, w, plan.ffn, x, logits, experts, h, buffers.ffn)
