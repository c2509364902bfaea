"""Pure compute of one Step-3.5 block's parts, float32 numpy. No I/O, no state.

Shape legend:
    T  tokens in this chunk          S  keys visible (cached + this chunk)
    H  hidden size                   D  head dim          R  rotated dims (n_rot)
    Nh query heads   Nk KV heads     G = Nh / Nk query heads per KV head
    E  experts       K  experts used per token
"""

from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x [..., n] * w [n] / rms(x); w already holds `1 + w` (the converter added the 1)."""
    ms = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True)
    return x * (1.0 / np.sqrt(ms + np.float32(eps))) * w


def rope_inv_freq(n_rot: int, base: float, factors: np.ndarray | None = None) -> np.ndarray:
    """[R/2] angular speeds of NeoX RoPE; llama3 `factors` divide them (full layers only)."""
    inv = base ** (-np.arange(0, n_rot // 2, dtype=np.float64) * 2.0 / n_rot)
    if factors is not None:
        inv = inv / factors[: n_rot // 2]
    return inv


def rope(x: np.ndarray, pos: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """NeoX RoPE in place on x [T, N, D]: pairs (j, j + R/2) of the first R dims rotate."""
    half = inv_freq.shape[0]
    ang = pos.astype(np.float64)[:, None] * inv_freq[None, :]  # [T, R/2]
    cos = np.cos(ang).astype(np.float32)[:, None, :]
    sin = np.sin(ang).astype(np.float32)[:, None, :]
    a = x[..., :half].copy()
    b = x[..., half : 2 * half]
    x[..., :half] = a * cos - b * sin
    x[..., half : 2 * half] = b * cos + a * sin
    return x


def sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) = inf for x < -88 gives the right 0
        return 1.0 / (1.0 + np.exp(-x))


def swiglu(g: np.ndarray, u: np.ndarray, limit: float) -> np.ndarray:
    """silu(g) * u, clamped when limit > 0: min(silu(g), L) * clip(u, -L, L). g/u [T, F]."""
    a = g * sigmoid(g)
    if limit > 1e-6:  # llama.cpp's threshold
        a = np.minimum(a, np.float32(limit))
        u = np.clip(u, np.float32(-limit), np.float32(limit))
    return a * u


def route(logits: np.ndarray, bias: np.ndarray | None, k: int, scale: float, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid router: logits [T, E] -> (expert ids [T, K], weights [T, K] float32).

    The bias only chooses; weights are the unbiased sigmoid scores of the chosen experts,
    optionally divided by their sum, times `scale`.
    """
    s = sigmoid(logits.astype(np.float32))
    choose = s if bias is None else s + bias
    ids = np.argsort(-choose, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(s, ids, axis=-1)
    if normalize:
        w = w / np.maximum(w.sum(axis=-1, keepdims=True), np.float32(6.103515625e-5))
    return ids, (w * np.float32(scale)).astype(np.float32)


def group_by_expert(ids: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """ids [T, K] -> {expert: (token rows, slot columns)} for the experts in use."""
    flat = ids.ravel()
    order = np.argsort(flat, kind="stable")
    experts, starts = np.unique(flat[order], return_index=True)
    bounds = list(starts[1:]) + [len(flat)]
    K = ids.shape[1]
    out = {}
    for e, a, b in zip(experts.tolist(), starts.tolist(), bounds):
        sel = order[a:b]
        out[e] = (sel // K, sel % K)
    return out
