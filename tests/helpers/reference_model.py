"""Float64 numpy reference of the Step-3.5 forward pass: the executable spec of the model.

Written for clarity, not speed: one full-sequence pass, no KV cache, every semantic
spelled out (see /work/shared/docs/step35-model.md). It shares no code with `runtime/`,
so agreement between the two means something.

Weights and config come from tests.helpers.reference_weights (re-exported here): a mapping
from GGUF tensor name to a float64 array in numpy (HF) order, from the safetensors
(`hf_weights`) or from any GGUF, dequantized with gguf.quants (`gguf_weights`).

Shape legend:
    T tokens   H hidden   V vocab   D head dim   Nh query heads   Nk KV groups
    E experts  K experts used per token   R rotated dims (D/2 full, D sliding)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from tests.helpers.reference_weights import RefConfig, gguf_weights, hf_weights, round_q8  # noqa: F401


# ----------------------------------------------------------------------------- math


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """Over the last axis; `w` is already `1 + w_hf`."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def silu(x: np.ndarray) -> np.ndarray:
    return x * sigmoid(x)


def rope_neox(x: np.ndarray, pos: np.ndarray, n_rot: int, theta: float, factors=None) -> np.ndarray:
    """x [T, N, D]: rotate the pairs (j, j + R/2) of the first R dims; the rest pass through."""
    half = n_rot // 2
    inv_freq = theta ** (-np.arange(half, dtype=np.float64) * 2.0 / n_rot)  # [R/2]
    if factors is not None:
        inv_freq = inv_freq / np.asarray(factors[:half], dtype=np.float64)
    ang = pos[:, None].astype(np.float64) * inv_freq[None, :]  # [T, R/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., :half], x[..., half:n_rot]
    out = x.copy()
    out[..., :half] = a * cos - b * sin
    out[..., half:n_rot] = b * cos + a * sin
    return out


def swiglu(x, w_gate, w_up, w_down, limit: float) -> np.ndarray:
    """x [T, H]; w_gate/w_up [F, H]; w_down [H, F]. Clamped when limit > 0 (llama.cpp: > 1e-6)."""
    g = silu(x @ w_gate.T)
    u = x @ w_up.T
    if limit > 1e-6:
        g = np.minimum(g, limit)
        u = np.clip(u, -limit, limit)
    return (g * u) @ w_down.T


def attention_mask(pos: np.ndarray, window: int | None) -> np.ndarray:
    """[Tq, Tk] True where query p sees key k: k <= p, and p - W < k on sliding layers."""
    ok = pos[None, :] <= pos[:, None]
    if window is not None:
        ok &= pos[None, :] > pos[:, None] - window
    return ok


def attention(cfg: RefConfig, W: Mapping, i: int, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Block i's attention on normed input x [T, H] -> [T, H]."""
    p = f"blk.{i}."
    T, D = x.shape[0], cfg.head_dim
    nh, nk = cfg.n_head[i], cfg.n_head_kv[i]
    q = (x @ W[p + "attn_q.weight"].T).reshape(T, nh, D)
    k = (x @ W[p + "attn_k.weight"].T).reshape(T, nk, D)
    v = (x @ W[p + "attn_v.weight"].T).reshape(T, nk, D)
    q = rms_norm(q, W[p + "attn_q_norm.weight"], cfg.eps)
    k = rms_norm(k, W[p + "attn_k_norm.weight"], cfg.eps)
    if cfg.sliding[i]:
        n_rot, theta, factors, window = D, cfg.theta_sliding, None, cfg.window
    else:
        n_rot, theta, factors, window = D // 2, cfg.theta_full, cfg.rope_factors, None
    q = rope_neox(q, pos, n_rot, theta, factors)
    k = rope_neox(k, pos, n_rot, theta, factors)
    group = np.arange(nh) // (nh // nk)  # query head -> KV group
    scores = np.einsum("thd,shd->hts", q, k[:, group]) / math.sqrt(D)  # [Nh, T, T]
    scores = np.where(attention_mask(pos, window)[None], scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.einsum("hts,shd->thd", probs, v[:, group])  # [T, Nh, D]
    gate = sigmoid(x @ W[p + "attn_gate.weight"].T)  # [T, Nh]
    out = out * gate[:, :, None]
    return out.reshape(T, nh * D) @ W[p + "attn_output.weight"].T


def route(cfg: RefConfig, logits: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """logits [T, E] -> (chosen [T, K], weights [T, K]). The bias only chooses."""
    s = sigmoid(logits)
    sel_score = s if bias is None else s + bias
    chosen = np.argsort(-sel_score, axis=-1, kind="stable")[:, : cfg.n_expert_used]
    w = np.take_along_axis(s, chosen, axis=-1)
    if cfg.norm_expert_weight:
        w = w / np.maximum(w.sum(axis=-1, keepdims=True), 6.103515625e-5)
    return chosen, w * cfg.router_scale


def moe(cfg: RefConfig, W: Mapping, i: int, x: np.ndarray) -> np.ndarray:
    p = f"blk.{i}."
    bias = W.get(p + "exp_probs_b.bias")
    chosen, weights = route(cfg, x @ W[p + "ffn_gate_inp.weight"].T, bias)
    gate, up, down = W[p + "ffn_gate_exps.weight"], W[p + "ffn_up_exps.weight"], W[p + "ffn_down_exps.weight"]
    out = np.zeros_like(x)
    for e in np.unique(chosen):
        t, k = np.nonzero(chosen == e)  # the tokens that chose expert e, and in which slot
        out[t] += weights[t, k][:, None] * swiglu(x[t], gate[e], up[e], down[e], cfg.limit[i])
    shared = swiglu(x, W[p + "ffn_gate_shexp.weight"], W[p + "ffn_up_shexp.weight"], W[p + "ffn_down_shexp.weight"], cfg.limit_shared[i])
    return out + shared


def block(cfg: RefConfig, W: Mapping, i: int, h: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """One decoder block: h [T, H] -> [T, H]."""
    p = f"blk.{i}."
    h = h + attention(cfg, W, i, rms_norm(h, W[p + "attn_norm.weight"], cfg.eps), pos)
    x = rms_norm(h, W[p + "ffn_norm.weight"], cfg.eps)
    if cfg.moe[i]:
        f = moe(cfg, W, i, x)
    else:
        f = swiglu(x, W[p + "ffn_gate.weight"], W[p + "ffn_up.weight"], W[p + "ffn_down.weight"], cfg.limit_shared[i])
    return h + f


def trunk_hidden(cfg: RefConfig, W: Mapping, tokens) -> np.ndarray:
    """Last trunk hidden state, before the final norm: [T, H]."""
    tokens = np.asarray(tokens, dtype=np.int64)
    h = W["token_embd.weight"][tokens]
    pos = np.arange(len(tokens))
    for i in range(cfg.n_layers):
        h = block(cfg, W, i, h, pos)
    return h


def logits_from_hidden(cfg: RefConfig, W: Mapping, h: np.ndarray) -> np.ndarray:
    head = W["output.weight"] if "output.weight" in W else W["token_embd.weight"]
    return rms_norm(h, W["output_norm.weight"], cfg.eps) @ head.T


def forward_logits(cfg: RefConfig, W: Mapping, tokens) -> np.ndarray:
    """[T, V] float64 logits of every position."""
    return logits_from_hidden(cfg, W, trunk_hidden(cfg, W, tokens))


def mtp_logits(cfg: RefConfig, W: Mapping, tokens) -> list[np.ndarray]:
    """Teacher-forced MTP drafts: entry j is [T-1-j, V], row t predicting token t+2+j.

    Block j at position t reads the token t+1+j and a hidden state: the trunk's (pre-norm)
    at t for j = 0, block j-1's output at t otherwise. Each block attends causally over
    its own stream of positions 0..T-2-j.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    h = trunk_hidden(cfg, W, tokens)
    out = []
    for j in range(cfg.n_mtp):
        i = cfg.n_layers + j
        p = f"blk.{i}."
        n = len(tokens) - 1 - j
        if n <= 0:
            break
        h = h[:n]
        e = rms_norm(W["token_embd.weight"][tokens[1 + j : 1 + j + n]], W[p + "nextn.enorm.weight"], cfg.eps)
        x = np.concatenate([e, rms_norm(h, W[p + "nextn.hnorm.weight"], cfg.eps)], axis=-1) @ W[p + "nextn.eh_proj.weight"].T
        h = block(cfg, W, i, x, np.arange(n))
        head_norm = W.get(p + "nextn.shared_head_norm.weight", W["output_norm.weight"])
        head = W.get(p + "nextn.shared_head_head.weight", W.get("output.weight"))
        out.append(rms_norm(h, head_norm, cfg.eps) @ head.T)
    return out


# ----------------------------------------------------------------------------- entry points


def reference_logits(ckpt_dir: str | Path, tokens) -> np.ndarray:
    cfg, W = hf_weights(ckpt_dir)
    return forward_logits(cfg, W, tokens)


def reference_mtp_logits(ckpt_dir: str | Path, tokens) -> list[np.ndarray]:
    cfg, W = hf_weights(ckpt_dir)
    return mtp_logits(cfg, W, tokens)


def gguf_reference_logits(path: str | Path, tokens) -> np.ndarray:
    cfg, W = gguf_weights(path)
    return forward_logits(cfg, W, tokens)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def kl_rows(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(p) || softmax(q)) per row, in nats."""
    def logsoftmax(z):
        z = np.asarray(z, dtype=np.float64)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = logsoftmax(p_logits), logsoftmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)
