"""The CUDA kernels: activation quantization, the quantized GEMV/GEMM, the fused SwiGLU sum.

Matrices live in one uint8 arena and are given by descriptor rows (byte offset, format,
rows, cols). Every product is one warp per output row; its lanes walk the row's
super-blocks with word loads (quant.cuda_kernels.rows), one token after another.

Shape legend
    desc  int64 [M, 4]   starts int64 [M + 1] (prefix sums of rows)   out float32 [T, rows]
    desc3 int64 [F, 3, 4] (gate, up, down)   gu float32 [F, 2, W]   hq int8 [F, W]
    hd float32 [F, W / 256]   out float32 [H]   (W: the widest FFN)
    w     uint8 [bytes], bytes a multiple of 4 (read as words in the kernels)
"""

from __future__ import annotations

import math

import numba
from numba import cuda

import numpy as np

from .rows import F32, I32, SIMULATED, bytes_per_256, device, row_dot
from .simulator import thread_safe_shared_arrays

thread_safe_shared_arrays()  # under numba's simulator, every thread gets the block's array

FLT_MAX = 3.4028234663852886e38  # the largest finite float32
# Kernels spell out min, max and abs: this numba-cuda rejects the builtins on float32 in kernels.


# Warps per block of the row kernels: 4 on a card (rows walked by warps, shuffles to reduce);
# 1 under numba's simulator, which has no shuffles and reduces through shared memory.
WARPS = 1 if SIMULATED else 4


def grid(rows: int) -> int:
    """Blocks for a grid-stride row kernel: a warp per row on a card; under numba's simulator,
    where each block costs about 0.1 s of thread set-up and barriers, a few blocks walk all rows."""
    return max(1, min(rows, 2)) if SIMULATED else max(1, -(-rows // WARPS))


@device
def _warp_sum_shfl(red, v):
    """The sum of v over the 32 lanes of a warp, in every lane (butterfly of shuffles)."""
    for off in (16, 8, 4, 2, 1):
        v += cuda.shfl_xor_sync(0xFFFFFFFF, v, off)
    return v


@device
def _warp_sum_shared(red, v):
    """The same for a block of exactly one warp, through shared memory red [32]: the simulator's
    way. (Here, not in rows: under the simulator only a kernel's own module sees its `cuda`.)"""
    l = cuda.threadIdx.x
    red[l] = v
    cuda.syncthreads()
    step = 16
    while step > 0:
        if l < step:
            red[l] += red[l + step]
        cuda.syncthreads()
        step //= 2
    r = red[0]
    cuda.syncthreads()
    return r


warp_sum = _warp_sum_shared if SIMULATED else _warp_sum_shfl


@device
def _finite(v):
    """False for Inf and NaN (every comparison with NaN is false)."""
    return v <= FLT_MAX and v >= -FLT_MAX


@cuda.jit
def quantize_kernel(x, xq, xd):
    """Block (t, s): the 256 columns of super-block s of token t; thread l one column."""
    t, s = cuda.blockIdx.y, cuda.blockIdx.x
    l = cuda.threadIdx.x
    buf = cuda.shared.array(256, numba.float32)
    v = x[t, 256 * s + l]
    bad = cuda.syncthreads_or(I32(0) if _finite(v) else I32(1))  # Inf or NaN in the block: a NaN scale (as the CPU)
    buf[l] = v if v >= F32(0.0) else -v
    cuda.syncthreads()
    step = 128
    while step > 0:
        if l < step:
            if buf[l + step] > buf[l]:
                buf[l] = buf[l + step]
        cuda.syncthreads()
        step //= 2
    amax = buf[0]
    cuda.syncthreads()
    inv = F32(127.0) / amax if amax > F32(0.0) and not bad else F32(0.0)
    if l == 0:
        xd[t, s] = F32(math.nan) if bad else amax / F32(127.0)
    y = v * inv if _finite(v) else F32(0.0)
    r = math.floor(y + F32(0.5))  # round half to even, as np.rint
    if r - y == F32(0.5) and (I32(r) & 1) == 1:
        r -= F32(1.0)
    xq[t, 256 * s + l] = I32(r)


@cuda.jit
def matvec_kernel(w, desc, starts, xq, xd, out):
    """Warps walk the global rows g of the stacked matrices (grid-stride), each row times every
    token of xq in turn (a row's bytes stay in L1 between tokens)."""
    w32, w16, wh = w.view(np.uint32), w.view(np.uint16), w.view(np.float16)
    x32, x16 = xq.view(np.int32), xq.view(np.int16)
    lane = cuda.threadIdx.x % 32
    first = cuda.blockIdx.x * WARPS + cuda.threadIdx.x // 32
    red = cuda.shared.array(32, numba.float32)
    m_count = desc.shape[0]
    for g in range(first, starts[m_count], cuda.gridDim.x * WARPS):  # the same g for the whole warp
        m = 0
        while starts[m + 1] <= g:
            m += 1
        qt, cols = desc[m, 1], desc[m, 3]
        nsb = cols // 256
        base = desc[m, 0] + (g - starts[m]) * nsb * bytes_per_256(qt)
        for t in range(xq.shape[0]):
            v = warp_sum(red, row_dot(w, w32, w16, wh, base, qt, nsb, lane, x32, x16, xd, t))
            if lane == 0:
                out[t, g] = v


@cuda.jit
def ffn_gate_up_kernel(w, desc3, xq, xd, gu):
    """Row g = (2 f + which) W + r: row r of the gate (which = 0) or up (1) matrix of FFN f."""
    w32, w16, wh = w.view(np.uint32), w.view(np.uint16), w.view(np.float16)
    x32, x16 = xq.view(np.int32), xq.view(np.int16)
    lane = cuda.threadIdx.x % 32
    first = cuda.blockIdx.x * WARPS + cuda.threadIdx.x // 32
    red = cuda.shared.array(32, numba.float32)
    width = gu.shape[2]
    for g in range(first, desc3.shape[0] * 2 * width, cuda.gridDim.x * WARPS):
        f = g // (2 * width)
        which = (g // width) % 2
        r = g % width
        if r < desc3[f, which, 2]:
            qt, cols = desc3[f, which, 1], desc3[f, which, 3]
            nsb = cols // 256
            v = warp_sum(red, row_dot(w, w32, w16, wh, desc3[f, which, 0] + r * nsb * bytes_per_256(qt), qt, nsb, lane,
                                      x32, x16, xd, 0))
            if lane == 0:
                gu[f, which, r] = v


@cuda.jit
def ffn_act_kernel(desc3, limits, gu, hq, hd):
    """Block (f, s): SwiGLU of columns 256 s.. of FFN f, then their int8 rounding (as quantize)."""
    f, s = cuda.blockIdx.y, cuda.blockIdx.x
    if 256 * s >= desc3[f, 0, 2]:
        return
    l = cuda.threadIdx.x
    c = 256 * s + l
    gv, uv = gu[f, 0, c], gu[f, 1, c]
    finite = _finite(gv) and _finite(uv)
    a = gv / (F32(1.0) + math.exp(-gv)) if finite else F32(0.0)
    lim = limits[f]
    if lim > F32(1e-6):
        a = lim if a > lim else a
        uv = lim if uv > lim else (-lim if uv < -lim else uv)
    v = a * uv if finite else F32(0.0)  # the SwiGLU of Inf or NaN is NaN (as the CPU): the block's scale
    bad = cuda.syncthreads_or(I32(0) if finite else I32(1))
    buf = cuda.shared.array(256, numba.float32)
    buf[l] = v if v >= F32(0.0) else -v
    cuda.syncthreads()
    step = 128
    while step > 0:
        if l < step:
            if buf[l + step] > buf[l]:
                buf[l] = buf[l + step]
        cuda.syncthreads()
        step //= 2
    amax = buf[0]
    inv = F32(127.0) / amax if amax > F32(0.0) else F32(0.0)
    if l == 0:
        hd[f, s] = F32(math.nan) if bad else amax / F32(127.0)
    y = v * inv
    r = math.floor(y + F32(0.5))
    if r - y == F32(0.5) and (I32(r) & 1) == 1:
        r -= F32(1.0)
    hq[f, c] = I32(r)


@cuda.jit
def ffn_down_kernel(w, desc3, hq, hd, weights, out):
    """out[r] += the sum over FFNs f, in entry order, of weights[f] times row r of f's down matrix
    times f's rounded hidden vector: a warp per row r."""
    w32, w16, wh = w.view(np.uint32), w.view(np.uint16), w.view(np.float16)
    h32, h16 = hq.view(np.int32), hq.view(np.int16)
    lane = cuda.threadIdx.x % 32
    first = cuda.blockIdx.x * WARPS + cuda.threadIdx.x // 32
    red = cuda.shared.array(32, numba.float32)
    for r in range(first, out.shape[0], cuda.gridDim.x * WARPS):
        acc = F32(0.0)
        for f in range(desc3.shape[0]):
            qt, cols = desc3[f, 2, 1], desc3[f, 2, 3]
            nsb = cols // 256
            v = warp_sum(red, row_dot(w, w32, w16, wh, desc3[f, 2, 0] + r * nsb * bytes_per_256(qt), qt, nsb, lane,
                                      h32, h16, hd, f))
            acc += weights[f] * v
        if lane == 0:
            out[r] += acc
