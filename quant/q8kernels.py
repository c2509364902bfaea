"""Decode kernels on int8 activations: GEMV, grouped GEMV and a fused SwiGLU expert FFN.

Shape legend
    R  rows of W     C  columns (a multiple of 256)     N  tokens     H  hidden    I  FFN width
    a = quantize_activations(X [N, C])   Q8Activations: q int8 [N, C], d float32 [N, C // 256],
                                         b int32 [N, C // 16] (see quant._q8dot)
    matvec(w, a, out[, token])           out [R] = W @ x_token, x quantized as in a
    matmul(w, a, out)                    out [N, R] = X @ W.T for every token of a (GEMM_FORMATS);
                                         w a PackedMatrix or a RepackedMatrix
    repack(w)                            W in 16-row groups for the AVX-512 VNNI GEMM (REPACK_FORMATS)
    matvec_many(ws, a, out)              out [sum R] = the ws stacked, times token 0, in one call
    matvec_group(group(ws), x, out)      the same with x float32 (quantized in the call) and the
                                         matrices prepared once
    swiglu_experts(experts, x, out)      out [H] += sum_e weight_e * down_e @ swiglu(gate_e @ x, up_e @ x)
    swiglu_ffns(desc, weights, limits, x, out)   the same from ffn_descriptor rows (no checks)

Formats: Q4_K, Q5_K, Q6_K and Q8_0 (``supports``). Results equal ``dequantize(W) @
(d * q)`` up to float32 rounding once per 256 columns, so they differ from the float32
kernels of ``quant.kernels`` only by the activation rounding (relative error about 1/250
per block, as in llama.cpp, which quantizes activations the same way).

On AVX-512 VNNI hosts the Q4_K/Q6_K GEMM works on 16 rows at a time, so that each
``vpdpbusd`` does 64 multiply-adds for 16 rows (quant._vnni). ``matmul`` on GGUF rows
transposes each group's bytes in registers (no copy; an 8-token GEMM costs about 2x a
one-token GEMV, against 3-4x for the 4-token row step it replaces, which still runs
elsewhere and for rows left over). ``repack`` stores a matrix in that order once
(quant.repack) for callers that can keep a second copy: an 8-token GEMM on it costs
1.2-1.5x the GEMV. The runtime keeps the GGUF rows, which decode streams.

``matvec_many`` and ``swiglu_experts`` take their matrices by address, so any set of
them (views of a memory map, slots of an expert cache) goes in one call: one parallel
launch instead of one per matrix, which is what a decode step spends its overhead on.
The caller keeps the matrices alive during the call (a PackedMatrix's data does).
"""

from __future__ import annotations

import hashlib
import pathlib
import sys
from dataclasses import dataclass

import numba as nb
import numpy as np
from gguf import GGMLQuantizationType as T

from . import _bits, _q8dot, _simd, _vnni
from . import repack as _repack
from ._bits import u8_at
from ._q8dot import GEMM4_FORMATS, Q4_K, Q5_K, Q6_K, q8dot, q8dot4, quantize_row
from ._vnni import (
    q4k_rows_step1,
    q4k_rows_step2,
    q4k_rows_step4,
    q4k_rows_step8,
    q4k_x16_step1,
    q4k_x16_step2,
    q4k_x16_step4,
    q4k_x16_step8,
    q6k_rows_step1,
    q6k_rows_step2,
    q6k_rows_step4,
    q6k_rows_step8,
    q6k_x16_step1,
    q6k_x16_step2,
    q6k_x16_step4,
    q6k_x16_step8,
)
from .kernels import PackedMatrix

FORMATS = (T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0)
GEMM_FORMATS = tuple(T(q) for q in GEMM4_FORMATS)  # with an int8 GEMM (AVX2 hosts: Q4_K, Q6_K)
REPACK_FORMATS = tuple(_repack.BLOCK_BYTES) if _vnni.AVAILABLE else ()  # AVX-512 VNNI hosts


_FORMAT_SET = frozenset(FORMATS)


def supports(qtype, cols: int) -> bool:
    """Whether W [*, cols] of this format runs on int8 activations."""
    return qtype in _FORMAT_SET and cols % 256 == 0 and cols > 0


@dataclass(frozen=True)
class Q8Activations:
    q: np.ndarray  # int8 [N, C]
    d: np.ndarray  # float32 [N, C // 256]
    b: np.ndarray  # int32 [N, C // 16]

    def __post_init__(self):
        # the kernels take these by address, row after row: C-contiguous or wrong numbers
        q = self.q
        if q.dtype != np.int8 or q.ndim != 2 or q.shape[1] % 256 or not q.flags.c_contiguous:
            raise ValueError(f"q must be C-contiguous int8 [N, C], C a multiple of 256, got {q.dtype} {q.shape}")
        n, c = q.shape
        for name, arr, dtype, cols in (("d", self.d, np.float32, c // 256), ("b", self.b, np.int32, c // 16)):
            if arr.dtype != dtype or arr.shape != (n, cols) or not arr.flags.c_contiguous:
                raise ValueError(f"{name} must be C-contiguous {np.dtype(dtype).name} [{n}, {cols}], "
                                 f"got {arr.dtype} {arr.shape}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape


def quantize_activations(X: np.ndarray) -> Q8Activations:
    """X float32 [N, C] (or [C]), C a multiple of 256, to int8 with one scale per 256 columns."""
    X = np.asarray(X)
    if X.ndim == 1:
        X = X[None]
    if X.dtype != np.float32 or X.ndim != 2:
        raise TypeError(f"X must be float32 [N, C], got {X.dtype} {X.shape}")
    n, c = X.shape
    if c % 256 or c == 0:
        raise ValueError(f"int8 activations need a multiple of 256 columns, got {c}")
    a = Q8Activations(np.empty((n, c), np.int8), np.empty((n, c // 256), np.float32),
                      np.empty((n, c // 16), np.int32))
    _quantize(np.ascontiguousarray(X), a.q, a.d, a.b)
    return a


def _check_w(w, a: Q8Activations) -> None:
    if not isinstance(w, PackedMatrix):
        raise TypeError(f"w must be a PackedMatrix, got {type(w).__name__}")
    if not supports(w.qtype, w.cols):
        raise ValueError(f"{w.qtype.name} [{w.rows}, {w.cols}] has no int8-activation kernel")
    if a.shape[1] != w.cols:
        raise ValueError(f"activations have {a.shape[1]} columns, W has {w.cols}")


def matvec(w: PackedMatrix, a: Q8Activations, out: np.ndarray, token: int = 0) -> np.ndarray:
    """out [R] = W @ (token `token` of a)."""
    _check_w(w, a)
    if out.dtype != np.float32 or out.shape != (w.rows,) or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 [{w.rows}], got {out.dtype} {out.shape}")
    _gemv(int(w.qtype), w.data, a.q[token], a.d[token], a.b[token], out)
    return out


@dataclass(frozen=True)
class RepackedMatrix:
    """W [rows, cols] in 16-row groups (quant.repack); data uint8 [rows / 16, cols / 256, block]."""
    qtype: T
    rows: int
    cols: int
    data: np.ndarray

    def __post_init__(self):
        why = _repack.check(self.qtype, self.rows, self.cols)
        if why:
            raise ValueError(f"RepackedMatrix {T(self.qtype).name} [{self.rows}, {self.cols}]: {why}")
        shape = (self.rows // 16, self.cols // 256, _repack.BLOCK_BYTES[self.qtype])
        d = self.data
        if d.dtype != np.uint8 or d.shape != shape or not d.flags.c_contiguous:
            raise ValueError(f"RepackedMatrix {T(self.qtype).name} [{self.rows}, {self.cols}]: data must be "
                             f"C-contiguous uint8 {list(shape)}, got {d.dtype} {list(d.shape)}")

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


def repack(w: PackedMatrix) -> RepackedMatrix:
    """W rearranged for the VNNI GEMM. Raises ValueError naming what does not fit: the host
    (AVX-512 VNNI), the format (REPACK_FORMATS) or the shape (rows a multiple of 16)."""
    if not isinstance(w, PackedMatrix):
        raise TypeError(f"w must be a PackedMatrix, got {type(w).__name__}")
    if not _vnni.AVAILABLE:
        raise ValueError("the 16-row GEMM needs AVX-512 VNNI, which this host (or the Numba target: "
                         "NUMBA_CPU_NAME, NUMBA_CPU_FEATURES) lacks")
    why = _repack.check(w.qtype, w.rows, w.cols)
    if why:
        raise ValueError(f"cannot repack {w.qtype.name} [{w.rows}, {w.cols}]: {why}")
    data = _repack.repack(w.qtype, w.data)
    data.setflags(write=False)
    return RepackedMatrix(w.qtype, w.rows, w.cols, data)


def can_repack(w: PackedMatrix) -> bool:
    return bool(REPACK_FORMATS) and _repack.check(w.qtype, w.rows, w.cols) is None


def matmul(w: PackedMatrix | RepackedMatrix, a: Q8Activations, out: np.ndarray) -> np.ndarray:
    """out [N, R] = X @ W.T for the N tokens of a, the weights read from memory once. On VNNI
    hosts, 16-row groups (repacked, or straight from GGUF rows) run in parallel with 8 tokens
    per pass over a group (then 4, 2, 1), the rows beyond a multiple of 16 as below; elsewhere
    rows run in parallel, 4 tokens per pass."""
    if isinstance(w, RepackedMatrix):
        if not _vnni.AVAILABLE:
            raise ValueError("a RepackedMatrix needs AVX-512 VNNI, which this host (or the Numba "
                             "target: NUMBA_CPU_NAME, NUMBA_CPU_FEATURES) lacks")
        n = a.shape[0]
        if a.shape[1] != w.cols:
            raise ValueError(f"activations have {a.shape[1]} columns, W has {w.cols}")
        if out.dtype != np.float32 or out.shape != (n, w.rows) or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous float32 [{n}, {w.rows}], got {out.dtype} {out.shape}")
        _gemm_x16(int(w.qtype), w.data, a.q, a.d, a.b, out)
        return out
    _check_w(w, a)
    if w.qtype not in GEMM_FORMATS:
        raise ValueError(f"no int8-activation GEMM for {w.qtype.name} on this host (have: "
                         f"{', '.join(t.name for t in GEMM_FORMATS) or 'none'})")
    n = a.shape[0]
    if out.dtype != np.float32 or out.shape != (n, w.rows) or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 [{n}, {w.rows}], got {out.dtype} {out.shape}")
    _gemm(int(w.qtype), w.data, a.q, a.d, a.b, out)
    return out


def matvec_many(ws: list[PackedMatrix], a: Q8Activations, out: np.ndarray) -> np.ndarray:
    """out = concatenate([W @ x for W in ws]) for token 0 of a, in one parallel call."""
    for w in ws:
        _check_w(w, a)
    total = sum(w.rows for w in ws)
    if out.dtype != np.float32 or out.shape != (total,) or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 [{total}], got {out.dtype} {out.shape}")
    qt = np.array([int(w.qtype) for w in ws], np.int64)
    addr = np.array([w.data.ctypes.data for w in ws], np.int64)
    rb = np.array([w.data.shape[1] for w in ws], np.int64)
    starts = np.zeros(len(ws) + 1, np.int64)
    np.cumsum([w.rows for w in ws], out=starts[1:])
    _gemv_many(qt, addr, rb, starts, a.q[0], a.d[0], a.b[0], out)
    return out


@dataclass(frozen=True)
class Group:
    """Matrices that multiply the same input, prepared once for matvec_group: their formats,
    addresses, row bytes and the start of each one's rows in the output."""
    mats: tuple[PackedMatrix, ...]  # kept alive with the addresses
    qt: np.ndarray
    addr: np.ndarray
    rb: np.ndarray
    starts: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.starts[-1])

    @property
    def cols(self) -> int:
        return self.mats[0].cols


def group(ws: list[PackedMatrix]) -> Group:
    """Prepare ws (all [*, C] in formats with int8 kernels) for matvec_group."""
    if not ws or any(not isinstance(w, PackedMatrix) for w in ws):
        raise TypeError("group needs one or more PackedMatrix")
    for w in ws:
        if not supports(w.qtype, w.cols) or w.cols != ws[0].cols:
            raise ValueError(f"{w.qtype.name} [{w.rows}, {w.cols}] cannot join an int8 group of {ws[0].cols} columns")
    starts = np.zeros(len(ws) + 1, np.int64)
    np.cumsum([w.rows for w in ws], out=starts[1:])
    return Group(tuple(ws), np.array([int(w.qtype) for w in ws], np.int64),
                 np.array([w.data.ctypes.data for w in ws], np.int64),
                 np.array([w.data.shape[1] for w in ws], np.int64), starts)


def matvec_group(g: Group, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out [g.rows] = the group's matrices stacked, times x float32 [C], which is quantized
    inside the call: one kernel call for a decode step's projections of one input."""
    if x.dtype != np.float32 or x.shape != (g.cols,) or not x.flags.c_contiguous:
        raise ValueError(f"x must be C-contiguous float32 [{g.cols}], got {x.dtype} {x.shape}")
    if out.dtype != np.float32 or out.shape != (g.rows,) or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 [{g.rows}], got {out.dtype} {out.shape}")
    _gemv_group(g.qt, g.addr, g.rb, g.starts, x, out)
    return out


@dataclass(frozen=True)
class Expert:
    """One SwiGLU FFN of a weighted sum: gate/up [I, H], down [H, I]."""
    gate: PackedMatrix
    up: PackedMatrix
    down: PackedMatrix
    weight: float
    limit: float  # clamp: silu(g) <= limit, |u| <= limit; 0 for none


def ffn_descriptor(gate: PackedMatrix, up: PackedMatrix, down: PackedMatrix) -> np.ndarray | None:
    """An FFN as the fused kernel takes it: int64 [6] = (gate/up format, down format, gate, up
    and down addresses, width I); None if its formats or shapes have no int8 FFN kernel."""
    i, h = gate.rows, gate.cols
    if (up.rows, up.cols, down.rows, down.cols) != (i, h, h, i) or gate.qtype != up.qtype \
            or not supports(gate.qtype, h) or not supports(down.qtype, i):
        return None
    return np.array([int(gate.qtype), int(down.qtype), gate.data.ctypes.data, up.data.ctypes.data,
                     down.data.ctypes.data, i], np.int64)


def swiglu_ffns(desc: np.ndarray, weights: np.ndarray, limits: np.ndarray, x: np.ndarray,
                out: np.ndarray) -> np.ndarray:
    """out [H] += sum_e weights[e] * FFN_e(x) for FFNs given by descriptors desc [M, 6] (see
    ffn_descriptor; the caller keeps their matrices alive), limits [M] their SwiGLU clamps."""
    _swiglu_experts(desc, weights, limits, x, out)
    return out


def swiglu_experts(experts: list[Expert], x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out [H] += sum_e weight_e * down_e @ (min(silu(g), L) * clip(u, -L, L)), g = gate_e @ x,
    u = up_e @ x, in one call. x is quantized once; each FFN's hidden vector once. Terms are
    added to out in list order."""
    h = out.shape[0]
    if x.dtype != np.float32 or x.shape != (h,) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"x and out must be float32 [{h}], got {x.dtype} {x.shape} and {out.dtype} {out.shape}")
    desc = []
    for e in experts:
        d = ffn_descriptor(e.gate, e.up, e.down)
        if d is None or e.gate.cols != h:
            raise ValueError(f"no int8-activation FFN on [{h}] for gate/up {e.gate.qtype.name} "
                             f"[{e.gate.rows}, {e.gate.cols}], [{e.up.rows}, {e.up.cols}], down "
                             f"{e.down.qtype.name} [{e.down.rows}, {e.down.cols}]")
        desc.append(d)
    return swiglu_ffns(np.stack(desc), np.array([e.weight for e in experts], np.float32),
                       np.array([e.limit for e in experts], np.float32), np.ascontiguousarray(x), out)


# ---------------------------------------------------------------- Numba drivers

@nb.njit(inline="always", cache=True)
def _bytes_per_256(qtype):
    if qtype == Q4_K:
        return 144
    if qtype == Q5_K:
        return 176
    if qtype == Q6_K:
        return 210
    return 272


@nb.njit(inline="always", cache=True)
def _find(starts, g):
    """The m with starts[m] <= g < starts[m + 1] (starts ascending; a handful of entries)."""
    m = 0
    while starts[m + 1] <= g:
        m += 1
    return m


@nb.njit(inline="always", fastmath=True, cache=True)
def group_gemv(qt, addr, rb, starts, xq, xd, xb, out):
    """out = the group's rows (see Group) times the int8 activations, rows in parallel; inlinable
    into a larger decode kernel. Callers outside quant must include source_stamp() in their
    cache key, as the drivers below do."""
    for g in nb.prange(starts[-1]):
        m = _find(starts, g)
        w = u8_at(addr[m] + (g - starts[m]) * rb[m], rb[m])
        out[g] = q8dot(qt[m], w, xq, xd, xb)


@nb.njit(inline="always", fastmath=True, cache=True)
def _row_steps(qtype, w, XQ, XD, XB, out, r):
    """Row r of GGUF rows w times every token: 4 tokens per pass, then one at a time."""
    n = XQ.shape[0]
    for g in range(n // 4):
        a0, a1, a2, a3 = q8dot4(qtype, w[r], XQ, XD, XB, 4 * g)
        out[4 * g, r] = a0
        out[4 * g + 1, r] = a1
        out[4 * g + 2, r] = a2
        out[4 * g + 3, r] = a3
    for t in range(n - n % 4, n):
        out[t, r] = q8dot(qtype, w[r], XQ[t], XD[t], XB[t])

@nb.njit(inline="always", cache=True)
def _activation_sums(qtype, XB):
    """int16 [N, C / 32] (Q4_K: sums per 32 columns) or [N, C / 16] (Q6_K) from XB."""
    n = XB.shape[0]
    per = 2 if qtype == Q4_K else 1
    xs = np.empty((n, XB.shape[1] // per), np.int16)
    for t in range(n):
        for m in range(xs.shape[1]):
            v = np.int32(0)
            for k in range(per):
                v += XB[t, per * m + k]
            xs[t, m] = np.int16(v)
    return xs

@nb.njit(inline="always", cache=True)
def _group_steps(qtype, rows, wa, row_bytes, nsb, n, xq0, xqs, xs0, xss, xd0, xds, o0, os_):
    """One 16-row group (repacked blocks at wa, or GGUF rows from wa if rows) times n tokens:
    8 per pass while 8 are left, then 4, 2, 1. The group's weights stay in cache between
    passes, so they are read from memory once."""
    t = 0
    while t < n:
        left = n - t
        step = 8 if left >= 8 else 4 if left >= 4 else 2 if left >= 2 else 1
        xq, xs, xd, o = xq0 + t * xqs, xs0 + t * xss, xd0 + t * xds, o0 + t * os_
        if rows:
            if qtype == Q4_K:
                if step == 8:
                    q4k_rows_step8(wa, row_bytes, nsb, xq, xqs, xs, xss, xd, xds, o, os_)
                elif step == 4:
                    q4k_rows_step4(wa, row_bytes, nsb, xq, xqs, xs, xss, xd, xds, o, os_)
                elif step == 2:
                    q4k_rows_step2(wa, row_bytes, nsb, xq, xqs, xs, xss, xd, xds, o, os_)
                else:
                    q4k_rows_step1(wa, row_bytes, nsb, xq, xqs, xs, xss, xd, xds, o, os_)
            elif step == 8:
                q6k_rows_step8(wa, row_bytes, nsb, xq, xqs, xs, xss, xd, xds, o, os_)
            elif step == 4:
                q6k_rows_step4(wa, row_bytes, nsb, xq, xqs, xs, xss, xd, xds, o, os_)
            elif step == 2:
                q6k_rows_step2(wa, row_bytes, nsb, xq, xqs, xs, xss, xd, xds, o, os_)
            else:
                q6k_rows_step1(wa, row_bytes, nsb, xq, xqs, xs, xss, xd, xds, o, os_)
        elif qtype == Q4_K:
            if step == 8:
                q4k_x16_step8(wa, nsb, xq, xqs, xs, xss, xd, xds, o, os_)
            elif step == 4:
                q4k_x16_step4(wa, nsb, xq, xqs, xs, xss, xd, xds, o, os_)
            elif step == 2:
                q4k_x16_step2(wa, nsb, xq, xqs, xs, xss, xd, xds, o, os_)
            else:
                q4k_x16_step1(wa, nsb, xq, xqs, xs, xss, xd, xds, o, os_)
        elif step == 8:
            q6k_x16_step8(wa, nsb, xq, xqs, xs, xss, xd, xds, o, os_)
        elif step == 4:
            q6k_x16_step4(wa, nsb, xq, xqs, xs, xss, xd, xds, o, os_)
        elif step == 2:
            q6k_x16_step2(wa, nsb, xq, xqs, xs, xss, xd, xds, o, os_)
        else:
            q6k_x16_step1(wa, nsb, xq, xqs, xs, xss, xd, xds, o, os_)
        t += step


def source_stamp() -> str:
    return _source_stamp()


def _source_stamp() -> str:
    """Hash of the sources the drivers inline, and whether the AVX2 path is in: Numba's cache
    watches only the file defining a function, and the stamp, a closure variable of each
    driver, is part of its cache key (as in quant._drivers)."""
    h = hashlib.sha256(f"{_simd.AVAILABLE} {_vnni.AVAILABLE}".encode())
    for mod in (_bits, _q8dot, _simd, _vnni, sys.modules[__name__]):
        h.update(pathlib.Path(mod.__file__).read_bytes())
    return h.hexdigest()


def _build(stamp: str):
    @nb.njit(parallel=True, fastmath=True, cache=True)
    def _quantize(X, q, d, b):
        stamp  # noqa: B018 (cache key)
        for t in nb.prange(X.shape[0]):
            quantize_row(X[t], q[t], d[t], b[t])

    @nb.njit(parallel=True, fastmath=True, cache=True)
    def _gemv(qtype, w, xq, xd, xb, out):
        stamp  # noqa: B018 (cache key)
        for r in nb.prange(w.shape[0]):
            out[r] = q8dot(qtype, w[r], xq, xd, xb)

    if _vnni.AVAILABLE:
        @nb.njit(parallel=True, fastmath=True, cache=True)
        def _gemm(qtype, w, XQ, XD, XB, out):
            """GGUF rows: 16-row groups straight from the rows (quant._vnni), the rows left over
            one at a time."""
            stamp  # noqa: B018 (cache key)
            n, c = XQ.shape
            r = out.shape[1]
            xs = _activation_sums(qtype, XB)
            xqs, xss, xds, os_ = np.int64(c), np.int64(2 * xs.shape[1]), np.int64(4 * (c // 256)), np.int64(4 * r)
            rb = np.int64(w.shape[1])
            for g in nb.prange(r // 16):
                _group_steps(qtype, True, w[16 * g].ctypes.data, rb, c // 256, n, XQ.ctypes.data, xqs,
                             xs.ctypes.data, xss, XD.ctypes.data, xds, out.ctypes.data + 64 * g, os_)
            for row in nb.prange(r - r % 16, r):
                _row_steps(qtype, w, XQ, XD, XB, out, row)

        @nb.njit(parallel=True, fastmath=True, cache=True)
        def _gemm_x16(qtype, w, XQ, XD, XB, out):
            stamp  # noqa: B018 (cache key)
            n, c = XQ.shape
            r = out.shape[1]
            xs = _activation_sums(qtype, XB)
            xqs, xss, xds, os_ = np.int64(c), np.int64(2 * xs.shape[1]), np.int64(4 * (c // 256)), np.int64(4 * r)
            for g in nb.prange(w.shape[0]):
                _group_steps(qtype, False, w[g].ctypes.data, np.int64(0), w.shape[1], n, XQ.ctypes.data, xqs,
                             xs.ctypes.data, xss, XD.ctypes.data, xds, out.ctypes.data + 64 * g, os_)
    else:
        _gemm_x16 = None  # matmul refuses a RepackedMatrix here; the steps would abort LLVM

        @nb.njit(parallel=True, fastmath=True, cache=True)
        def _gemm(qtype, w, XQ, XD, XB, out):
            stamp  # noqa: B018 (cache key)
            for row in nb.prange(w.shape[0]):
                _row_steps(qtype, w, XQ, XD, XB, out, row)

    @nb.njit(parallel=True, fastmath=True, cache=True)
    def _gemv_group(qt, addr, rb, starts, x, out):
        stamp  # noqa: B018 (cache key)
        c = x.shape[0]
        xq = np.empty(c, np.int8)
        xd = np.empty(c // 256, np.float32)
        xb = np.empty(c // 16, np.int32)
        quantize_row(x, xq, xd, xb)
        group_gemv(qt, addr, rb, starts, xq, xd, xb, out)

    @nb.njit(parallel=True, fastmath=True, cache=True)
    def _gemv_many(qt, addr, rb, starts, xq, xd, xb, out):
        stamp  # noqa: B018 (cache key)
        for g in nb.prange(starts[-1]):
            m = _find(starts, g)
            w = u8_at(addr[m] + (g - starts[m]) * rb[m], rb[m])
            out[g] = q8dot(qt[m], w, xq, xd, xb)

    @nb.njit(parallel=True, fastmath=True, cache=True)
    def _swiglu_experts(desc, weights, limits, x, out):
        stamp  # noqa: B018 (cache key)
        m_count = desc.shape[0]
        qt = desc[:, 0:2]
        addr = desc[:, 2:5]
        inter = desc[:, 5]
        h = x.shape[0]
        xq = np.empty(h, np.int8)
        xd = np.empty(h // 256, np.float32)
        xb = np.empty(h // 16, np.int32)
        quantize_row(x, xq, xd, xb)
        # gate and up rows of every expert, one parallel loop: expert m owns gu[2 * s[m] : 2 * s[m + 1]]
        s = np.zeros(m_count + 1, np.int64)
        for m in range(m_count):
            s[m + 1] = s[m] + inter[m]
        gu = np.empty(2 * s[m_count], np.float32)
        for g in nb.prange(2 * s[m_count]):
            m = _find(s, g // 2)
            j = g - 2 * s[m]  # 0 .. 2 I - 1: gate rows, then up rows
            rbm = h // 256 * _bytes_per_256(qt[m, 0])
            which = j // inter[m]
            r = j - which * inter[m]
            w = u8_at(addr[m, which] + r * rbm, rbm)
            gu[g] = q8dot(qt[m, 0], w, xq, xd, xb)
        # SwiGLU and the hidden vectors' quantization, per expert
        hq = np.empty(s[m_count], np.int8)
        hd = np.empty(s[m_count] // 256, np.float32)
        hb = np.empty(s[m_count] // 16, np.int32)
        act = np.empty(s[m_count], np.float32)
        for m in nb.prange(m_count):
            lim = limits[m]
            i = inter[m]
            g0 = 2 * s[m]
            for k in range(i):
                gv = gu[g0 + k]
                uv = gu[g0 + i + k]
                a = gv / (np.float32(1.0) + np.exp(-gv))
                if lim > np.float32(1e-6):
                    a = min(a, lim)
                    uv = min(max(uv, -lim), lim)
                act[s[m] + k] = a * uv
            quantize_row(act[s[m]:s[m + 1]], hq[s[m]:s[m + 1]], hd[s[m] // 256:s[m + 1] // 256],
                         hb[s[m] // 16:s[m + 1] // 16])
        # down rows of every expert, then the weighted sum in entry order
        y = np.empty((m_count, h), np.float32)
        for g in nb.prange(m_count * h):
            m = g // h
            r = g - m * h
            i = inter[m]
            rbm = i // 256 * _bytes_per_256(qt[m, 1])
            w = u8_at(addr[m, 2] + r * rbm, rbm)
            y[m, r] = q8dot(qt[m, 1], w, hq[s[m]:s[m + 1]], hd[s[m] // 256:s[m + 1] // 256],
                            hb[s[m] // 16:s[m + 1] // 16])
        for m in range(m_count):
            wt = weights[m]
            for r in range(h):
                out[r] += wt * y[m, r]

    return _quantize, _gemv, _gemm, _gemm_x16, _gemv_group, _gemv_many, _swiglu_experts


_quantize, _gemv, _gemm, _gemm_x16, _gemv_group, _gemv_many, _swiglu_experts = _build(_source_stamp())
