"""GGUF rows repacked 16 at a time for the AVX-512 VNNI GEMM (quant._vnni).

Shape legend
    R  rows (a multiple of 16)     C  columns (a multiple of 256)     S = C / 256 super-blocks
    G = R / 16 row groups
    data    uint8 [R, S * 144] (Q4_K) or [R, S * 210] (Q6_K)    the GGUF rows
    packed  uint8 [G, S, BLOCK_BYTES[qtype]]                     one block per group and super-block

A block holds the same super-block of 16 consecutive rows, interleaved so that lane r of
every 64-byte vector is row r (4 bytes per lane). Byte layouts, offsets in bytes:

    Q4_K, 2368 bytes (16 rows x 148: 2.8% more than GGUF, the 6-bit scales stored as bytes)
        0     d      f16 [16]            32    dmin  f16 [16]
        64    scales u8  [8][16]         192   mins  u8  [8][16]     (sub-block j, row r)
        320   codes  [4][8] vectors of [16 rows][4 bytes]: vector (k, i) holds the GGUF bytes
              qs[32 k + 4 i : 32 k + 4 i + 4] of each row, so its low nibbles are sub-block 2 k,
              columns 4 i .. 4 i + 3, and its high nibbles sub-block 2 k + 1.
    Q6_K, 3392 bytes (16 rows x 210, the GGUF size, then 32 bytes of padding)
        0     d      f16 [16]            32    scales i8 [16][16]    (16-column group j, row r)
        288   per 32 columns p < 8, 384 bytes: four low-bit vectors (vector i's low nibbles
              are the codes of columns 32 p + 4 i .. + 3, its high nibbles those of columns
              32 p + 16 + 4 i .. + 3), then two high-bit vectors (bits 2 q, 2 q + 1 of vector u
              are the top two bits of columns 32 p + 8 q + 4 u .. + 3)
Blocks start on 64-byte boundaries (the array is allocated aligned), so no vector load
straddles two cache lines. Codes are the GGUF ones (Q6_K's offset by 32), so results equal the GGUF kernels'.
Repacking is a Numba permutation, parallel over blocks: 9.6 GB/s for Q4_K, 2.4 GB/s for
Q6_K on the 2-core test machine. The runtime does not repack (it multiplies the GGUF rows
in place, see quant._vnni); this layout is for callers that can keep a second copy.
"""

from __future__ import annotations

import hashlib
import pathlib
import sys

import numba as nb
import numpy as np
from gguf import GGMLQuantizationType as T

from . import _bits
from ._bits import k4_min, k4_scale

ROWS = 16
BLOCK_BYTES = {T.Q4_K: 2368, T.Q6_K: 3392}  # whole 64-byte lines
_GGUF_BYTES = {T.Q4_K: 144, T.Q6_K: 210}


def check(qtype, rows: int, cols: int) -> str | None:
    """Why W [rows, cols] of qtype cannot be repacked, or None if it can."""
    if qtype not in BLOCK_BYTES:
        return f"{T(qtype).name} has no 16-row layout (have: {', '.join(t.name for t in BLOCK_BYTES)})"
    if rows % ROWS or rows <= 0:
        return f"rows must be a positive multiple of {ROWS}, got {rows}"
    if cols % 256 or cols <= 0:
        return f"columns must be a positive multiple of 256, got {cols}"
    return None


def repack(qtype, data: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """data uint8 [R, S * gguf block bytes] -> packed uint8 [G, S, BLOCK_BYTES[qtype]], into out
    if given (C-contiguous, that shape; see empty()), else into a new 64-byte-aligned array."""
    qtype = T(qtype)
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2:
        raise TypeError(f"data must be uint8 [R, row bytes], got {data.dtype} {data.shape}")
    rows, row_bytes = data.shape
    gguf = _GGUF_BYTES.get(qtype)
    if gguf and row_bytes % gguf:
        raise ValueError(f"cannot repack {qtype.name}: {row_bytes} bytes per row is not a whole number "
                         f"of {gguf}-byte super-blocks")
    cols = 256 * (row_bytes // gguf) if gguf else 0
    why = check(qtype, rows, cols)
    if why:
        raise ValueError(f"cannot repack {qtype.name} [{rows} rows, {row_bytes} bytes per row]: {why}")
    shape = (rows // ROWS, cols // 256, BLOCK_BYTES[qtype])
    if out is None:
        out = empty(shape)
    elif out.dtype != np.uint8 or out.shape != shape or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous uint8 {list(shape)}, got {out.dtype} {list(out.shape)}")
    (_q4_k if qtype == T.Q4_K else _q6_k)(np.ascontiguousarray(data), out)
    return out


def empty(shape: tuple[int, ...], align: int = 64) -> np.ndarray:
    """uint8 array of shape whose first byte is align-aligned (blocks then start on cache lines)."""
    n = int(np.prod(shape))
    raw = np.empty(n + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + n].reshape(shape)


def _source_stamp() -> str:
    """Hash of the sources the kernels inline: Numba's cache watches only this file, and the
    stamp, a closure variable of each kernel, is part of its cache key (as in q8kernels)."""
    h = hashlib.sha256()
    for mod in (_bits, sys.modules[__name__]):
        h.update(pathlib.Path(mod.__file__).read_bytes())
    return h.hexdigest()


def _build(stamp: str):
    @nb.njit(parallel=True, cache=True)
    def _q4_k(data, out):
        stamp  # noqa: B018 (cache key)
        groups, nsb = out.shape[0], out.shape[1]
        for gs in nb.prange(groups * nsb):
            g = gs // nsb
            s = gs - g * nsb
            o = out[g, s]
            b = 144 * s
            for r in range(ROWS):
                w = data[ROWS * g + r]
                for k in range(2):
                    o[2 * r + k] = w[b + k]            # d
                    o[32 + 2 * r + k] = w[b + 2 + k]   # dmin
                for j in range(8):
                    o[64 + 16 * j + r] = k4_scale(w, b + 4, j)
                    o[192 + 16 * j + r] = k4_min(w, b + 4, j)
                for v in range(32):  # vector v = 8 k + i: bytes qs[4 v : 4 v + 4]
                    for e in range(4):
                        o[320 + 64 * v + 4 * r + e] = w[b + 16 + 4 * v + e]

    @nb.njit(parallel=True, cache=True)
    def _q6_k(data, out):
        stamp  # noqa: B018 (cache key)
        # GGUF column 128 h + 32 k + l (half h, quarter k, position l < 32) has its low nibble in
        # ql[64 h + 32 (k % 2) + l] (the high nibble for k >= 2) and its top bits at 2 k in
        # qh[32 h + l]. Here it lands in span p = 4 h + k, 4-column group e = l // 4, byte l % 4.
        groups, nsb = out.shape[0], out.shape[1]
        for gs in nb.prange(groups * nsb):
            g = gs // nsb
            s = gs - g * nsb
            o = out[g, s]
            o[3360:] = 0
            b = 210 * s
            for r in range(ROWS):
                w = data[ROWS * g + r]
                o[2 * r] = w[b + 208]
                o[2 * r + 1] = w[b + 209]
                for j in range(16):
                    o[32 + 16 * j + r] = w[b + 192 + j]
                for h in range(2):
                    for k in range(4):
                        base = 288 + 384 * (4 * h + k) + 4 * r
                        ql = b + 64 * h + 32 * (k & 1)
                        shift = 4 * (k >> 1)
                        for l in range(16):  # low vector l // 4: columns l (low nibble) and l + 16 (high)
                            lo0 = (w[ql + l] >> shift) & 15
                            lo1 = (w[ql + l + 16] >> shift) & 15
                            o[base + 64 * (l >> 2) + (l & 3)] = lo0 | (lo1 << 4)
                        qh = b + 128 + 32 * h
                        for u in range(2):  # high vector u: bits 2 q hold column 4 (2 q + u) + y
                            for y in range(4):
                                v = 0
                                for q in range(4):
                                    v |= ((w[qh + 8 * q + 4 * u + y] >> (2 * k)) & 3) << (2 * q)
                                o[base + 256 + 64 * u + y] = v

    return _q4_k, _q6_k


_q4_k, _q6_k = _build(_source_stamp())
