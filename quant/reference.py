"""Reference codecs in numpy: one decoder (and, where cheap, one encoder) per format.

Every function works on a whole array of blocks at once:

    blocks  uint8   [B, block_bytes]   B blocks of one format, on-disk bytes
    values  float32 [B, block_size]    the weights those blocks stand for

Decoders reproduce ``gguf.quants`` bit for bit (same float32 operations in the
same order); encoders for Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, MXFP4, TQ1_0, TQ2_0 and
BF16 do the same for its quantizers, which follow ggml's C reference. K-quant
encoders live in ``quant.kquant`` (Numba), because they search for scales; Q2_K,
Q3_K and IQ4_NL are read only (gguf-py has no quantizer for them). The IQ
formats with code-book grids are in ``quant.reference_iq``.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from .formats import IQ4_NL_VALUES, MXFP4_VALUES_X2, QK_K

F16 = np.dtype("<f2")
U16 = np.dtype("<u2")


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The little-endian f16 at byte ``start`` of every block, as float32 [B, 1]."""
    return np.ascontiguousarray(blocks[:, start:start + 2]).view(F16).astype(np.float32)


def _nibbles(qs: np.ndarray, group: int) -> np.ndarray:
    """Split bytes [B, n] into 4-bit codes: per run of ``group`` bytes, low nibbles then high ones."""
    b = qs.shape[0]
    q = qs.reshape(b, -1, 1, group) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(15)).reshape(b, -1)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C ``roundf``: nearest integer, halves away from zero (np.rint rounds them to even)."""
    r = np.rint(v)
    t = np.trunc(v)
    tie = np.abs(v - t) == np.float32(0.5)
    return np.where(tie, t + np.sign(v), r)


# ---------------------------------------------------------------- float formats

def dequant_f32(blocks):
    return blocks.view(np.float32).reshape(-1, 1)


def dequant_f16(blocks):
    return blocks.view(F16).astype(np.float32).reshape(-1, 1)


def dequant_bf16(blocks):
    return (blocks.view(np.int16).astype(np.int32) << 16).view(np.float32).reshape(-1, 1)


def quant_f32(values):
    return values.astype(np.float32).view(np.uint8).reshape(-1, 4)


def quant_f16(values):
    return values.astype(F16).view(np.uint8).reshape(-1, 2)


def quant_bf16(values):
    n = values.astype(np.float32).view(np.uint32).reshape(-1)
    # a NaN keeps its sign and becomes quiet; everything else rounds to nearest even
    nan = (n & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    n = np.where(nan, (n & np.uint32(0xFFFF0000)) | np.uint32(0x400000), n)
    top = (n.astype(np.uint64) + np.uint64(0x7FFF) + ((n >> np.uint32(16)) & np.uint32(1))) >> np.uint64(16)
    return top.astype(np.uint16).view(np.uint8).reshape(-1, 2)


# ---------------------------------------------------------------- 32-weight blocks

def dequant_q8_0(blocks):
    d = _f16(blocks, 0)
    return blocks[:, 2:].view(np.int8).astype(np.float32) * d


def quant_q8_0(values):
    d = np.abs(values).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = _round_half_away(values * inv).astype(np.int8)
    return np.concatenate([d.astype(F16).view(np.uint8), q.view(np.uint8)], axis=1)


def dequant_q4_0(blocks):
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:], 16).astype(np.int8) - np.int8(8)
    return d * q.astype(np.float32)


def quant_q4_0(values):
    # the signed value of largest magnitude maps to -8, so the grid spends its
    # asymmetric extra level on the side that needs it
    rows = np.arange(values.shape[0])
    vmax = values[rows, np.abs(values).argmax(axis=1)][:, None]
    d = vmax / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.trunc(values * inv + np.float32(8.5)).astype(np.uint8).clip(0, 15)
    qs = q[:, :16] | (q[:, 16:] << np.uint8(4))
    return np.concatenate([d.astype(F16).view(np.uint8), qs], axis=1)


def dequant_q4_1(blocks):
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    return d * _nibbles(blocks[:, 4:], 16).astype(np.float32) + m


def _fifth_bits(blocks: np.ndarray, start: int) -> np.ndarray:
    """Bit i of the little-endian u32 at byte ``start``, for i < 32, as uint8 [B, 32]."""
    qh = np.ascontiguousarray(blocks[:, start:start + 4]).view(np.dtype("<u4"))
    return ((qh >> np.arange(32, dtype=np.uint32)) & np.uint32(1)).astype(np.uint8)


def dequant_q5_0(blocks):
    d = _f16(blocks, 0)
    q = (_nibbles(blocks[:, 6:], 16) | (_fifth_bits(blocks, 2) << np.uint8(4))).astype(np.int8) - np.int8(16)
    return d * q.astype(np.float32)


def dequant_q5_1(blocks):
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 8:], 16) | (_fifth_bits(blocks, 4) << np.uint8(4))
    return d * q.astype(np.float32) + m


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Codes [B, 32] (< 16) as 16 bytes: code i in the low nibble of byte i, code i+16 in the high one."""
    return (q[:, :16] & np.uint8(15)) | (q[:, 16:] << np.uint8(4))


def _affine_codes(values: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1/Q5_1 encoding: step d = (max - min) / levels, codes trunc((x - min) / d + 0.5)."""
    vmax = values.max(axis=1, keepdims=True)
    vmin = values.min(axis=1, keepdims=True)
    d = (vmax - vmin) / np.float32(levels)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.trunc((values - vmin) * inv + np.float32(0.5)).astype(np.uint8).clip(0, levels)
    return d, vmin, q


def quant_q4_1(values):
    d, m, q = _affine_codes(values, 15)
    return np.concatenate([d.astype(F16).view(np.uint8), m.astype(F16).view(np.uint8), _pack_nibbles(q)], axis=1)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of each of 32 codes, packed little-endian into 4 bytes [B, 4]."""
    return np.packbits(q >> np.uint8(4), axis=1, bitorder="little")


def quant_q5_0(values):
    rows = np.arange(values.shape[0])
    vmax = values[rows, np.abs(values).argmax(axis=1)][:, None]  # as Q4_0: the extreme value maps to -16
    d = vmax / np.float32(-16)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.trunc(values * inv + np.float32(16.5)).astype(np.uint8).clip(0, 31)
    return np.concatenate([d.astype(F16).view(np.uint8), _high_bits(q), _pack_nibbles(q)], axis=1)


def quant_q5_1(values):
    d, m, q = _affine_codes(values, 31)
    return np.concatenate([d.astype(F16).view(np.uint8), m.astype(F16).view(np.uint8), _high_bits(q),
                           _pack_nibbles(q)], axis=1)


_IQ4_NL = np.array(IQ4_NL_VALUES, np.int8)


def dequant_iq4_nl(blocks):
    d = _f16(blocks, 0)
    return d * _IQ4_NL[_nibbles(blocks[:, 2:], 16)].astype(np.float32)


def _e8m0_half(e: np.ndarray) -> np.ndarray:
    """2^(e-128) as float32; e < 2 gives the two subnormals."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - np.uint32(1)) << np.uint32(23))
    return bits.view(np.float32)


_MXFP4 = np.array(MXFP4_VALUES_X2, np.int8)


def dequant_mxfp4(blocks):
    d = _e8m0_half(blocks[:, :1])
    return d * _MXFP4[_nibbles(blocks[:, 1:], 16)].astype(np.float32)


def quant_mxfp4(values):
    amax = np.abs(values).max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        e = np.where(amax > 0, np.floor(np.log2(amax)) - 2 + 127, 0).astype(np.uint8)
    d = _e8m0_half(e)
    err = np.abs(d[:, :, None] * _MXFP4.astype(np.float32)[None, None, :] - values[:, :, None])
    q = err.argmin(axis=2).astype(np.uint8)  # first minimum: +0 wins over -0
    qs = q[:, :16] | (q[:, 16:] << np.uint8(4))
    return np.concatenate([e, qs], axis=1)


# ---------------------------------------------------------------- 256-weight super-blocks

def k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12 scale bytes of Q4_K/Q5_K into eight 6-bit scales and eight 6-bit mins."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc, mn


def dequant_q4_k(blocks):
    b = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = k_scale_min(blocks[:, 4:16])
    q = _nibbles(blocks[:, 16:144], 32).reshape(b, 8, 32).astype(np.float32)
    scale = (d * sc.astype(np.float32)).reshape(b, 8, 1)
    offset = (dmin * mn.astype(np.float32)).reshape(b, 8, 1)
    return (scale * q - offset).reshape(b, QK_K)


def dequant_q5_k(blocks):
    b = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = k_scale_min(blocks[:, 4:16])
    qh = blocks[:, 16:48]
    low = _nibbles(blocks[:, 48:176], 32).reshape(b, 8, 32)
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & np.uint8(1)
    q = (low | (high << np.uint8(4))).astype(np.float32)
    scale = (d * sc.astype(np.float32)).reshape(b, 8, 1)
    offset = (dmin * mn.astype(np.float32)).reshape(b, 8, 1)
    return (scale * q - offset).reshape(b, QK_K)


def dequant_q6_k(blocks):
    b = blocks.shape[0]
    ql, qh = blocks[:, 0:128], blocks[:, 128:192]
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16(blocks, 208)
    low = _nibbles(ql, 64).reshape(b, 2, 4, 32)                    # [B, half, group, l]
    high = (qh.reshape(b, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)
    q = (low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)
    scale = (d * sc).reshape(b, 16, 1)
    return (scale * q.reshape(b, 16, 16).astype(np.float32)).reshape(b, QK_K)


def dequant_iq4_xs(blocks):
    b = blocks.shape[0]
    d = _f16(blocks, 0)
    sh = np.ascontiguousarray(blocks[:, 2:4]).view(U16)                       # [B, 1]
    sl = (blocks[:, 4:8, None] >> np.array([0, 4], np.uint8)).reshape(b, 8) & np.uint8(15)  # nibble j
    hi = ((sh >> (2 * np.arange(8, dtype=np.uint16))) & np.uint16(3)).astype(np.uint8)
    ls = (sl | (hi << np.uint8(4))).astype(np.int8) - np.int8(32)
    scale = (d * ls.astype(np.float32)).reshape(b, 8, 1)
    q = _IQ4_NL[_nibbles(blocks[:, 8:136], 16)].astype(np.float32).reshape(b, 8, 32)
    return (scale * q).reshape(b, QK_K)


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """2-bit codes of 64 bytes [B, 64] as [B, 256]: weight 128h + 32g + l is (qs[32h + l] >> 2g) & 3."""
    b = qs.shape[0]
    q = qs.reshape(b, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return (q & np.uint8(3)).reshape(b, QK_K)


def dequant_q2_k(blocks):
    b = blocks.shape[0]
    sc = blocks[:, 0:16]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    scale = (d * (sc & np.uint8(15)).astype(np.float32)).reshape(b, 16, 1)
    offset = (dmin * (sc >> np.uint8(4)).astype(np.float32)).reshape(b, 16, 1)
    q = _crumbs(blocks[:, 16:80]).reshape(b, 16, 16).astype(np.float32)
    return (scale * q - offset).reshape(b, QK_K)


def q3_k_scales(s: np.ndarray) -> np.ndarray:
    """The 16 signed 6-bit scales (stored + 32) of a Q3_K block's 12 scale bytes [B, 12], as int8 [B, 16]."""
    b = s.shape[0]
    lo = (s[:, None, 0:8] >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(b, 16) & np.uint8(15)
    hi = (s[:, None, 8:12] >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)).reshape(b, 16) & np.uint8(3)
    return (lo | (hi << np.uint8(4))).astype(np.int8) - np.int8(32)


def dequant_q3_k(blocks):
    b = blocks.shape[0]
    d = _f16(blocks, 108)
    scale = (d * q3_k_scales(blocks[:, 96:108]).astype(np.float32)).reshape(b, 16, 1)
    low = _crumbs(blocks[:, 32:96])
    # a clear hmask bit subtracts 4: the codes run -4..3
    high = (blocks[:, None, 0:32] >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)).reshape(b, QK_K) & np.uint8(1)
    q = low.astype(np.int8) - ((high ^ np.uint8(1)) << np.uint8(2)).astype(np.int8)
    return (scale * q.reshape(b, 16, 16).astype(np.float32)).reshape(b, QK_K)


_POW3 = np.array([1, 3, 9, 27, 81], np.uint8)


def _trits(qs: np.ndarray, digits: int) -> np.ndarray:
    """Base-3 digits of fixed-point bytes [B, n] as [B, digits * n], digit-major:
    digit k of byte q is ((q * 3^k mod 256) * 3) >> 8."""
    b = qs.shape[0]
    q = qs[:, None, :] * _POW3[:digits].reshape(1, digits, 1)  # uint8: wraps mod 256
    return ((q.astype(np.uint16) * np.uint16(3)) >> np.uint16(8)).astype(np.uint8).reshape(b, -1)


def dequant_tq1_0(blocks):
    d = _f16(blocks, 52)
    t = np.concatenate([_trits(blocks[:, 0:32], 5), _trits(blocks[:, 32:48], 5), _trits(blocks[:, 48:52], 4)], axis=1)
    return d * (t.astype(np.int8) - np.int8(1)).astype(np.float32)


def dequant_tq2_0(blocks):
    d = _f16(blocks, 64)
    return d * (_crumbs(blocks[:, 0:64]).astype(np.int8) - np.int8(1)).astype(np.float32)


def _ternary(values):
    """TQ1_0/TQ2_0 encoding: d = max |x|, codes round(x / d) + 1 in 0..2."""
    d = np.abs(values).max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    return d, (_round_half_away(values * inv).astype(np.int8) + np.int8(1)).astype(np.uint8)


def quant_tq1_0(values):
    d, q = _ternary(values)
    b = q.shape[0]

    def pack(part, digits):  # digit k of a byte weighs 3^(digits-1-k), then scaled to fixed point
        w = _POW3[:digits][::-1].astype(np.uint16).reshape(1, digits, 1)
        v = (part.reshape(b, digits, -1).astype(np.uint16) * w).sum(axis=1) * np.uint16(3 ** (5 - digits))
        return ((v * np.uint16(256) + np.uint16(242)) // np.uint16(243)).astype(np.uint8)

    qs = np.concatenate([pack(q[:, :160], 5), pack(q[:, 160:240], 5), pack(q[:, 240:], 4)], axis=1)
    return np.concatenate([qs, d.astype(F16).view(np.uint8)], axis=1)


def quant_tq2_0(values):
    d, q = _ternary(values)
    q = q.reshape(q.shape[0], 2, 4, 32) << np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    qs = (q[:, :, 0] | q[:, :, 1] | q[:, :, 2] | q[:, :, 3]).reshape(q.shape[0], 64)
    return np.concatenate([qs, d.astype(F16).view(np.uint8)], axis=1)


DEQUANT = {
    T.F32: dequant_f32, T.F16: dequant_f16, T.BF16: dequant_bf16,
    T.Q8_0: dequant_q8_0, T.Q4_0: dequant_q4_0, T.MXFP4: dequant_mxfp4,
    T.Q4_K: dequant_q4_k, T.Q5_K: dequant_q5_k, T.Q6_K: dequant_q6_k, T.IQ4_XS: dequant_iq4_xs,
    T.Q4_1: dequant_q4_1, T.Q5_0: dequant_q5_0, T.Q5_1: dequant_q5_1, T.IQ4_NL: dequant_iq4_nl,
    T.Q2_K: dequant_q2_k, T.Q3_K: dequant_q3_k, T.TQ1_0: dequant_tq1_0, T.TQ2_0: dequant_tq2_0,
}

QUANT = {
    T.F32: quant_f32, T.F16: quant_f16, T.BF16: quant_bf16,
    T.Q8_0: quant_q8_0, T.Q4_0: quant_q4_0, T.MXFP4: quant_mxfp4,
    T.Q4_1: quant_q4_1, T.Q5_0: quant_q5_0, T.Q5_1: quant_q5_1, T.TQ1_0: quant_tq1_0, T.TQ2_0: quant_tq2_0,
}
