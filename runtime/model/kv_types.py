"""The KV cache's element types: how a head's key or value row is stored, and read back in place.

    f32   float32 [C, Nk, D]
    f16   IEEE half, as its uint16 bits [C, Nk, D] (Numba has no float16 on the CPU)
    q8_0  int8 [C, Nk, D] and the f16 bits of one scale per 32 elements [C, Nk, D/32]:
          llama.cpp's block_q8_0 (d = max|x| / 127, q = round(x / d), x ~ q d), its two
          fields kept in two arrays so that each stays a plain strided array

Every type is a pair (data, scale); scale has zero width for f32 and f16, so the cache's
bookkeeping (ring slots, undo copies, growth, checkpoints) moves both alike, whatever the type.

The attention kernels read the stored form directly: `key_dot` and `add_value` widen each
element to float32 inside their loops (a decode step reads 2 or 1.06 bytes per element instead
of 4, and no float32 copy of the cache is made). They are inlined into the fixed-order
attention kernels and sum in `dot`'s order. `store_row` writes one row and is compiled on its
own, without fast-math, and called: prefill's append (`store`) and the decode kernels then
round a value to the same bits, which are numpy's float16 cast and llama.cpp's
quantize_row_q8_0_ref (roundf: halves away from zero; the scale rounded to f16 after x / d).

Shape legend:  C slots  Nk KV heads  D head dim  T rows stored at once
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload
from numba.np.numpy_support import from_dtype
from quant.bits import f16_to_f32, f32_from_bits
from quant.int8_kernels.avx2 import f16_fast
from quant.jit import ALWAYS_INLINED, compiles_for

from runtime.base.errors import StepstreamError
from runtime.base.options import KV_BLOCK, check_kv_type
from runtime.model.ops import LANES, dot, dot4

QK = 32  # q8_0's block: elements per scale
DTYPES = {"f32": np.float32, "f16": np.uint16, "q8_0": np.int8}  # the data array's dtype: the type's tag
_SCALE = np.uint16  # q8_0's f16 scale bits
SCALE = _SCALE  # (the dtype a state holds for any cache's scales)


def check_head_dim(kind: str, head_dim: int, what: str = "the model") -> None:
    """A StepstreamError unless rows of head_dim elements split into the type's blocks."""
    check_kv_type(kind)
    if head_dim % KV_BLOCK[kind]:
        raise StepstreamError(f"cache type {kind} needs a head dim that is a multiple of {KV_BLOCK[kind]}; "
                              f"{what} has head dim {head_dim}: use f16 or f32")


def allocate(kind: str, capacity: int, n_kv: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(data [C, Nk, D], scale [C, Nk, D/32 or 0]) of `kind`, zeroed."""
    check_head_dim(kind, head_dim)
    width = head_dim // QK if kind == "q8_0" else 0
    return (np.zeros((capacity, n_kv, head_dim), DTYPES[kind]),
            np.zeros((capacity, n_kv, width), _SCALE))


def kind_of(data: np.ndarray) -> str:
    for kind, dt in DTYPES.items():
        if data.dtype == dt:
            return kind
    raise StepstreamError(f"a KV cache array of dtype {data.dtype} is none of {', '.join(DTYPES)}")


# ---------------------------------------------------------------- f16 and q8_0 rounding

@intrinsic
def f32_bits(typingctx, x):
    """The bit pattern of float32 x, as a uint32."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(x), codegen


# The stored halves are widened with quant.bits' integer decoder: measured faster here than
# F16C's vcvtph2ps through LLVM's fpext (0.91 against 1.31 times the float32 loops' time), one
# slot at a time. The four-slot loops (key_dot4, add_values4) widen by fpext where the host
# has F16C: decode_attention, 12 heads over 130 f16 slots, 43-45 -> 35-36 us. Both give the
# same float for every finite or infinite half.
half = f16_to_f32
widen4 = f16_fast if compiles_for("f16c") else f16_to_f32

_DENORM_MAGIC = np.uint32(((127 - 15) + (23 - 10) + 1) << 23)


@nb.njit(inline="always", cache=True)
def f32_to_f16(x):
    """float32 x as IEEE half bits, rounded to nearest, ties to even (numpy's astype(float16)):
    overflow to inf, subnormal halves, NaN as the quiet 0x7e00 with x's sign."""
    u = f32_bits(np.float32(x))
    sign = (u >> np.uint32(16)) & np.uint32(0x8000)
    u = u & np.uint32(0x7FFFFFFF)
    if u >= np.uint32(0x47800000):  # >= 65536 (rounds to inf), inf or NaN
        o = np.uint32(0x7E00) if u > np.uint32(0x7F800000) else np.uint32(0x7C00)
    elif u < np.uint32(0x38800000):  # below the smallest normal half: the FPU rounds the add
        o = f32_bits(f32_from_bits(u) + f32_from_bits(_DENORM_MAGIC)) - _DENORM_MAGIC
    else:
        odd = (u >> np.uint32(13)) & np.uint32(1)
        o = (u + np.uint32(0xC8000FFF) + odd) >> np.uint32(13)  # rebias 127 -> 15, round to even
    return np.uint16(o | sign)


@nb.njit(inline="always", cache=True)
def _round_away(v):
    """roundf(v): to the nearest integer, halves away from zero (exact in float32)."""
    t = np.float32(np.trunc(v))
    if v - t >= np.float32(0.5):
        t += np.float32(1.0)
    elif t - v >= np.float32(0.5):
        t -= np.float32(1.0)
    return t


@nb.njit(cache=True)
def _store_f32(data, scale, slot, j, x):
    for i in range(x.shape[0]):
        data[slot, j, i] = x[i]


@nb.njit(cache=True)
def _store_f16(data, scale, slot, j, x):
    for i in range(x.shape[0]):
        data[slot, j, i] = f32_to_f16(x[i])


@nb.njit(cache=True)
def _store_q8_0(data, scale, slot, j, x):
    for b in range(x.shape[0] // QK):
        amax = np.float32(0.0)
        for i in range(b * QK, (b + 1) * QK):
            amax = max(amax, abs(x[i]))
        d = amax / np.float32(127.0)
        inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        scale[slot, j, b] = f32_to_f16(d)
        for i in range(b * QK, (b + 1) * QK):
            data[slot, j, i] = np.int8(_round_away(x[i] * inv))


def _kind(arr) -> str:
    if not isinstance(arr, types.Array) or arr.ndim != 3:
        raise TypingError(f"a KV cache array must be 3-D, got {arr}")
    for kind, dt in DTYPES.items():
        if arr.dtype == from_dtype(np.dtype(dt)):
            return kind
    raise TypingError(f"a KV cache array of {arr.dtype} is none of {', '.join(DTYPES)}")


# ---------------------------------------------------------------- the kernels' three operations

def store_row(data, scale, slot, j, x):
    """data/scale[slot, j] = row x [D] (float32) in the cache's type (Numba code only)."""
    raise NotImplementedError("store_row runs inside Numba kernels")


def key_dot(q, keys, scale, s, j, part):
    """dot(q [D], key row keys[s, j]) in runtime.model.ops.dot's order (Numba code only)."""
    raise NotImplementedError("key_dot runs inside Numba kernels")


def add_value(acc, e, vals, scale, s, j):
    """acc [D] += e * value row vals[s, j] (Numba code only)."""
    raise NotImplementedError("add_value runs inside Numba kernels")


def key_dot4(q, keys, scale, s, j, part):
    """(key_dot of q with key rows keys[s[i], j]) for i = 0 .. 3, each summed exactly as key_dot
    sums it, as four independent chains (part: 4 x LANES floats of scratch; Numba code only)."""
    raise NotImplementedError("key_dot4 runs inside Numba kernels")


def add_values4(acc, e, vals, scale, s, j):
    """add_value of e[i] times value row vals[s[i], j] for i = 0 .. 3 in turn, each element's adds
    in that order (the same bits as four add_value calls; Numba code only)."""
    raise NotImplementedError("add_values4 runs inside Numba kernels")


@overload(store_row, **ALWAYS_INLINED)
def _store_row(data, scale, slot, j, x):
    store = {"f32": _store_f32, "f16": _store_f16, "q8_0": _store_q8_0}[_kind(data)]

    def impl(data, scale, slot, j, x):
        store(data, scale, slot, j, x)
    return impl


@overload(key_dot, **ALWAYS_INLINED)
def _key_dot(q, keys, scale, s, j, part):
    kind = _kind(keys)
    if kind == "f32":  # the float32 cache's own dot, as before there were other types
        def impl(q, keys, scale, s, j, part):
            return dot(q, keys[s, j], part)
    elif kind == "f16":
        def impl(q, keys, scale, s, j, part):
            k = keys[s, j]
            n = k.shape[0]
            for l in range(LANES):
                part[l] = 0.0
            m = n - n % LANES
            for i0 in range(0, m, LANES):
                for l in range(LANES):
                    part[l] += q[i0 + l] * half(k[i0 + l])
            t = np.float32(0.0)
            for l in range(LANES):
                t += part[l]
            for i in range(m, n):
                t += q[i] * half(k[i])
            return t
    else:  # q8_0: D is a multiple of 32 (allocate checks): two runs of LANES per block
        def impl(q, keys, scale, s, j, part):
            k = keys[s, j]
            sc = scale[s, j]
            for l in range(LANES):
                part[l] = 0.0
            for b in range(sc.shape[0]):
                d = half(sc[b])
                for i0 in range(b * QK, (b + 1) * QK, LANES):
                    for l in range(LANES):
                        part[l] += q[i0 + l] * (np.float32(k[i0 + l]) * d)
            t = np.float32(0.0)
            for l in range(LANES):
                t += part[l]
            return t
    return impl


@overload(add_value, **ALWAYS_INLINED)
def _add_value(acc, e, vals, scale, s, j):
    kind = _kind(vals)
    if kind == "f32":
        def impl(acc, e, vals, scale, s, j):
            v = vals[s, j]
            for i in range(acc.shape[0]):
                acc[i] += e * v[i]
    elif kind == "f16":
        def impl(acc, e, vals, scale, s, j):
            v = vals[s, j]
            for i in range(acc.shape[0]):
                acc[i] += e * half(v[i])
    else:
        def impl(acc, e, vals, scale, s, j):
            v = vals[s, j]
            sc = scale[s, j]
            for b in range(sc.shape[0]):
                ed = e * half(sc[b])
                for i in range(b * QK, (b + 1) * QK):
                    acc[i] += ed * np.float32(v[i])
    return impl


@overload(key_dot4, **ALWAYS_INLINED)
def _key_dot4(q, keys, scale, s, j, part):
    kind = _kind(keys)
    if kind == "f32":
        def impl(q, keys, scale, s, j, part):
            return dot4(q, keys[s[0], j], keys[s[1], j], keys[s[2], j], keys[s[3], j], part)
    elif kind == "f16":
        def impl(q, keys, scale, s, j, part):
            k0, k1, k2, k3 = keys[s[0], j], keys[s[1], j], keys[s[2], j], keys[s[3], j]
            n = q.shape[0]
            for l in range(4 * LANES):
                part[l] = 0.0
            m = n - n % LANES
            for i0 in range(0, m, LANES):
                for l in range(LANES):
                    u = q[i0 + l]
                    part[l] += u * widen4(k0[i0 + l])
                    part[LANES + l] += u * widen4(k1[i0 + l])
                    part[2 * LANES + l] += u * widen4(k2[i0 + l])
                    part[3 * LANES + l] += u * widen4(k3[i0 + l])
            return _sum4(q, part, m, k0, k1, k2, k3)
    else:
        def impl(q, keys, scale, s, j, part):
            k0, k1, k2, k3 = keys[s[0], j], keys[s[1], j], keys[s[2], j], keys[s[3], j]
            c0, c1, c2, c3 = scale[s[0], j], scale[s[1], j], scale[s[2], j], scale[s[3], j]
            for l in range(4 * LANES):
                part[l] = 0.0
            for b in range(c0.shape[0]):
                d0, d1, d2, d3 = half(c0[b]), half(c1[b]), half(c2[b]), half(c3[b])
                for i0 in range(b * QK, (b + 1) * QK, LANES):
                    for l in range(LANES):
                        u = q[i0 + l]
                        part[l] += u * (np.float32(k0[i0 + l]) * d0)
                        part[LANES + l] += u * (np.float32(k1[i0 + l]) * d1)
                        part[2 * LANES + l] += u * (np.float32(k2[i0 + l]) * d2)
                        part[3 * LANES + l] += u * (np.float32(k3[i0 + l]) * d3)
            return _sum4(q, part, q.shape[0], k0, k1, k2, k3)  # D is whole blocks: no tail
    return impl


@nb.njit(inline="always", cache=True)
def _sum4(q, part, m, k0, k1, k2, k3):
    """The four chains' partial sums, each added in lane order, then the f16 rows' tails from m."""
    t0 = np.float32(0.0)
    t1 = np.float32(0.0)
    t2 = np.float32(0.0)
    t3 = np.float32(0.0)
    for l in range(LANES):
        t0 += part[l]
        t1 += part[LANES + l]
        t2 += part[2 * LANES + l]
        t3 += part[3 * LANES + l]
    for i in range(m, q.shape[0]):
        t0 += q[i] * half(k0[i])
        t1 += q[i] * half(k1[i])
        t2 += q[i] * half(k2[i])
        t3 += q[i] * half(k3[i])
    return t0, t1, t2, t3


@overload(add_values4, **ALWAYS_INLINED)
def _add_values4(acc, e, vals, scale, s, j):
    kind = _kind(vals)
    if kind == "f32":
        def impl(acc, e, vals, scale, s, j):
            v0, v1, v2, v3 = vals[s[0], j], vals[s[1], j], vals[s[2], j], vals[s[3], j]
            for i in range(acc.shape[0]):
                acc[i] = acc[i] + e[0] * v0[i] + e[1] * v1[i] + e[2] * v2[i] + e[3] * v3[i]
    elif kind == "f16":
        def impl(acc, e, vals, scale, s, j):
            v0, v1, v2, v3 = vals[s[0], j], vals[s[1], j], vals[s[2], j], vals[s[3], j]
            for i in range(acc.shape[0]):
                acc[i] = acc[i] + e[0] * widen4(v0[i]) + e[1] * widen4(v1[i]) + e[2] * widen4(v2[i]) \
                    + e[3] * widen4(v3[i])
    else:
        def impl(acc, e, vals, scale, s, j):
            v0, v1, v2, v3 = vals[s[0], j], vals[s[1], j], vals[s[2], j], vals[s[3], j]
            c0, c1, c2, c3 = scale[s[0], j], scale[s[1], j], scale[s[2], j], scale[s[3], j]
            for b in range(c0.shape[0]):
                d0, d1, d2, d3 = e[0] * half(c0[b]), e[1] * half(c1[b]), e[2] * half(c2[b]), e[3] * half(c3[b])
                for i in range(b * QK, (b + 1) * QK):
                    acc[i] = acc[i] + d0 * np.float32(v0[i]) + d1 * np.float32(v1[i]) + d2 * np.float32(v2[i]) \
                        + d3 * np.float32(v3[i])
    return impl


# ---------------------------------------------------------------- writes from numpy

@nb.njit(cache=True)
def _store_rows(data, scale, slots, x):
    for t in range(slots.shape[0]):
        for j in range(x.shape[1]):
            store_row(data, scale, slots[t], j, x[t, j])


def store(data: np.ndarray, scale: np.ndarray, slots: np.ndarray, x: np.ndarray) -> None:
    """data/scale[slots[t]] = x [T, Nk, D] (float32), rounded to the cache's type as the decode
    kernels round it."""
    if x.ndim != 3 or x.shape[1:] != data.shape[1:] or slots.shape != (x.shape[0],):
        raise ValueError(f"store: rows {x.shape} at {slots.shape} slots do not fit a cache of {data.shape}")
    if kind_of(data) == "f32":
        data[slots] = x
        return
    _store_rows(data, scale, np.ascontiguousarray(slots, np.int64), np.ascontiguousarray(x, np.float32))
