"""The small operations of a block: RMS norm, RoPE, the gates, SwiGLU, routing.

Each exists once. The float sums that decide bit-exactness (RMS norm, attention dots,
router logits) run in Numba with a fixed summation order (quant.jit.FIXED_ORDER and the
LANES partial sums of `dot`), so a kernel compiled now and its cached copy agree, and
prefill and decode compute a norm the same way. The rest is numpy over whole chunks.

Shape legend:
    T  tokens in this chunk          H  hidden size       D  head dim      R  rotated dims (n_rot)
    E  experts                       K  experts used per token
"""

from __future__ import annotations

import numba as nb
import numpy as np
from quant.int8_kernels.ffn import swiglu_row
from quant.jit import FIXED_ORDER

LANES = 16


@nb.njit(inline="always", fastmath=FIXED_ORDER, cache=True)
def dot(a, b, part):
    """sum(a * b) over equal-length vectors, in a fixed order: LANES partial sums (part holds
    LANES floats of scratch), then their sum. Vectorizes without reordering anything."""
    n = a.shape[0]
    for l in range(LANES):
        part[l] = 0.0
    m = n - n % LANES
    for i0 in range(0, m, LANES):
        for l in range(LANES):
            part[l] += a[i0 + l] * b[i0 + l]
    t = np.float32(0.0)
    for l in range(LANES):
        t += part[l]
    for i in range(m, n):
        t += a[i] * b[i]
    return t


@nb.njit(inline="always", fastmath=FIXED_ORDER, cache=True)
def dot4(a, b0, b1, b2, b3, part):
    """dot(a, b_j) for four vectors b_j at once, each summed exactly as `dot` sums it (part: 4 x
    LANES floats of scratch): four independent chains instead of one, which the adds' latency
    otherwise bounds."""
    n = a.shape[0]
    for l in range(4 * LANES):
        part[l] = 0.0
    m = n - n % LANES
    for i0 in range(0, m, LANES):
        for l in range(LANES):
            u = a[i0 + l]
            part[l] += u * b0[i0 + l]
            part[LANES + l] += u * b1[i0 + l]
            part[2 * LANES + l] += u * b2[i0 + l]
            part[3 * LANES + l] += u * b3[i0 + l]
    t0 = np.float32(0.0)
    t1 = np.float32(0.0)
    t2 = np.float32(0.0)
    t3 = np.float32(0.0)
    for l in range(LANES):
        t0 += part[l]
        t1 += part[LANES + l]
        t2 += part[2 * LANES + l]
        t3 += part[3 * LANES + l]
    for i in range(m, n):
        t0 += a[i] * b0[i]
        t1 += a[i] * b1[i]
        t2 += a[i] * b2[i]
        t3 += a[i] * b3[i]
    return t0, t1, t2, t3


@nb.njit(fastmath=FIXED_ORDER, cache=True)
def rms_norm_row(x, w, eps, out):
    """out [n] = x [n] * w [n] / rms(x); w already holds `1 + w` (the converter added the 1).
    out may be x itself. Not inlined: compiled on its own, its sum keeps its fixed order inside
    callers compiled with full fast-math (see quant.jit)."""
    n = x.shape[0]
    part = np.empty(LANES, np.float32)
    ss = dot(x, x, part)
    inv = np.float32(1.0) / np.sqrt(ss / np.float32(n) + eps)
    for i in range(n):
        out[i] = x[i] * inv * w[i]


@nb.njit(fastmath=FIXED_ORDER, cache=True)
def _rms_norm_rows(x, w, eps, out):
    for t in range(x.shape[0]):
        rms_norm_row(x[t], w, eps, out[t])


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x [..., n] float32 RMS-normed over the last axis, times w [n]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    _rms_norm_rows(x.reshape(-1, x.shape[-1]), w, np.float32(eps), out.reshape(-1, x.shape[-1]))
    return out


def rope_inv_freq(n_rot: int, base: float, factors: np.ndarray | None = None) -> np.ndarray:
    """[R/2] angular speeds of NeoX RoPE; llama3 `factors` divide them (full layers only)."""
    inv = base ** (-np.arange(0, n_rot // 2, dtype=np.float64) * 2.0 / n_rot)
    if factors is not None:
        inv = inv / factors[: n_rot // 2]
    return inv


@nb.njit(fastmath=FIXED_ORDER, cache=True)
def rope_angles(pos, inv_freq, cos, sin):
    """cos, sin [R/2] float32 of the angles pos * inv_freq (float64). Decode and prefill both take
    their tables from here: numpy's cos and libm's may differ in the last bit."""
    for j in range(inv_freq.shape[0]):
        ang = np.float64(pos) * inv_freq[j]
        cos[j] = np.float32(np.cos(ang))
        sin[j] = np.float32(np.sin(ang))


@nb.njit(fastmath=FIXED_ORDER, cache=True)
def _rope_tables(pos, inv_freq, cos, sin):
    for t in range(pos.shape[0]):
        rope_angles(pos[t], inv_freq, cos[t], sin[t])


def rope_tables(pos: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [T, R/2] float32 for positions pos [T] (see rope_angles)."""
    pos = np.ascontiguousarray(pos, dtype=np.int64)
    cos = np.empty((pos.shape[0], inv_freq.shape[0]), np.float32)
    sin = np.empty_like(cos)
    _rope_tables(pos, np.ascontiguousarray(inv_freq, dtype=np.float64), cos, sin)
    return cos, sin


def rope(x: np.ndarray, pos: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """NeoX RoPE in place on x [T, N, D]: pairs (j, j + R/2) of the first R dims rotate."""
    half = inv_freq.shape[0]
    cos, sin = rope_tables(pos, inv_freq)  # [T, R/2]
    cos, sin = cos[:, None, :], sin[:, None, :]
    a = x[..., :half].copy()
    b = x[..., half : 2 * half]
    x[..., :half] = a * cos - b * sin
    x[..., half : 2 * half] = b * cos + a * sin
    return x


def sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) = inf for x < -88 gives the right 0
        return 1.0 / (1.0 + np.exp(-x))


@nb.njit(parallel=True, fastmath=FIXED_ORDER, cache=True)
def _swiglu_rows(g, u, limit, out):
    for t in nb.prange(g.shape[0]):
        swiglu_row(g[t], u[t], limit, out[t])


def swiglu(g: np.ndarray, u: np.ndarray, limit: float) -> np.ndarray:
    """silu(g) * u, clamped when limit > 1e-6 (llama.cpp's threshold): min(silu(g), L) * clip(u, -L, L).
    g/u [T, F]. Each row is quant's swiglu_row, the function a fused decode step calls."""
    g = np.ascontiguousarray(g, dtype=np.float32)
    u = np.ascontiguousarray(u, dtype=np.float32)
    out = np.empty_like(g)
    _swiglu_rows(g, u, np.float32(limit), out)
    return out


@nb.njit(parallel=True, fastmath=FIXED_ORDER, cache=True)
def _dense_matmul(x, w, out):
    n_tok = x.shape[0]
    for n in nb.prange(w.shape[0]):
        part = np.empty(4 * LANES, np.float32)
        for g in range(n_tok // 4):
            t = 4 * g
            out[t, n], out[t + 1, n], out[t + 2, n], out[t + 3, n] = dot4(w[n], x[t], x[t + 1], x[t + 2], x[t + 3], part)
        for t in range(n_tok - n_tok % 4, n_tok):
            out[t, n] = dot(w[n], x[t], part)


def dense_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [T, C] @ w [N, C].T -> [T, N] float32, every product summed by `dot` in its fixed order:
    a row's result does not depend on T (BLAS picks a different summation for one row than for
    many), and equals the fused decode kernel's router logits."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    _dense_matmul(x, np.ascontiguousarray(w, dtype=np.float32), out)
    return out


@nb.njit(fastmath=FIXED_ORDER, cache=True)
def _route(logits, bias, k, scale, normalize, ascending, ids, weights):
    e = logits.shape[1]
    s = np.empty(e, np.float32)
    choose = np.empty(e, np.float32)
    taken = np.empty(e, np.bool_)
    for t in range(logits.shape[0]):
        for i in range(e):
            s[i] = np.float32(1.0) / (np.float32(1.0) + np.exp(-logits[t, i]))
            choose[i] = s[i] + bias[i] if bias.shape[0] else s[i]
            taken[i] = False
        for j in range(k):  # the k best, the lower index first among equals (a stable sort's order)
            best = -1
            for i in range(e):
                if not taken[i] and (best < 0 or choose[i] > choose[best]):
                    best = i
            taken[best] = True
            ids[t, j] = best
        total = np.float32(0.0)
        n = 0
        for i in range(e):  # the sum in ascending expert order, whatever order ids come out in
            if taken[i]:
                total += s[i]
                if ascending:
                    ids[t, n] = i
                n += 1
        div = max(total, np.float32(6.103515625e-5)) if normalize else np.float32(1.0)
        for j in range(k):
            weights[t, j] = s[ids[t, j]] / div * scale


@nb.njit(cache=True)
def route_rows(logits, bias, k, scale, normalize, table, rows, weights):
    """One token's route (ascending ids) from logits [1, E], as a fused kernel's inputs: rows[1 + j]
    = table[j-th expert id] and weights[1 + j] = its weight; rows 0 (the shared expert's) stay."""
    ids = np.empty((1, k), np.int64)
    w = np.empty((1, k), np.float32)
    _route(logits, bias, k, scale, normalize, True, ids, w)
    for j in range(k):
        rows[1 + j] = table[ids[0, j]]
        weights[1 + j] = w[0, j]


def route(logits: np.ndarray, bias: np.ndarray | None, k: int, scale: float, normalize: bool,
          ascending: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The sigmoid router: logits [T, E] -> (expert ids [T, K], weights [T, K] float32).

    The bias only chooses: weights are the unbiased sigmoid scores of the chosen experts,
    divided by their sum when `normalize`, times `scale`. Ids come best first, or ascending.
    """
    logits = np.ascontiguousarray(logits, dtype=np.float32).reshape(-1, logits.shape[-1])
    ids, weights = np.empty((logits.shape[0], k), np.int64), np.empty((logits.shape[0], k), np.float32)
    _route(logits, no_bias(bias), k, np.float32(scale), normalize, ascending, ids, weights)
    return ids, weights


def no_bias(bias: np.ndarray | None) -> np.ndarray:
    """The router bias as the routing kernels take it: an empty array for none."""
    return _NO_BIAS if bias is None else bias


_NO_BIAS = np.zeros(0, np.float32)


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
