"""The attention side of a block on the card: q/k norm + RoPE, the KV store, attention over the
cache; and the block reductions and argument checks runtime.model.gpu.ops shares (which
re-exports this module's public functions).

They mirror runtime.model.attention_kernels up to float32 summation order. Every wrapper checks
shapes and dtypes (from .shape/.dtype only), names the bad value, and launches on `stream`
without copying anything to the host or waiting.

Attention splits the cache like flash-decoding: a block per (token, head, SPLIT slots) scores
its slots (keys through shared memory in tiles, tiles with no visible slot skipped), and writes
its max, its sum of exponentials and its unnormalized output to `scratch`; a second launch per
(token, head) merges the splits and scales by sigmoid(gate) / sum.

Shape legend:  T tokens  Nh query heads  Nk KV heads  D head dim  S cache slots  R/2 RoPE frequencies
               P = (Nh + 2 Nk) D + Nh projections: q [Nh*D] | k [Nk*D] | v [Nk*D] | gate [Nh]
    proj float32 [T, P]   k_cache, v_cache float32 [S, Nk, D]   kv_pos int64 [S] (-1: empty)
    pos, qpos int64 [T]   slots int64 [T]   scratch float32 [>= T, >= Nh, >= ceil(S / SPLIT) (D + 2)]
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import cuda
from quant.cuda_kernels.simulator import thread_safe_shared_arrays

NT = 128  # threads of a row-reduction block (a power of two)
SPLIT = 256  # slots of an attention block, and its threads (a power of two)
TILE = 32  # key slots loaded into shared memory at once (divides SPLIT)
MAX_D = 256  # the largest head dim (at most SPLIT)
TILE_FLOATS = TILE * (MAX_D + 1)  # a key tile in shared memory, rows padded: no bank conflicts

_f32 = numba.float32
thread_safe_shared_arrays()  # under numba's simulator, every thread gets the block's shared arrays


# ------------------------------------------------------------------ block reductions


@cuda.jit(device=True)
def _block_sum(buf, v):
    """The sum over the block of each thread's v (buf: shared [blockDim.x]); every thread gets it."""
    tid = cuda.threadIdx.x
    buf[tid] = v
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if tid < stride:
            buf[tid] += buf[tid + stride]
        cuda.syncthreads()
        stride //= 2
    r = buf[0]
    cuda.syncthreads()
    return r


@cuda.jit(device=True)
def _block_max(buf, v):
    tid = cuda.threadIdx.x
    buf[tid] = v
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if tid < stride:
            if buf[tid + stride] > buf[tid]:
                buf[tid] = buf[tid + stride]
        cuda.syncthreads()
        stride //= 2
    r = buf[0]
    cuda.syncthreads()
    return r


# ------------------------------------------------------------------ q/k norm, RoPE, KV store


@cuda.jit
def _qk_norm_rope(proj, n_head, d, q_norm, k_norm, eps, inv_freq, pos):
    """Block (t, head): head < Nh is q head `head`, else k head head - Nh (they lie back to back)."""
    t, hh, tid, nt = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x, cuda.blockDim.x
    buf = cuda.shared.array(MAX_D, numba.float32)
    red = cuda.shared.array(NT, numba.float32)
    base = hh * d
    ss = _f32(0.0)
    for i in range(tid, d, nt):
        v = proj[t, base + i]
        buf[i] = v
        ss += v * v
    total = _block_sum(red, ss)  # its syncs also publish buf
    inv = _f32(1.0) / math.sqrt(total / _f32(d) + eps)
    for i in range(tid, d, nt):
        wi = q_norm[i] if hh < n_head else k_norm[i]
        buf[i] = buf[i] * inv * wi
    cuda.syncthreads()
    half = inv_freq.shape[0]
    p = numba.float64(pos[t])
    for i in range(tid, d, nt):
        if i < 2 * half:
            j = i if i < half else i - half
            ang = p * inv_freq[j]
            c = _f32(math.cos(ang))
            s = _f32(math.sin(ang))
            if i < half:
                proj[t, base + i] = buf[i] * c - buf[i + half] * s
            else:
                proj[t, base + i] = buf[i] * c + buf[j] * s
        else:
            proj[t, base + i] = buf[i]


@cuda.jit
def _kv_store(proj, n_head, n_kv, d, k_cache, v_cache, kv_pos, slots, pos):
    t, j, tid, nt = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x, cuda.blockDim.x
    slot = slots[t]
    kb = (n_head + j) * d
    vb = (n_head + n_kv + j) * d
    for i in range(tid, d, nt):
        k_cache[slot, j, i] = proj[t, kb + i]
        v_cache[slot, j, i] = proj[t, vb + i]
    if j == 0 and tid == 0:
        kv_pos[slot] = pos[t]


# ------------------------------------------------------------------ attention


@cuda.jit
def _attention_split(proj, n_head, n_kv, d, scale, k_cache, v_cache, kv_pos, n_slots, qpos, window, scratch):
    """Block (t * Nh + h, split): the SPLIT slots from split * SPLIT. Keys come in tiles of TILE
    slots through shared memory (coalesced loads; tiles with no visible slot are skipped), each
    dot split over D among SPLIT / TILE threads; then the split's max m, sum l of exp(score - m)
    and unnormalized output o [D] go to scratch[t, h, split * (D + 2):] as m | l | o."""
    b, sp, tid, nt = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x, cuda.blockDim.x
    t = b // n_head
    h = b - t * n_head
    j = h // (n_head // n_kv)
    qs = cuda.shared.array(MAX_D, numba.float32)
    tile = cuda.shared.array(TILE_FLOATS, numba.float32)
    part = cuda.shared.array(SPLIT, numba.float32)
    sc = cuda.shared.array(SPLIT, numba.float32)
    vis = cuda.shared.array(SPLIT, numba.int32)
    red = cuda.shared.array(SPLIT, numba.float32)
    for i in range(tid, d, nt):
        qs[i] = proj[t, h * d + i]
    qp = qpos[t]
    lo = qp - window if window > 0 else -1  # visible: lo < kpos <= qp
    ninf = _f32(-math.inf)
    s0 = sp * SPLIT
    seen = 0
    if s0 + tid < n_slots:
        p = kv_pos[s0 + tid]
        if p >= 0 and p <= qp and p > lo:
            seen = 1
    vis[tid] = seen
    sc[tid] = ninf
    cuda.syncthreads()
    per = nt // TILE  # threads per slot's dot
    row = tid % TILE
    plen = (d + per - 1) // per
    i0 = (tid // TILE) * plen
    i1 = i0 + plen if i0 + plen < d else d
    for tl in range(SPLIT // TILE):
        base = s0 + tl * TILE
        if base >= n_slots:
            break
        any_seen = 0
        for r in range(TILE):
            any_seen |= vis[tl * TILE + r]
        if any_seen == 0:
            continue
        for idx in range(tid, TILE * d, nt):
            r = idx // d
            c = idx - r * d
            val = _f32(0.0)
            if base + r < n_slots:
                val = k_cache[base + r, j, c]
            tile[r * (d + 1) + c] = val
        cuda.syncthreads()
        acc = _f32(0.0)
        for i in range(i0, i1):
            acc += qs[i] * tile[row * (d + 1) + i]
        part[tid] = acc
        cuda.syncthreads()
        if tid < TILE and vis[tl * TILE + tid] != 0:
            tot = _f32(0.0)
            for pc in range(per):
                tot += part[pc * TILE + tid]
            sc[tl * TILE + tid] = tot * scale
        cuda.syncthreads()
    mine = sc[tid]
    m = _block_max(red, mine)
    e = _f32(0.0)
    if mine > ninf:
        e = math.exp(mine - m)
    sc[tid] = e
    total = _block_sum(red, e)  # its syncs also publish sc
    groups = nt // d
    grp = tid // d
    d0 = tid - grp * d
    vacc = _f32(0.0)
    if grp < groups:
        for r in range(grp, SPLIT, groups):
            if s0 + r >= n_slots:
                break
            w = sc[r]
            if w > _f32(0.0):
                vacc += w * v_cache[s0 + r, j, d0]
    red[tid] = vacc
    cuda.syncthreads()
    rec = sp * (d + 2)
    if tid < d:
        o = _f32(0.0)
        for gi in range(groups):
            o += red[gi * d + tid]
        scratch[t, h, rec + 2 + tid] = o
    if tid == 0:
        scratch[t, h, rec] = m
        scratch[t, h, rec + 1] = total


@cuda.jit
def _attention_combine(proj, n_head, n_kv, d, n_split, out, scratch):
    """Block t * Nh + h: the splits' records merged (rescaled to the common max), times
    sigmoid(gate) / sum."""
    b, tid, nt = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    t = b // n_head
    h = b - t * n_head
    ninf = _f32(-math.inf)
    top = ninf
    for sp in range(n_split):
        m = scratch[t, h, sp * (d + 2)]
        if m > top:
            top = m
    total = _f32(0.0)
    for sp in range(n_split):
        m = scratch[t, h, sp * (d + 2)]
        if m > ninf:
            total += scratch[t, h, sp * (d + 2) + 1] * math.exp(m - top)
    g = _f32(1.0) / (_f32(1.0) + math.exp(-proj[t, (n_head + 2 * n_kv) * d + h]))
    f = g / total if total > _f32(0.0) else _f32(0.0)
    for i in range(tid, d, nt):
        acc = _f32(0.0)
        for sp in range(n_split):
            m = scratch[t, h, sp * (d + 2)]
            if m > ninf:
                acc += scratch[t, h, sp * (d + 2) + 2 + i] * math.exp(m - top)
        out[t, h * d + i] = acc * f


# ------------------------------------------------------------------ wrappers


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def _arr(name: str, a, ndim: int, dtype) -> None:
    _need(len(a.shape) == ndim, f"{name} must have {ndim} dims, got shape {tuple(a.shape)}")
    _need(np.dtype(a.dtype) == np.dtype(dtype), f"{name} must be {np.dtype(dtype).name}, got {np.dtype(a.dtype).name}")


def _rows(name: str, a, like, what: str) -> None:
    _need(tuple(a.shape) == tuple(like.shape), f"{name} has shape {tuple(a.shape)}, {what} has {tuple(like.shape)}")


def _proj(proj, n_head: int, n_kv: int, head_dim: int) -> None:
    _arr("proj", proj, 2, np.float32)
    _need(n_head > 0 and n_kv > 0 and n_head % n_kv == 0, f"n_head {n_head} must be a multiple of n_kv {n_kv}")
    _need(0 < head_dim <= MAX_D, f"head_dim {head_dim} must be in 1..{MAX_D}")
    p = (n_head + 2 * n_kv) * head_dim + n_head
    _need(proj.shape[1] == p, f"proj rows hold {proj.shape[1]} values, (Nh + 2 Nk) D + Nh = {p}")


def qk_norm_rope(proj, n_head: int, n_kv: int, head_dim: int, q_norm, k_norm, eps: float, inv_freq, pos,
                 stream=0) -> None:
    """In place on proj's q and k: per-head RMS norm (q_norm, k_norm [D]), then NeoX RoPE on the
    first 2 len(inv_freq) dims at positions pos [T] (angles in float64, cos/sin cast to float32)."""
    _proj(proj, n_head, n_kv, head_dim)
    _arr("q_norm", q_norm, 1, np.float32)
    _arr("k_norm", k_norm, 1, np.float32)
    _arr("inv_freq", inv_freq, 1, np.float64)
    _arr("pos", pos, 1, np.int64)
    _need(q_norm.shape[0] == head_dim, f"q_norm has {q_norm.shape[0]} entries, head_dim is {head_dim}")
    _need(k_norm.shape[0] == head_dim, f"k_norm has {k_norm.shape[0]} entries, head_dim is {head_dim}")
    _need(2 * inv_freq.shape[0] <= head_dim, f"inv_freq has {inv_freq.shape[0]} entries, more than head_dim / 2")
    _need(pos.shape[0] == proj.shape[0], f"pos has {pos.shape[0]} entries, proj has {proj.shape[0]} rows")
    if proj.shape[0]:
        _qk_norm_rope[(proj.shape[0], n_head + n_kv), NT, stream](proj, n_head, head_dim, q_norm, k_norm, _f32(eps),
                                                                  inv_freq, pos)


def _cache(k_cache, v_cache, kv_pos, n_kv: int, head_dim: int) -> None:
    _arr("k_cache", k_cache, 3, np.float32)
    _arr("v_cache", v_cache, 3, np.float32)
    _arr("kv_pos", kv_pos, 1, np.int64)
    _rows("v_cache", v_cache, k_cache, "k_cache")
    _need(tuple(k_cache.shape[1:]) == (n_kv, head_dim),
          f"k_cache has shape {tuple(k_cache.shape)}, [S, {n_kv}, {head_dim}] expected")
    _need(kv_pos.shape[0] == k_cache.shape[0], f"kv_pos has {kv_pos.shape[0]} slots, k_cache {k_cache.shape[0]}")


def kv_store(proj, n_head: int, n_kv: int, head_dim: int, k_cache, v_cache, kv_pos, slots, pos, stream=0) -> None:
    """k_cache/v_cache [slots[t]] = token t's k and v; kv_pos[slots[t]] = pos[t]."""
    _proj(proj, n_head, n_kv, head_dim)
    _cache(k_cache, v_cache, kv_pos, n_kv, head_dim)
    _arr("slots", slots, 1, np.int64)
    _arr("pos", pos, 1, np.int64)
    _need(slots.shape[0] == proj.shape[0], f"slots has {slots.shape[0]} entries, proj has {proj.shape[0]} rows")
    _need(pos.shape[0] == proj.shape[0], f"pos has {pos.shape[0]} entries, proj has {proj.shape[0]} rows")
    if proj.shape[0]:
        _kv_store[(proj.shape[0], n_kv), NT, stream](proj, n_head, n_kv, head_dim, k_cache, v_cache, kv_pos, slots, pos)


def _splits(n_slots: int) -> int:
    return max(1, -(-n_slots // SPLIT))


def attention_scratch(max_tokens: int, n_head: int, max_slots: int):
    """Scratch for `attention`: float32 [max_tokens, n_head, splits * (MAX_D + 2)] on the card,
    one record (max, sum, output [D]) per SPLIT slots."""
    return cuda.device_array((max_tokens, n_head, _splits(max_slots) * (MAX_D + 2)), np.float32)


def attention(proj, n_head: int, n_kv: int, head_dim: int, k_cache, v_cache, kv_pos, n_slots: int, qpos,
              window: int, out, scratch, stream=0) -> None:
    """out [T, Nh*D] = softmax(q . k / sqrt(D)) @ v over slots 0..n_slots-1 visible from qpos [T]
    (0 <= kpos <= qpos, and kpos > qpos - window when window > 0), times sigmoid(gate).
    Two launches: each SPLIT slots of each (token, head) in parallel, then their merge."""
    _proj(proj, n_head, n_kv, head_dim)
    _cache(k_cache, v_cache, kv_pos, n_kv, head_dim)
    _arr("qpos", qpos, 1, np.int64)
    _arr("out", out, 2, np.float32)
    _arr("scratch", scratch, 3, np.float32)
    t = proj.shape[0]
    n_split = _splits(n_slots)
    _need(qpos.shape[0] == t, f"qpos has {qpos.shape[0]} entries, proj has {t} rows")
    _need(tuple(out.shape) == (t, n_head * head_dim), f"out has shape {tuple(out.shape)}, [{t}, {n_head * head_dim}] expected")
    _need(0 <= n_slots <= k_cache.shape[0], f"n_slots {n_slots} is outside 0..{k_cache.shape[0]} (the cache's slots)")
    _need(scratch.shape[0] >= t and scratch.shape[1] >= n_head and scratch.shape[2] >= n_split * (head_dim + 2),
          f"scratch has shape {tuple(scratch.shape)}, at least [{t}, {n_head}, {n_split * (head_dim + 2)}] needed")
    if t:
        scale = _f32(1.0 / np.sqrt(head_dim))
        _attention_split[(t * n_head, n_split), SPLIT, stream](proj, n_head, n_kv, head_dim, scale, k_cache, v_cache,
                                                               kv_pos, int(n_slots), qpos, int(window), scratch)
        _attention_combine[t * n_head, NT, stream](proj, n_head, n_kv, head_dim, n_split, out, scratch)
