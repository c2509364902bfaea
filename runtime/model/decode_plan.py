"""What the fused decode kernels need, prepared once when the model is built.

A block decodes through the int8 kernels (runtime.model.decode_kernels for the attention
half, quant.int8_kernels.swiglu_ffns for the FFN half) when activations are int8 and every
matrix it multiplies has an int8 kernel. Its `DecodePlan` then holds:
    attention   an AttentionPlan: the block's norms, projection groups, RoPE speeds, window
                and router, in the arrays the kernel takes
    ffn         an FFNPlan: descriptor rows for the fused SwiGLU call (row 0 the dense FFN or
                the shared expert; rows 1..K filled per token with its routed experts), the
                weights and clamps that go with them
Otherwise the plan's parts are None and the block decodes step by step.

The buffers of a decode step (`DecodeScratch` for the attention half, quant's `FFNScratch`
for the FFN half, and their few-token counterparts of runtime.model.few_kernels for up to
FEW_TOKENS tokens at once) belong to the model: allocated once, sized for its largest block,
reused by every block and every token.

Shape legend:  H hidden  Nh/Nk heads  D head dim  E experts  K experts per token  S cache slots
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from quant import int8_kernels

from runtime.base.config import ModelConfig
from runtime.model.decode_kernels import attention_half
from runtime.model import few_kernels
from runtime.model.few_kernels import TokensFFNScratch, TokensScratch, tokens_ffn_scratch, tokens_scratch
from runtime.model.matrix import ffn_descriptor, int8_applies, q8_group
from runtime.model.weights import BlockWeights

FEW_TOKENS = 8  # the most tokens a few-token block step takes (a verify pass, a head's draft rows)

_NO_ROUTER = np.zeros((0, 1), np.float32)
_NO_ROUTER.flags.writeable = False  # the type of a real router (read-only): one compiled kernel


class AttentionPlan(NamedTuple):
    attn_norm: np.ndarray  # float32 [H]
    ffn_norm: np.ndarray  # float32 [H]
    eps: np.float32
    qkvg_qt: np.ndarray  # the q, k, v and head-gate matrices as one int8 group (int8_kernels.Group)
    qkvg_addr: np.ndarray
    qkvg_rb: np.ndarray
    qkvg_starts: np.ndarray
    o_qt: np.ndarray  # the output projection as a group of one
    o_addr: np.ndarray
    o_rb: np.ndarray
    o_starts: np.ndarray
    n_head: int
    q_norm: np.ndarray  # float32 [D]
    k_norm: np.ndarray  # float32 [D]
    inv_freq: np.ndarray  # float64 [R/2]
    window: int  # 0 on full-attention blocks
    router: np.ndarray  # float32 [E, H], read-only ([0, 1] on dense blocks)
    steps: np.ndarray  # int64: the GEMV's VNNI steps for the model's format set (int8_kernels.step_addresses)


class DecodeScratch(NamedTuple):
    x: np.ndarray  # float32 [H]          the normed hidden state, then the FFN's input
    xq: np.ndarray  # int8 [C]            activations as int8 (C = max(H, Nh * D))
    xd: np.ndarray  # float32 [C / 256]
    xb: np.ndarray  # int32 [C / 16]
    proj: np.ndarray  # float32 [(Nh + 2 Nk) * D + Nh]   q, k, v, gate
    cos: np.ndarray  # float32 [D / 2]
    sin: np.ndarray  # float32 [D / 2]
    att: np.ndarray  # float32 [Nh * D]
    o: np.ndarray  # float32 [H]
    scores: np.ndarray  # float32 [Nh, S]   attention scores, grown with the largest cache
    logits: np.ndarray  # float32 [E]


@dataclass
class FFNPlan:
    desc: np.ndarray  # int64 [1 + K, 6]: row 0 the dense FFN or shared expert, rows 1.. the routed experts
    weights: np.ndarray  # float32 [1 + K]: 1, then the routing weights
    limits: np.ndarray  # float32 [1 + K]: the SwiGLU clamps


@dataclass
class DecodePlan:
    attention: AttentionPlan | None  # None: the attention half runs step by step
    ffn: FFNPlan | None  # None: the FFN half runs step by step
    router_in_kernel: bool = False  # the attention kernel also computes the router logits (F32 routers)
    keep: tuple = ()  # the int8 groups whose addresses `attention` holds
    kernel: object = None  # decode_kernels.attention_half, compiled for the model's int8 format set
    few: object = None  # few_kernels.build(int8): the few-token kernels, where both parts are fused
    int8: int = 0  # the format set the kernels are compiled for

    @property
    def few_steps(self) -> np.ndarray:
        """The GEMM steps the few-token FFN takes (every format of the set, loaded on first use)."""
        return int8_kernels.gemm_step_addresses(self.int8)

    @property
    def fused(self) -> bool:
        """Whether both halves of a step run fused (the few-token path needs it)."""
        return self.attention is not None and self.ffn is not None


def _group_arrays(g: int8_kernels.Group) -> tuple:
    return g.qt, g.addr, g.rb, g.starts


def build_plan(cfg: ModelConfig, i: int, w: BlockWeights, inv_freq: np.ndarray, int8: int) -> DecodePlan:
    """Block i's decode plan, its kernels compiled for the int8 format set `int8`; parts are None
    where a matrix does not take int8 activations (all of them when int8 is 0)."""
    if not int8:
        return DecodePlan(None, None)
    qkvg, o = q8_group([w.q, w.k, w.v, w.gate], int8), q8_group([w.o], int8)
    router = w.router
    router_in_kernel = router is not None and router.packed is None  # float32 routers only
    attention = None
    if qkvg is not None and o is not None:
        r = np.ascontiguousarray(router.data, dtype=np.float32).view() if router_in_kernel else _NO_ROUTER
        r.flags.writeable = False
        attention = AttentionPlan(w.attn_norm, w.ffn_norm, np.float32(cfg.rms_eps), *_group_arrays(qkvg),
                                  *_group_arrays(o), cfg.n_head[i], w.q_norm, w.k_norm, inv_freq,
                                  cfg.window if cfg.sliding[i] else 0, r, int8_kernels.step_addresses(int8))
    first = w.dense if router is None else w.shared
    desc = ffn_descriptor(first.gate, first.up, first.down) if all(
        int8_applies(m, int8) for m in (first.gate, first.up, first.down)) else None
    ffn = None
    if desc is not None:
        k = 0 if router is None else cfg.n_expert_used
        rows = np.zeros((1 + k, 6), np.int64)
        rows[0] = desc
        limits = np.full(1 + k, cfg.swiglu_limit[i], np.float32)
        limits[0] = cfg.swiglu_limit_shared[i]
        ffn = FFNPlan(rows, np.ones(1 + k, np.float32), limits)
    return DecodePlan(attention, ffn, attention is not None and router_in_kernel, (qkvg, o),
                      attention_half(int8) if attention is not None else None,
                      few_kernels.build(int8) if attention is not None and ffn is not None else None, int8)


def decode_scratch(cfg: ModelConfig, n_slots: int) -> DecodeScratch:
    """Buffers for every block of `cfg` (trunk and MTP), attention over up to n_slots cache slots."""
    H, D = cfg.hidden, cfg.head_dim
    nh = max(cfg.n_head)
    c = max(H, nh * D)
    proj = max((h + 2 * kv) * D + h for h, kv in zip(cfg.n_head, cfg.n_head_kv))
    return DecodeScratch(np.empty(H, np.float32), np.empty(c, np.int8), np.empty(c // 256, np.float32),
                         np.empty(c // 16, np.int32), np.empty(proj, np.float32), np.empty(D // 2, np.float32),
                         np.empty(D // 2, np.float32), np.empty(nh * D, np.float32), np.empty(H, np.float32),
                         np.empty((nh, n_slots), np.float32), np.empty(max(cfg.n_expert, 1), np.float32))


def ffn_scratch(cfg: ModelConfig) -> int8_kernels.FFNScratch:
    """Buffers for the fused FFN call of any block: a dense FFN, or the shared expert and K experts."""
    widths = [cfg.dense_ffn, cfg.shared_ffn + cfg.n_expert_used * cfg.expert_ffn]
    return int8_kernels.ffn_scratch(cfg.hidden, 1 + cfg.n_expert_used, max(widths))


def few_scratch(cfg: ModelConfig, n_slots: int) -> TokensScratch:
    """Buffers of the few-token attention half for every block of `cfg`, up to FEW_TOKENS tokens."""
    H, D, nh = cfg.hidden, cfg.head_dim, max(cfg.n_head)
    proj = max((h + 2 * kv) * D + h for h, kv in zip(cfg.n_head, cfg.n_head_kv))
    return tokens_scratch(FEW_TOKENS, H, max(2 * H, nh * D), proj, D // 2, nh, n_slots, cfg.n_expert)


def few_ffn_scratch(cfg: ModelConfig) -> TokensFFNScratch:
    """Buffers of the few-token FFN call of any block: FEW_TOKENS tokens of a dense FFN, or each
    of the shared expert and K experts."""
    per = 1 + cfg.n_expert_used
    width = max(cfg.dense_ffn, cfg.shared_ffn + cfg.n_expert_used * cfg.expert_ffn)
    return tokens_ffn_scratch(FEW_TOKENS, cfg.hidden, FEW_TOKENS * per, FEW_TOKENS * width)


@dataclass
class DecodeBuffers:
    """The model's decode buffers: the attention half's and the FFN half's, for one token and
    for a few."""
    attention: DecodeScratch
    ffn: int8_kernels.FFNScratch
    few: TokensScratch
    few_ffn: TokensFFNScratch

    @classmethod
    def for_model(cls, cfg: ModelConfig, n_slots: int) -> "DecodeBuffers":
        return cls(decode_scratch(cfg, n_slots), ffn_scratch(cfg), few_scratch(cfg, n_slots), few_ffn_scratch(cfg))

    def fit(self, n_slots: int) -> DecodeScratch:
        """The attention buffers, their score rows widened to at least n_slots first (by doubling,
        so they grow a handful of times as a full-attention cache grows)."""
        s = self.attention
        if s.scores.shape[1] < n_slots:
            wider = np.empty((s.scores.shape[0], max(n_slots, 2 * s.scores.shape[1])), np.float32)
            self.attention = s = s._replace(scores=wider)
        return s

    def fit_few(self, n_slots: int) -> TokensScratch:
        """The few-token attention buffers, widened as `fit` widens the one-token ones."""
        s = self.few
        if s.scores.shape[1] < n_slots:
            wider = np.empty((s.scores.shape[0], max(n_slots, 2 * s.scores.shape[1])), np.float32)
            self.few = s = s._replace(scores=wider)
        return s
