"""int8-activation kernels: activations rounded to int8 per 256 columns, integer dot products.

Shape legend
    R  rows of W     C  columns (a multiple of 256)     N  tokens     H  hidden    I  FFN width
    a = quantize_activations(X [N, C])   Q8Activations: q int8 [N, C], d float32 [N, C // 256],
                                         b int32 [N, C // 16] (see row_dot)
    matvec(w, a, out[, token])           out [R] = W @ x_token, x quantized as in a
    matmul(w, a, out)                    out [N, R] = X @ W.T for every token of a (GEMM_FORMATS)
    matmul_rows(w, a, out)               the same for any format, each token by the GEMV's row dot
    matvec_many(ws, a, out)              out [sum R] = the ws stacked, times token 0, in one call
    matvec_group(group(ws), x, out)      the same with x float32 (quantized in the call) and the
                                         matrices prepared once
    swiglu_ffns(desc, weights, limits, x, out, ffn_scratch(H, M, W))   out [H] += sum_m weight_m *
                                         FFN_m(x), FFNs given by ffn_descriptor rows (see ffn)
    swiglu_experts(desc, rows, starts, weights, limits, X, out)   a prefill chunk's routed experts,
                                         each on its own tokens, added into out [T, H] (see experts_gemm)

Every kernel is compiled for a format set (dispatch.format_set: a bit per format), so that a
model's kernels hold only the row code of the formats its file has. Calls take `formats=`,
a set that must include the formats of their matrices; by default, exactly those formats.
A caller that multiplies matrices of several formats (the runtime) passes one set for all
its calls, so that each kernel is compiled once.

Formats: Q4_K, Q5_K, Q6_K, Q8_0, Q2_K, Q3_K, IQ4_XS, the 32-weight blocks Q4_0, Q4_1, Q5_0, Q5_1
and IQ4_NL, the code-book formats IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M and the
ternary TQ1_0, TQ2_0, on rows of a multiple of 256 columns (``supports``). Results equal ``dequantize(W) @
(d * q)`` up to a few float32 roundings per 256 columns (per 32 for the 32-weight blocks,
whose scales are per block), so they differ from the float32
kernels of ``quant.float_kernels`` only by the activation rounding (relative error about
1/250 per block, as in llama.cpp, which quantizes activations the same way).

Modules: row_dot (one row times one token, portable; the format tables), avx2 (the
Q4_K/Q5_K/Q6_K/Q8_0 row dots as explicit AVX2 IR, one and four tokens), q2k_q3k, blocks32
(Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL) and iq4_xs (the other formats' row dots, portable and AVX2),
iq_low (IQ1/IQ2/IQ3: portable) and iq_avx2 (their AVX2 versions), ternary (TQ1_0, TQ2_0:
portable and AVX2),
avx512_vnni (16-row GEMM steps), dispatch (format sets), gemv_gemm (the parallel loops), ffn
(the fused SwiGLU sum), experts_gemm (a prefill chunk's experts in one call), llvm_ir (IR helpers).

On AVX-512 VNNI hosts the GEMM of the step_library formats (Q4_K, Q5_K, Q6_K, Q8_0, Q2_K, Q3_K,
the 32-weight blocks, IQ4_XS, IQ3_S) works on 16 GGUF rows at a time, so that each ``vpdpbusd``
does 64 multiply-adds for 16 rows; the rows are transposed in registers (no copy). The GEMV
runs their 16-row groups through the same steps for one token (`step_addresses`; Q6_K and Q8_0
rows, and the rows left over, by the row dot: gemv_gemm.row_blocks). Other formats, and every format on AVX2 hosts without VNNI, take a
4-token row step that decodes each super-block once for four tokens and makes the one-token
row dot's roundings for each.

``matvec_many``, ``group`` and ``swiglu_ffns`` take their matrices by address, so any set
of them (views of a memory map, slots of an expert cache) goes in one call: one parallel
launch instead of one per matrix, which is what a decode step spends its overhead on.
The caller keeps the matrices alive during the call (a PackedMatrix's data does).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from types import SimpleNamespace

import numpy as np
from gguf import GGMLQuantizationType as T

from ..packed import PackedMatrix
from . import avx512_vnni as _vnni
from . import experts_gemm as _experts_gemm
from . import ffn as _ffn
from . import step_library as _step_library
from . import gemv_gemm as _gemv_gemm
from .dispatch import FORMAT_BIT, format_set
from .ffn import FFNScratch, ffn_scratch
from .gemv_gemm import gemv_in_kernel
from .gemv_gemm import quantize as _quantize
from .row_dot import GEMM4_FORMATS

__all__ = ["FFNScratch", "FORMATS", "FORMAT_BIT", "GEMM_FORMATS", "Group", "Q8Activations", "ffn_descriptor",
           "ffn_scratch", "format_set", "gemv_in_kernel", "group", "kernels", "matmul", "matmul_rows", "matvec", "matvec_group", "matvec_many",
           "quantize_activations", "step_addresses", "supports", "swiglu_experts", "swiglu_ffns", "swiglu_ffn_outputs",
           "add_ffn_outputs"]

FORMATS = (T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.IQ4_NL, T.IQ4_XS,
           T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M, T.TQ1_0, T.TQ2_0)
GEMM_FORMATS = tuple(T(q) for q in GEMM4_FORMATS)  # with an int8 GEMM (AVX2 hosts: all of FORMATS)

_FORMAT_SET = frozenset(FORMATS)


def supports(qtype, cols: int) -> bool:
    """Whether W [*, cols] of this format runs on int8 activations."""
    return qtype in _FORMAT_SET and cols % 256 == 0 and cols > 0


@lru_cache(maxsize=None)
def kernels(formats: int) -> SimpleNamespace:
    """The kernels compiled for a format set: gemv (a group's rows times quantized activations),
    gemm and swiglu (see gemv_gemm.build, ffn.build)."""
    k = SimpleNamespace(**vars(_gemv_gemm.build(formats)))
    k.swiglu = _ffn.build(formats)
    k.experts = _experts_gemm.build(formats)
    return k


def _formats(formats: int | None, mats) -> int:
    """The format set to compile for: `formats`, which must hold every matrix's format, or theirs."""
    own = format_set(m.qtype for m in mats)
    if formats is None:
        return own
    if own & ~formats:
        raise ValueError(f"format set {formats} leaves out {', '.join(m.qtype.name for m in mats if own & ~formats & FORMAT_BIT[int(m.qtype)])}")
    return formats


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


def _check_out(out: np.ndarray, shape: tuple) -> None:
    if out.dtype != np.float32 or out.shape != shape or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 {list(shape)}, got {out.dtype} {list(out.shape)}")


@dataclass(frozen=True)
class Group:
    """Matrices that multiply the same input, prepared once: their formats, addresses, row bytes
    and the start of each one's rows in the output, and the format set their kernel is built for."""
    mats: tuple[PackedMatrix, ...]  # kept alive with the addresses
    qt: np.ndarray
    addr: np.ndarray
    rb: np.ndarray
    starts: np.ndarray
    formats: int
    col0: np.ndarray  # int64 [M] zeros: every matrix reads the whole input (gemv_gemm.group_gemv)
    steps: np.ndarray  # the VNNI steps of the format set (step_addresses)

    @property
    def rows(self) -> int:
        return int(self.starts[-1])

    @property
    def cols(self) -> int:
        return self.mats[0].cols

    def kernel(self):
        """gemv(qt, addr, rb, starts, col0, xq, xd, xb, out, steps) compiled for this group's format set."""
        return kernels(self.formats).gemv


def group(ws: list[PackedMatrix], formats: int | None = None) -> Group:
    """Prepare ws (all [*, C] in formats with int8 kernels) for matvec_group."""
    if not ws or any(not isinstance(w, PackedMatrix) for w in ws):
        raise TypeError("group needs one or more PackedMatrix")
    for w in ws:
        if not supports(w.qtype, w.cols) or w.cols != ws[0].cols:
            raise ValueError(f"{w.qtype.name} [{w.rows}, {w.cols}] cannot join an int8 group of {ws[0].cols} columns")
    starts = np.zeros(len(ws) + 1, np.int64)
    np.cumsum([w.rows for w in ws], out=starts[1:])
    formats = _formats(formats, ws)
    return Group(tuple(ws), np.array([int(w.qtype) for w in ws], np.int64),
                 np.array([w.data.ctypes.data for w in ws], np.int64),
                 np.array([w.data.shape[1] for w in ws], np.int64), starts, formats,
                 np.zeros(len(ws), np.int64), step_addresses(formats))


def matvec_many(ws: list[PackedMatrix], a: Q8Activations, out: np.ndarray, token: int = 0,
                formats: int | None = None) -> np.ndarray:
    """out = concatenate([W @ x for W in ws]) for token `token` of a, in one parallel call."""
    g = group(ws, formats)
    if a.shape[1] != g.cols:
        raise ValueError(f"activations have {a.shape[1]} columns, W has {g.cols}")
    _check_out(out, (g.rows,))
    g.kernel()(g.qt, g.addr, g.rb, g.starts, g.col0, a.q[token], a.d[token], a.b[token], out, g.steps)
    return out


def matvec(w: PackedMatrix, a: Q8Activations, out: np.ndarray, token: int = 0,
           formats: int | None = None) -> np.ndarray:
    """out [R] = W @ (token `token` of a)."""
    if not isinstance(w, PackedMatrix):
        raise TypeError(f"w must be a PackedMatrix, got {type(w).__name__}")
    if not supports(w.qtype, w.cols):
        raise ValueError(f"{w.qtype.name} [{w.rows}, {w.cols}] has no int8-activation kernel")
    return matvec_many([w], a, out, token, formats)


def matvec_group(g: Group, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out [g.rows] = the group's matrices stacked, times x float32 [C] (quantized first)."""
    if x.dtype != np.float32 or x.shape != (g.cols,) or not x.flags.c_contiguous:
        raise ValueError(f"x must be C-contiguous float32 [{g.cols}], got {x.dtype} {x.shape}")
    _check_out(out, (g.rows,))
    a = quantize_activations(x)
    g.kernel()(g.qt, g.addr, g.rb, g.starts, g.col0, a.q[0], a.d[0], a.b[0], out, g.steps)
    return out


_NO_STEPS = np.zeros(_step_library.SLOTS * len(_step_library.FORMATS), np.int64)
_NO_STEPS.setflags(write=False)  # read-only as steps_for's arrays: one GEMM signature, one compile
_STEP_NAMES = {int(T[name.upper()]): name for name in _step_library.FORMATS}


def _gemm_steps(qtype) -> np.ndarray:
    """The GEMM's compiled steps for matrices of format qtype (step_library.steps_for) on VNNI
    hosts, compiled or loaded on first use; zeros for formats without them and elsewhere."""
    name = _STEP_NAMES.get(int(qtype))
    return _step_library.steps_for(name) if _vnni.AVAILABLE and name is not None else _NO_STEPS


def matmul(w: PackedMatrix, a: Q8Activations, out: np.ndarray, formats: int | None = None) -> np.ndarray:
    """out [N, R] = X @ W.T for the N tokens of a, the weights read from memory once. On VNNI
    hosts, Q4_K/Q5_K/Q6_K/Q2_K/Q3_K/IQ3_S (and the other step_library formats) 16-row groups run in parallel with 8 tokens per pass over a group (then 4,
    2, 1), the rows beyond a multiple of 16 as below; other formats and hosts run rows in
    parallel, 4 tokens per pass (the code-book IQ formats 8, their decode being the costly part;
    a last group of 2-7 tokens padded to a full pass), each token's result the GEMV's to the bit."""
    if not isinstance(w, PackedMatrix):
        raise TypeError(f"w must be a PackedMatrix, got {type(w).__name__}")
    if not supports(w.qtype, w.cols):
        raise ValueError(f"{w.qtype.name} [{w.rows}, {w.cols}] has no int8-activation kernel")
    if a.shape[1] != w.cols:
        raise ValueError(f"activations have {a.shape[1]} columns, W has {w.cols}")
    if w.qtype not in GEMM_FORMATS:
        raise ValueError(f"no int8-activation GEMM for {w.qtype.name} on this host (have: "
                         f"{', '.join(t.name for t in GEMM_FORMATS) or 'none'}); matmul_rows takes every format")
    _check_out(out, (a.shape[0], w.rows))
    kernels(_formats(formats, [w])).gemm(int(w.qtype), w.data, a.q, a.d, a.b, out, _gemm_steps(w.qtype))
    return out


def matmul_rows(w: PackedMatrix, a: Q8Activations, out: np.ndarray, formats: int | None = None) -> np.ndarray:
    """out [N, R] = X @ W.T, every token through the one-token GEMV's row dot, so a row equals
    what matvec gives for that token alone: the GEMM of formats without one (every format on
    hosts without AVX2), which keeps the results independent of how many tokens a call has."""
    if not isinstance(w, PackedMatrix):
        raise TypeError(f"w must be a PackedMatrix, got {type(w).__name__}")
    if not supports(w.qtype, w.cols):
        raise ValueError(f"{w.qtype.name} [{w.rows}, {w.cols}] has no int8-activation kernel")
    if a.shape[1] != w.cols:
        raise ValueError(f"activations have {a.shape[1]} columns, W has {w.cols}")
    _check_out(out, (a.shape[0], w.rows))
    kernels(_formats(formats, [w])).gemm_rows(int(w.qtype), w.data, a.q, a.d, a.b, out)
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
                out: np.ndarray, scratch: FFNScratch, formats: int | None = None) -> np.ndarray:
    """out [H] += sum_m weights[m] * FFN_m(x) for FFNs given by descriptors desc [M, 6] (see
    ffn_descriptor; the caller keeps their matrices alive), limits [M] their SwiGLU clamps, in
    one call. scratch (ffn_scratch) must fit H, M and the FFNs' total width (the kernel checks the
    width). formats: a format set holding every FFN's formats (by default, exactly theirs)."""
    if scratch.y.shape[0] < desc.shape[0] or scratch.y.shape[1] != x.shape[0]:
        raise ValueError(f"scratch for {scratch.y.shape[0]} FFNs on [{scratch.y.shape[1]}] cannot take "
                         f"{desc.shape[0]} FFNs on [{x.shape[0]}]")
    if formats is None:
        formats = format_set(np.unique(desc[:, :2]).tolist())
    kernels(formats).swiglu(desc, weights, limits, x, out, scratch, step_addresses(formats))
    return out


def swiglu_ffn_outputs(desc: np.ndarray, limits: np.ndarray, x: np.ndarray, scratch: FFNScratch,
                       formats: int | None = None) -> np.ndarray:
    """Each FFN's own output, unweighted: y [M, H], a view of scratch.y valid until the scratch's
    next call. Row m is bit for bit the row swiglu_ffns computes for FFN m in any call: a decode
    step may compute its FFNs in several calls (the experts ready first, then each expert as its
    read finishes) and sum the rows at the end with add_ffn_outputs, in entry order."""
    m = desc.shape[0]
    swiglu_ffns(desc, np.ones(m, np.float32), limits, x, np.zeros(x.shape[0], np.float32), scratch, formats)
    return scratch.y[:m]


def add_ffn_outputs(y: np.ndarray, weights: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out [H] += sum_m weights[m] * y[m] for y [M, H], in entry order: swiglu_ffns' own sum."""
    _ffn.add_weighted_sum(y, weights, y.shape[0], out)
    return out


def _steps_of(qtypes) -> np.ndarray:
    """One GEMM steps argument holding the steps of all these formats (each format's own slots)."""
    key = tuple(sorted(set(int(q) for q in qtypes)))
    if key not in _STEPS_OF:
        steps = np.zeros_like(_NO_STEPS)
        for q in key:
            steps += _gemm_steps(q)
        steps.setflags(write=False)
        _STEPS_OF[key] = steps
    return _STEPS_OF[key]


_STEPS_OF: dict[tuple, np.ndarray] = {}


@lru_cache(maxsize=None)
def step_addresses(formats: int) -> np.ndarray:
    """The steps argument of the GEMV and the fused kernels compiled for the format set `formats`:
    the one-token VNNI steps of its formats whose GEMV takes them (gemv_gemm.GEMV_STEP;
    step_library.steps_for, compiled or loaded on first use), read-only; zeros on hosts without
    VNNI (the GEMV then runs every row by the row dot)."""
    if not _vnni.AVAILABLE:
        return _NO_STEPS
    return _steps_of([code for code, bit in FORMAT_BIT.items() if bit & formats and _gemv_gemm.GEMV_STEP[code]])


@lru_cache(maxsize=None)
def gemm_step_addresses(formats: int) -> np.ndarray:
    """The steps argument of a GEMM over matrices of any format in the set `formats`: every one
    of their formats' VNNI steps (8, 4, 2 and 1 tokens; Q6_K and Q8_0 included), compiled or
    loaded on first use, read-only; zeros on hosts without VNNI."""
    if not _vnni.AVAILABLE:
        return _NO_STEPS
    return _steps_of([code for code, bit in FORMAT_BIT.items() if bit & formats and int(code) in _STEP_NAMES])


def swiglu_experts(desc: np.ndarray, rows: np.ndarray, starts: np.ndarray, weights: np.ndarray,
                   limits: np.ndarray, X: np.ndarray, out: np.ndarray, formats: int | None = None) -> np.ndarray:
    """out [T, H] += for each expert m (desc [M, 6], ffn_descriptor rows, in the order their sums
    are added) and each of its entries j in starts[m] .. starts[m + 1]: weights[j] * FFN_m(X[rows[j]]),
    in one call (experts_gemm). limits [M]: SwiGLU clamps. The caller keeps the matrices alive."""
    m = desc.shape[0]
    if desc.dtype != np.int64 or desc.ndim != 2 or desc.shape[1] != 6:
        raise ValueError(f"desc must be int64 [M, 6] (ffn_descriptor rows), got {desc.dtype} {desc.shape}")
    if X.dtype != np.float32 or X.ndim != 2 or not X.flags.c_contiguous or X.shape[1] % 256:
        raise ValueError(f"X must be C-contiguous float32 [T, H], H a multiple of 256, got {X.dtype} {X.shape}")
    _check_out(out, X.shape)
    if starts.shape != (m + 1,) or starts[0] != 0 or np.any(np.diff(starts) < 0) or rows.shape != (starts[-1],) \
            or weights.shape != rows.shape or limits.shape != (m,):
        raise ValueError(f"rows {rows.shape}, starts {starts.shape}, weights {weights.shape} and limits "
                         f"{limits.shape} do not describe {m} experts' entries")
    if rows.size and (rows.min() < 0 or rows.max() >= X.shape[0]):
        raise ValueError(f"rows must index the {X.shape[0]} tokens of X")
    own = format_set(np.unique(desc[:, :2]).tolist())
    if formats is None:
        formats = own
    elif own & ~formats:
        raise ValueError(f"format set {formats} leaves out some of the experts' formats")
    steps = _steps_of(np.unique(desc[:, :2]).tolist()) if _vnni.AVAILABLE else _NO_STEPS
    kernels(formats).experts(desc, rows.astype(np.int64, copy=False), starts.astype(np.int64, copy=False),
                             weights.astype(np.float32, copy=False), limits.astype(np.float32, copy=False), X, out,
                             steps)
    return out
