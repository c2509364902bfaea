"""int8-activation kernels: activations rounded to int8 per 256 columns, integer dot products.

Shape legend
    R  rows of W     C  columns (a multiple of 256)     N  tokens     H  hidden    I  FFN width
    a = quantize_activations(X [N, C])   Q8Activations: q int8 [N, C], d float32 [N, C // 256],
                                         b int32 [N, C // 16] (see row_dot)
    matvec(w, a, out[, token])           out [R] = W @ x_token, x quantized as in a
    matmul(w, a, out)                    out [N, R] = X @ W.T for every token of a (GEMM_FORMATS)
    matvec_many(ws, a, out)              out [sum R] = the ws stacked, times token 0, in one call
    matvec_group(group(ws), x, out)      the same with x float32 (quantized in the call) and the
                                         matrices prepared once
    swiglu_ffns(desc, weights, limits, x, out)   out [H] += sum_m weight_m * FFN_m(x), FFNs given
                                         by ffn_descriptor rows (see ffn)

Formats: Q4_K, Q5_K, Q6_K and Q8_0 (``supports``). Results equal ``dequantize(W) @
(d * q)`` up to float32 rounding once per 256 columns, so they differ from the float32
kernels of ``quant.float_kernels`` only by the activation rounding (relative error about
1/250 per block, as in llama.cpp, which quantizes activations the same way).

Modules: row_dot (one row times one token, portable, and dispatch), avx2 (the Q4_K/Q6_K
row dots as explicit AVX2 IR), avx512_vnni (16-row GEMM steps), gemv_gemm (the parallel
loops), ffn (the fused SwiGLU sum), llvm_ir (IR helpers).

On AVX-512 VNNI hosts the Q4_K/Q6_K GEMM works on 16 GGUF rows at a time, so that each
``vpdpbusd`` does 64 multiply-adds for 16 rows; the rows are transposed in registers (no
copy; an 8-token GEMM costs about 2x a one-token GEMV). Elsewhere a 4-token row step
decodes each super-block once for four tokens.

``matvec_many``, ``group`` and ``swiglu_ffns`` take their matrices by address, so any set
of them (views of a memory map, slots of an expert cache) goes in one call: one parallel
launch instead of one per matrix, which is what a decode step spends its overhead on.
The caller keeps the matrices alive during the call (a PackedMatrix's data does).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from ..packed import PackedMatrix
from .ffn import swiglu_ffns as _swiglu_ffns
from .gemv_gemm import gemm as _gemm
from .gemv_gemm import gemv as _gemv
from .gemv_gemm import gemv_group as _gemv_group
from .gemv_gemm import gemv_many as _gemv_many
from .gemv_gemm import quantize as _quantize
from .row_dot import GEMM4_FORMATS

FORMATS = (T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0)
GEMM_FORMATS = tuple(T(q) for q in GEMM4_FORMATS)  # with an int8 GEMM (AVX2 hosts: Q4_K, Q6_K)


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


def matmul(w: PackedMatrix, a: Q8Activations, out: np.ndarray) -> np.ndarray:
    """out [N, R] = X @ W.T for the N tokens of a, the weights read from memory once. On VNNI
    hosts, 16-row groups run in parallel with 8 tokens per pass over a group (then 4, 2, 1),
    the rows beyond a multiple of 16 as below; elsewhere rows run in parallel, 4 tokens per pass."""
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
    """out [H] += sum_m weights[m] * FFN_m(x) for FFNs given by descriptors desc [M, 6] (see
    ffn_descriptor; the caller keeps their matrices alive), limits [M] their SwiGLU clamps."""
    _swiglu_ffns(desc, weights, limits, x, out)
    return out
