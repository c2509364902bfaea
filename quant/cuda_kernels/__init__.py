"""CUDA kernels of the GPU tier (numba-cuda): int8 activations times Q4_K, Q5_K, Q6_K and Q8_0 rows.

    quantize(x, xq, xd)                      x float32 [T, C] -> int8 per 256 columns, exactly as
                                             quant.int8_kernels.quantize_activations (its q and d)
    matvec(arena, desc, starts, xq, xd, out)
                                             out [T, sum R] = the M matrices of desc, stacked, times
                                             every token (T = 1: decode's GEMV; T > 1: prefill's GEMM)
    swiglu_ffns(arena, desc3, weights, limits, xq, xd, out, ffn_scratch(F, W))
                                             out [H] += sum_f weights[f] * FFN_f(x) for one token, as
                                             quant.int8_kernels.swiglu_ffns
Matrices live in one uint8 device array (the arena), each given by a descriptor row
(byte offset, format, rows, cols) from `descriptor`; the kernels read the arena as 32- and
16-bit words, so every matrix starts on a multiple of 4 bytes. Results equal the CPU's int8 kernels
up to the order of float32 additions. Calls are asynchronous on `stream` and never wait
for the card: every size they launch by comes from array shapes on the host.

Importing this package imports numba.cuda; the CPU paths never import it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from gguf import GGMLQuantizationType as T

FORMATS = (T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0)
_CODES = frozenset(int(q) for q in FORMATS)


def available() -> bool:
    """Whether numba.cuda can run kernels here (a card, or numba's simulator)."""
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # no numba.cuda, no driver, a broken toolkit: all mean "no GPU"
        return False


def supports(qtype, cols: int) -> bool:
    return int(qtype) in _CODES and cols > 0 and cols % 256 == 0


def descriptor(offset: int, qtype, rows: int, cols: int) -> np.ndarray:
    """The row (byte offset, format, rows, cols) that names a matrix inside the arena."""
    if not supports(qtype, cols):
        raise ValueError(f"the CUDA kernels take {', '.join(q.name for q in FORMATS)} with a multiple of 256 "
                         f"columns, not {T(qtype).name} with {cols}")
    if offset < 0 or rows <= 0:
        raise ValueError(f"descriptor offset {offset} and rows {rows} must be >= 0 and > 0")
    if offset % 4:
        raise ValueError(f"descriptor offset {offset} is not a multiple of 4: the kernels read matrices as words")
    return np.array([offset, int(qtype), rows, cols], np.int64)


class FFNScratch(NamedTuple):
    gu: object  # float32 [F, 2, W]   gate and up rows
    hq: object  # int8 [F, W]          the SwiGLU outputs, rounded
    hd: object  # float32 [F, W / 256]


def ffn_scratch(max_ffns: int, max_width: int) -> FFNScratch:
    """Device buffers for swiglu_ffns of up to max_ffns FFNs, each at most max_width wide (rounded
    up to a multiple of 256)."""
    from numba import cuda

    w = -(-max_width // 256) * 256
    dev = cuda.device_array
    return FFNScratch(dev((max_ffns, 2, w), np.float32), dev((max_ffns, w), np.int8), dev((max_ffns, w // 256), np.float32))


def _check(name, a, ndim, dtype, shape=None):
    if a.ndim != ndim or a.dtype != np.dtype(dtype) or (shape is not None and tuple(a.shape) != tuple(shape)):
        want = f"{np.dtype(dtype).name} {list(shape) if shape is not None else f'{ndim}-D'}"
        raise ValueError(f"{name} must be {want}, got {a.dtype} {list(a.shape)}")


def _check_acts(xq, xd):
    _check("xq", xq, 2, np.int8)
    t, c = xq.shape
    if c % 256:
        raise ValueError(f"xq has {c} columns, not a multiple of 256")
    _check("xd", xd, 2, np.float32, (t, c // 256))


def _check_arena(arena):
    _check("arena", arena, 1, np.uint8)
    if arena.shape[0] % 4:
        raise ValueError(f"the arena holds {arena.shape[0]} bytes, not a multiple of 4: the kernels read it as words")


def quantize(x, xq, xd, stream=0) -> None:
    from .kernels import quantize_kernel

    _check("x", x, 2, np.float32)
    _check("xq", xq, 2, np.int8, x.shape)
    _check_acts(xq, xd)
    t, c = x.shape
    quantize_kernel[(c // 256, t), 256, stream](x, xq, xd)


def matvec(arena, desc, starts, xq, xd, out, stream=0) -> None:
    from .kernels import WARPS, grid, matvec_kernel

    _check_arena(arena)
    _check("desc", desc, 2, np.int64)
    if desc.shape[1] != 4:
        raise ValueError(f"desc must be int64 [M, 4], got {list(desc.shape)}")
    _check("starts", starts, 1, np.int64, (desc.shape[0] + 1,))
    _check_acts(xq, xd)
    _check("out", out, 2, np.float32)
    if out.shape[0] != xq.shape[0]:
        raise ValueError(f"out has {out.shape[0]} rows for {xq.shape[0]} tokens")
    rows = out.shape[1]
    matvec_kernel[grid(rows), 32 * WARPS, stream](arena, desc, starts, xq, xd, out)


def swiglu_ffns(arena, desc3, weights, limits, xq, xd, out, scratch: FFNScratch, stream=0) -> None:
    from .kernels import WARPS, grid, ffn_act_kernel, ffn_down_kernel, ffn_gate_up_kernel

    _check("desc3", desc3, 3, np.int64)
    f = desc3.shape[0]
    if desc3.shape[1:] != (3, 4):
        raise ValueError(f"desc3 must be int64 [F, 3, 4], got {list(desc3.shape)}")
    _check("weights", weights, 1, np.float32, (f,))
    _check("limits", limits, 1, np.float32, (f,))
    _check_arena(arena)
    _check_acts(xq, xd)
    if xq.shape[0] != 1:
        raise ValueError(f"swiglu_ffns takes one token, got {xq.shape[0]}")
    h = xq.shape[1]
    _check("out", out, 1, np.float32, (h,))
    if scratch.hq.shape[0] < f:
        raise ValueError(f"scratch for {scratch.hq.shape[0]} FFNs cannot take {f}")
    w = scratch.gu.shape[2]
    gu, hq, hd = (a[:f] for a in scratch)
    ffn_gate_up_kernel[grid(2 * f * w), 32 * WARPS, stream](arena, desc3, xq, xd, gu)
    ffn_act_kernel[(w // 256, f), 256, stream](desc3, limits, gu, hq, hd)
    ffn_down_kernel[grid(h), 32 * WARPS, stream](arena, desc3, hq, hd, weights, out)
