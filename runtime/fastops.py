"""Numba versions of the small per-token operations of a block, for decode.

One decode step runs each of these a few dozen times on vectors of a few thousand floats,
where numpy's per-call overhead (several microseconds per ufunc) costs more than the
arithmetic. Same semantics as their numpy counterparts in runtime.layers; float sums in a
fixed order (see runtime.decode_attention._FAST).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from runtime.decode_attention import _FAST, LANES, _dot


@nb.njit(fastmath=_FAST, cache=True)
def _rms_norm(x, w, eps, out):
    n = x.shape[1]
    part = np.empty(LANES, np.float32)
    for t in range(x.shape[0]):
        ss = _dot(x[t], x[t], part)
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(n) + eps)
        for i in range(n):
            out[t, i] = x[t, i] * inv * w[i]


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x [..., n] float32 * w [n] / rms(x) over the last axis (w already holds 1 + w)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    _rms_norm(x.reshape(-1, x.shape[-1]), w, np.float32(eps), out.reshape(-1, x.shape[-1]))
    return out


@nb.njit(fastmath=_FAST, cache=True)
def _route_sorted(logits, bias, k, scale, normalize, ids, weights):
    e = logits.shape[0]
    s = np.empty(e, np.float32)
    choose = np.empty(e, np.float32)
    for i in range(e):
        s[i] = np.float32(1.0) / (np.float32(1.0) + np.exp(-logits[i]))
        choose[i] = s[i] + bias[i] if bias.shape[0] else s[i]
    taken = np.zeros(e, np.bool_)
    for j in range(k):  # the k best, the lower index first among equals (a stable sort's order)
        best = -1
        for i in range(e):
            if not taken[i] and (best < 0 or choose[i] > choose[best]):
                best = i
        taken[best] = True
    total = np.float32(0.0)
    n = 0
    for i in range(e):  # ascending expert ids
        if taken[i]:
            ids[n] = i
            weights[n] = s[i]
            total += s[i]
            n += 1
    div = max(total, np.float32(6.103515625e-5)) if normalize else np.float32(1.0)
    for j in range(k):
        weights[j] = weights[j] / div * scale


def route_sorted(logits: np.ndarray, bias: np.ndarray | None, k: int, scale: float,
                 normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """One token's router logits [E] -> (the k chosen expert ids ascending, their weights)."""
    ids, weights = np.empty(k, np.int64), np.empty(k, np.float32)
    _route_sorted(np.ascontiguousarray(logits, dtype=np.float32), _EMPTY if bias is None else bias, k,
                  np.float32(scale), normalize, ids, weights)
    return ids, weights


_EMPTY = np.zeros(0, np.float32)
