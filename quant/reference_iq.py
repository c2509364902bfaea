"""Reference decoders in numpy for llama.cpp's code-book (IQ) formats; no encoders (gguf-py
has none, and llama.cpp needs an importance matrix for most of them).

    blocks  uint8   [B, block_bytes]   B blocks of one format, on-disk bytes
    values  float32 [B, 256]           the weights those blocks stand for

As in ``quant.reference``, every decoder reproduces ``gguf.quants`` bit for bit: the same
float32 operations in the same order (scale, then grid value, then sign). The grids and
sign patterns are ``quant.iq_grids``'. Weight 32j + 8l + k is sub-block j, group l, position k.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from .iq_grids import GRIDS, IQ1_DELTA, KSIGNS

_U16 = np.dtype("<u2")
_U32 = np.dtype("<u4")
_F16 = np.dtype("<f2")
_GRID = {q: g.astype(np.float32) for q, g in GRIDS.items()}
_BITS = np.arange(8, dtype=np.uint8)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, start:start + 2]).view(_F16).astype(np.float32).reshape(-1, 1, 1, 1)


def _signs(bits: np.ndarray) -> np.ndarray:
    """Sign bytes [...] as float32 [..., 8] of +1 / -1 (bit k set: weight k negative)."""
    return np.where((bits[..., None] >> _BITS) & np.uint8(1), np.float32(-1), np.float32(1))


def _nibble_scales(s: np.ndarray) -> np.ndarray:
    """Bytes [B, n] as their 4-bit halves [B, 2n], low nibble first, as float32."""
    return ((s[:, :, None] >> np.array([0, 4], np.uint8)) & np.uint8(15)).reshape(s.shape[0], -1).astype(np.float32)


def _packed_sign_scale(aux: np.ndarray, grid: np.ndarray, d: np.ndarray, half: np.float32) -> np.ndarray:
    """IQ2_XXS / IQ3_XXS: aux u32 [B, 8] holds four 7-bit sign indices and a 4-bit scale per
    sub-block; grid float32 [B, 8, 4, 8] the grid values of its 32 weights."""
    b = aux.shape[0]
    db = d * (np.float32(0.5) + (aux >> np.uint32(28)).astype(np.float32).reshape(b, 8, 1, 1)) * half
    idx = (aux[:, :, None] >> np.array([0, 7, 14, 21], np.uint32)) & np.uint32(127)
    return (db * grid * _signs(KSIGNS[idx])).reshape(b, 256)


def dequant_iq2_xxs(blocks):
    b = blocks.shape[0]
    q = np.ascontiguousarray(blocks[:, 2:66]).view(_U32).reshape(b, 8, 2)
    g = np.ascontiguousarray(q[:, :, 0]).view(np.uint8).reshape(b, 8, 4)
    return _packed_sign_scale(q[:, :, 1], _GRID[T.IQ2_XXS][g], _f16(blocks, 0), np.float32(0.25))


def dequant_iq2_xs(blocks):
    b = blocks.shape[0]
    qs = np.ascontiguousarray(blocks[:, 2:66]).view(_U16).reshape(b, 16, 2)  # [B, scale nibble, group]
    db = _f16(blocks, 0) * (np.float32(0.5) + _nibble_scales(blocks[:, 66:74]).reshape(b, 16, 1, 1)) * np.float32(0.25)
    grid = _GRID[T.IQ2_XS][qs & np.uint16(511)]
    return (db * grid * _signs(KSIGNS[qs >> np.uint16(9)])).reshape(b, 256)


def dequant_iq2_s(blocks):
    b = blocks.shape[0]
    qh = (blocks[:, 66:74, None] >> np.array([0, 2, 4, 6], np.uint8)) & np.uint8(3)  # [B, 8, 4]
    g = blocks[:, 2:34].astype(np.uint16) | (qh.reshape(b, 32).astype(np.uint16) << np.uint16(8))
    db = _f16(blocks, 0) * (np.float32(0.5) + _nibble_scales(blocks[:, 74:82]).reshape(b, 16, 1, 1)) * np.float32(0.25)
    grid = _GRID[T.IQ2_S][g].reshape(b, 16, 2, 8)
    return (db * grid * _signs(blocks[:, 34:66]).reshape(b, 16, 2, 8)).reshape(b, 256)


def dequant_iq3_xxs(blocks):
    b = blocks.shape[0]
    grid = _GRID[T.IQ3_XXS][blocks[:, 2:66]].reshape(b, 8, 4, 8)  # two 4-weight rows per group of 8
    aux = np.ascontiguousarray(blocks[:, 66:98]).view(_U32)
    return _packed_sign_scale(aux, grid, _f16(blocks, 0), np.float32(0.5))


def dequant_iq3_s(blocks):
    b = blocks.shape[0]
    qh = (blocks[:, 66:74, None] >> _BITS) & np.uint8(1)  # [B, 8, 8]: bit 8 of grid row 8i + e
    g = blocks[:, 2:66].astype(np.uint16) | (qh.reshape(b, 64).astype(np.uint16) << np.uint16(8))
    sc = ((blocks[:, 106:110, None] >> np.array([0, 4], np.uint8)) & np.uint8(15)).reshape(b, 8, 1, 1)
    db = _f16(blocks, 0) * (1 + 2 * sc)
    grid = _GRID[T.IQ3_S][g].reshape(b, 8, 4, 8)
    return (db * grid * _signs(blocks[:, 74:106]).reshape(b, 8, 4, 8)).reshape(b, 256)


def _delta(flag: np.ndarray) -> np.ndarray:
    return np.where(flag == 0, IQ1_DELTA, -IQ1_DELTA)


def dequant_iq1_s(blocks):
    b = blocks.shape[0]
    qh = np.ascontiguousarray(blocks[:, 34:50]).view(_U16)  # [B, 8]
    dl = _f16(blocks, 0).reshape(b, 1) * (2 * ((qh >> np.uint16(12)) & np.uint16(7)) + 1)
    hi = (qh[:, :, None] >> np.array([0, 3, 6, 9], np.uint16)) & np.uint16(7)
    g = blocks[:, 2:34].astype(np.uint16) | (hi.reshape(b, 32) << np.uint16(8))
    grid = _GRID[T.IQ1_S][g].reshape(b, 8, 4, 8)
    delta = _delta(qh & np.uint16(0x8000)).reshape(b, 8, 1, 1)
    return (dl.reshape(b, 8, 1, 1) * (grid + delta)).reshape(b, 256)


def dequant_iq1_m(blocks):
    b = blocks.shape[0]
    sc = np.ascontiguousarray(blocks[:, 48:56]).view(_U16)  # [B, 4]
    top = (sc & np.uint16(0xF000)) >> np.array([12, 8, 4, 0], np.uint16)
    d = (top[:, 0] | top[:, 1] | top[:, 2] | top[:, 3]).view(_F16).astype(np.float32).reshape(b, 1)
    s = ((sc[:, :, None] >> np.array([0, 3, 6, 9], np.uint16)) & np.uint16(7)).reshape(b, 16)
    dl = (d * (2 * s + 1)).reshape(b, 8, 2, 1, 1)
    h = (blocks[:, 32:48, None] >> np.array([0, 4], np.uint8)).reshape(b, 32)  # group 4j + l
    g = blocks[:, 0:32].astype(np.uint16) | ((h & np.uint8(7)).astype(np.uint16) << np.uint16(8))
    grid = _GRID[T.IQ1_M][g].reshape(b, 8, 2, 2, 8)
    delta = _delta(h & np.uint8(8)).reshape(b, 8, 2, 2, 1)
    return (dl * (grid + delta)).reshape(b, 256)


DEQUANT = {
    T.IQ2_XXS: dequant_iq2_xxs, T.IQ2_XS: dequant_iq2_xs, T.IQ2_S: dequant_iq2_s,
    T.IQ3_XXS: dequant_iq3_xxs, T.IQ3_S: dequant_iq3_s, T.IQ1_S: dequant_iq1_s, T.IQ1_M: dequant_iq1_m,
}
