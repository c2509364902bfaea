"""How fast the CUDA GEMV reads its weights, against the card's own copy bandwidth.

    gemv_gbps(qtype, rows, cols)   weight bytes / time of one-token matvec (median, CUDA events)
    copy_gbps(nbytes)              a device-to-device copy's bytes read + written / time
    launch_us()                    the host's time to launch one small matvec (no waiting)
"""

from __future__ import annotations

import time

import numpy as np
from gguf import GGMLQuantizationType as T

from quant.codec import dequantize
from quant.formats import row_bytes

from . import descriptor, matvec, quantize


def _random_rows(rng, qtype, rows: int, cols: int) -> np.ndarray:
    """Valid blocks of `qtype`: random codes and scales, every fp16 scale a small finite value."""
    rb = row_bytes(qtype, cols)
    raw = rng.integers(0, 256, size=(rows, rb), dtype=np.uint8)
    block = {T.Q8_0: 34, T.Q4_K: 144, T.Q5_K: 176, T.Q6_K: 210}[T(qtype)]
    blocks = raw.reshape(rows, rb // block, block)
    d = np.array([0.01], np.float16).view(np.uint8)
    if T(qtype) == T.Q6_K:
        blocks[:, :, 208:210] = d
    else:  # d (and dmin) first
        blocks[:, :, 0:2] = d
        if T(qtype) in (T.Q4_K, T.Q5_K):
            blocks[:, :, 2:4] = d
    return raw


def _median_ms(fn, repeats: int) -> float:
    from numba import cuda

    for _ in range(3):
        fn()
    cuda.synchronize()
    times = []
    elapsed = getattr(cuda, "event_elapsed_time", None)  # numba's simulator has no event timing
    for _ in range(repeats):
        if elapsed is None:
            t0 = time.perf_counter()
            fn()
            cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - t0))
            continue
        a, b = cuda.event(), cuda.event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(elapsed(a, b))
    return float(np.median(times))


def gemv_gbps(qtype, rows: int, cols: int, repeats: int = 20) -> dict:
    """qtype: a GGMLQuantizationType, its value, or its name ("q4_k")."""
    from numba import cuda

    qtype = T[qtype.upper()] if isinstance(qtype, str) else T(qtype)
    rng = np.random.default_rng(0)
    raw = _random_rows(rng, qtype, rows, cols)
    arena = cuda.to_device(np.concatenate([raw.reshape(-1), np.zeros(-raw.size % 4, np.uint8)]))  # whole words
    desc = cuda.to_device(descriptor(0, qtype, rows, cols)[None])
    starts = cuda.to_device(np.array([0, rows], np.int64))
    x = cuda.to_device(rng.standard_normal((1, cols)).astype(np.float32))
    xq, xd = cuda.device_array((1, cols), np.int8), cuda.device_array((1, cols // 256), np.float32)
    quantize(x, xq, xd)
    out = cuda.device_array((1, rows), np.float32)
    ms = _median_ms(lambda: matvec(arena, desc, starts, xq, xd, out), repeats)
    # What was timed must be right: 512 of its rows against float64 products of the dequantized
    # rows (the kernel rounds activations to int8: a cosine near 1, not equality)
    pick = np.r_[0:min(256, rows), max(rows - 256, 256):rows]
    ref = dequantize(raw[pick], qtype, (pick.size, cols)).astype(np.float64) @ x.copy_to_host()[0].astype(np.float64)
    got = out.copy_to_host()[0][pick].astype(np.float64)
    cos = float(got @ ref / max(np.linalg.norm(got) * np.linalg.norm(ref), 1e-300))
    return {"format": T(qtype).name, "rows": rows, "cols": cols, "bytes": int(raw.nbytes),
            "seconds": ms / 1e3, "gbps": raw.nbytes / (ms / 1e3) / 1e9, "check_rows": int(pick.size),
            "check_cos": cos, "check_ok": bool(cos >= 0.999)}


def copy_gbps(nbytes: int, repeats: int = 10) -> float:
    from numba import cuda

    src = cuda.device_array(nbytes, np.uint8)
    dst = cuda.device_array(nbytes, np.uint8)
    ms = _median_ms(lambda: dst.copy_to_device(src), repeats)
    return 2 * nbytes / (ms / 1e3) / 1e9


def launch_us(repeats: int = 200) -> float:
    """Median microseconds the host spends in one call of matvec on a one-row Q4_K matrix (the
    launch; the card's work runs behind it): the floor of a decode step's host time per launch."""
    from numba import cuda

    rng = np.random.default_rng(0)
    raw = _random_rows(rng, T.Q4_K, 1, 256)
    arena = cuda.to_device(np.concatenate([raw.reshape(-1), np.zeros(-raw.size % 4, np.uint8)]))
    desc = cuda.to_device(descriptor(0, T.Q4_K, 1, 256)[None])
    starts = cuda.to_device(np.array([0, 1], np.int64))
    xq, xd = cuda.to_device(np.ones((1, 256), np.int8)), cuda.to_device(np.ones((1, 1), np.float32))
    out = cuda.device_array((1, 1), np.float32)
    times = []
    for i in range(repeats + 5):
        t0 = time.perf_counter()
        matvec(arena, desc, starts, xq, xd, out)
        if i >= 5:  # the first calls compile
            times.append(1e6 * (time.perf_counter() - t0))
        if i % 50 == 0:
            cuda.synchronize()
    cuda.synchronize()
    return float(np.median(times))
