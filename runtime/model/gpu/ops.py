"""A block's small kernels on the card: norms, the residual add, the router's logits and its
top-k; and, from runtime.model.gpu.attention_ops, q/k norm + RoPE, the KV store and attention.

They mirror the CPU code (runtime.model.ops, runtime.model.attention_kernels) up to float32
summation order. Every wrapper checks shapes and dtypes (from .shape/.dtype only), names the
bad value, and launches on `stream` without copying anything to the host or waiting.

Shape legend:  T tokens  H hidden  E experts  K experts per token
    x, h, y, out float32 [T, H]   w float32 [H]   router float32 [E, H]   logits float32 [T, E]
    bias float32 [E] or [0]   ids int32 [T, K] (ascending)   weights float32 [T, K]
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import cuda
from quant.cuda_kernels.simulator import thread_safe_shared_arrays

from runtime.model.gpu.attention_ops import (NT, _arr, _block_sum, _need, _rows, attention, attention_scratch,
                                             kv_store, qk_norm_rope)

__all__ = ["rms_norm", "add_rms_norm", "add", "qk_norm_rope", "kv_store", "attention", "attention_scratch",
           "router_logits", "route"]

ROUTE_NT = 64  # threads of a routing block (a power of two): one block per token, E of a few hundred
MAX_E = 1024  # the most experts a router may have
MAX_K = 64  # the most experts per token
FLOOR = 6.103515625e-5  # ops._route's normalization floor

_f32 = numba.float32
thread_safe_shared_arrays()  # under numba's simulator, every thread gets the block's shared arrays


# ------------------------------------------------------------------ norms and adds


@cuda.jit
def _rms_norm(x, w, eps, out):
    t, tid, nt = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    red = cuda.shared.array(NT, numba.float32)
    n = x.shape[1]
    ss = _f32(0.0)
    for i in range(tid, n, nt):
        v = x[t, i]
        ss += v * v
    total = _block_sum(red, ss)
    inv = _f32(1.0) / math.sqrt(total / _f32(n) + eps)
    for i in range(tid, n, nt):
        out[t, i] = x[t, i] * inv * w[i]


@cuda.jit
def _add_rms_norm(h, y, w, eps, out):
    t, tid, nt = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    red = cuda.shared.array(NT, numba.float32)
    n = h.shape[1]
    ss = _f32(0.0)
    for i in range(tid, n, nt):
        v = h[t, i] + y[t, i]
        h[t, i] = v
        ss += v * v
    total = _block_sum(red, ss)
    inv = _f32(1.0) / math.sqrt(total / _f32(n) + eps)
    for i in range(tid, n, nt):
        out[t, i] = h[t, i] * inv * w[i]


@cuda.jit
def _add(h, y):
    t = cuda.blockIdx.y
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i < h.shape[1]:
        h[t, i] += y[t, i]


# ------------------------------------------------------------------ router


@cuda.jit
def _router_logits(x, router, out):
    """Block e: expert e's row against every token's x (the row is read once)."""
    e, tid, nt = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    red = cuda.shared.array(NT, numba.float32)
    for t in range(x.shape[0]):
        acc = _f32(0.0)
        for i in range(tid, x.shape[1], nt):
            acc += x[t, i] * router[e, i]
        total = _block_sum(red, acc)
        if tid == 0:
            out[t, e] = total


@cuda.jit
def _route(logits, bias, k, scale, normalize, ids, weights):
    """Block t: the k best of (sigmoid + bias), one block-wide argmax per pick (the lower index
    first among equals), then sorted ascending; weights are the unbiased sigmoids."""
    t, tid, nt = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    s = cuda.shared.array(MAX_E, numba.float32)
    choose = cuda.shared.array(MAX_E, numba.float32)
    taken = cuda.shared.array(MAX_E, numba.int32)
    rv = cuda.shared.array(ROUTE_NT, numba.float32)
    ri = cuda.shared.array(ROUTE_NT, numba.int32)
    picked = cuda.shared.array(MAX_K, numba.int32)
    e_count = logits.shape[1]
    has_bias = bias.shape[0] > 0
    for i in range(tid, e_count, nt):
        v = _f32(1.0) / (_f32(1.0) + math.exp(-logits[t, i]))
        s[i] = v
        choose[i] = v + bias[i] if has_bias else v
        taken[i] = 0
    cuda.syncthreads()
    for j in range(k):
        bi = -1
        bv = _f32(0.0)
        for i in range(tid, e_count, nt):  # ascending i: strictly greater keeps the lower index
            if taken[i] == 0 and (bi < 0 or choose[i] > bv):
                bi = i
                bv = choose[i]
        rv[tid] = bv
        ri[tid] = bi
        cuda.syncthreads()
        stride = nt // 2
        while stride > 0:
            if tid < stride:
                oi = ri[tid + stride]
                mi = ri[tid]
                if oi >= 0 and (mi < 0 or rv[tid + stride] > rv[tid] or (rv[tid + stride] == rv[tid] and oi < mi)):
                    rv[tid] = rv[tid + stride]
                    ri[tid] = oi
            cuda.syncthreads()
            stride //= 2
        if tid == 0:
            picked[j] = ri[0]
            taken[ri[0]] = 1
        cuda.syncthreads()
    if tid == 0:
        for a in range(1, k):  # insertion sort: ascending expert order
            v = picked[a]
            b = a - 1
            while b >= 0 and picked[b] > v:
                picked[b + 1] = picked[b]
                b -= 1
            picked[b + 1] = v
        total = _f32(0.0)
        for a in range(k):
            total += s[picked[a]]
        div = _f32(1.0)
        if normalize:
            div = total if total > _f32(FLOOR) else _f32(FLOOR)
        for a in range(k):
            ids[t, a] = picked[a]
            weights[t, a] = s[picked[a]] / div * scale


# ------------------------------------------------------------------ wrappers


def rms_norm(x, w, eps: float, out, stream=0) -> None:
    """out [T, H] = x [T, H] * w [H] / rms(x) per row (out may be x)."""
    _arr("x", x, 2, np.float32)
    _arr("w", w, 1, np.float32)
    _arr("out", out, 2, np.float32)
    _rows("out", out, x, "x")
    _need(w.shape[0] == x.shape[1], f"w has {w.shape[0]} entries, x rows have {x.shape[1]}")
    if x.shape[0]:
        _rms_norm[x.shape[0], NT, stream](x, w, _f32(eps), out)


def add_rms_norm(h, y, w, eps: float, x_out, stream=0) -> None:
    """h [T, H] += y [T, H]; x_out [T, H] = rms_norm(h) * w."""
    _arr("h", h, 2, np.float32)
    _arr("y", y, 2, np.float32)
    _arr("w", w, 1, np.float32)
    _arr("x_out", x_out, 2, np.float32)
    _rows("y", y, h, "h")
    _rows("x_out", x_out, h, "h")
    _need(w.shape[0] == h.shape[1], f"w has {w.shape[0]} entries, h rows have {h.shape[1]}")
    if h.shape[0]:
        _add_rms_norm[h.shape[0], NT, stream](h, y, w, _f32(eps), x_out)


def add(h, y, stream=0) -> None:
    """h [T, H] += y [T, H]."""
    _arr("h", h, 2, np.float32)
    _arr("y", y, 2, np.float32)
    _rows("y", y, h, "h")
    if h.shape[0] and h.shape[1]:
        _add[((h.shape[1] + 255) // 256, h.shape[0]), 256, stream](h, y)


def router_logits(x, router, out, stream=0) -> None:
    """out [T, E] = x [T, H] @ router [E, H]^T."""
    _arr("x", x, 2, np.float32)
    _arr("router", router, 2, np.float32)
    _arr("out", out, 2, np.float32)
    _need(router.shape[1] == x.shape[1], f"router rows have {router.shape[1]} values, x rows {x.shape[1]}")
    _need(tuple(out.shape) == (x.shape[0], router.shape[0]),
          f"out has shape {tuple(out.shape)}, [{x.shape[0]}, {router.shape[0]}] expected")
    if x.shape[0] and router.shape[0]:
        _router_logits[router.shape[0], NT, stream](x, router, out)


def route(logits, bias, k: int, scale: float, normalize: bool, ids, weights, stream=0) -> None:
    """The sigmoid router (as runtime.model.ops.route(..., ascending=True)): logits [T, E], bias
    [E] or [0] -> ids int32 [T, K] ascending, weights float32 [T, K]."""
    _arr("logits", logits, 2, np.float32)
    _arr("bias", bias, 1, np.float32)
    _arr("ids", ids, 2, np.int32)
    _arr("weights", weights, 2, np.float32)
    t, e = logits.shape
    _need(e <= MAX_E, f"logits have {e} experts, at most {MAX_E} supported")
    _need(0 < k <= min(e, MAX_K), f"k {k} must be in 1..{min(e, MAX_K)}")
    _need(bias.shape[0] in (0, e), f"bias has {bias.shape[0]} entries, 0 or {e} expected")
    _need(tuple(ids.shape) == (t, k), f"ids has shape {tuple(ids.shape)}, [{t}, {k}] expected")
    _need(tuple(weights.shape) == (t, k), f"weights has shape {tuple(weights.shape)}, [{t}, {k}] expected")
    if t:
        _route[t, ROUTE_NT, stream](logits, bias, int(k), _f32(scale), bool(normalize), ids, weights)
