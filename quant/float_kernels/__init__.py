"""float32-activation kernels over GGUF weight rows: dequantize fused into GEMV and GEMM.

The fallback for formats and shapes the int8 kernels (quant.int8_kernels) do not cover, and
the exact path (``--activations f32``).

Shape legend
    R  rows of W (output features)     C  columns of W (input features)     N  tokens
    w.data  uint8   [R, row_bytes(qtype, C)]   the GGUF bytes, used as they are on disk
    x       float32 [C]       one token           out  float32 [R]
    X       float32 [N, C]    N tokens            out  float32 [N, R]

    w = quant.pack(qtype, raw, R, C)   # checks and wraps raw bytes; no copy (quant.packed)
    matvec(w, x, out)               # out = W @ x         (decode: one token)
    matmul(w, X, out[, scratch])    # out = X @ W.T       (prefill, MTP verification)
                                    # scratch = make_scratch() once, to skip a small allocation

Both return ``out``. Formats: F32, F16, BF16, Q8_0, Q4_0, MXFP4, Q4_K, Q5_K, Q6_K,
IQ4_XS (rows in row_dot / row_decode, drivers in gemv_gemm), and the formats llama.cpp's
low-bit presets write, Q4_1, Q5_0, Q5_1, IQ4_NL, Q2_K, Q3_K, TQ1_0, TQ2_0 (rows_lowbit), and
its code-book formats IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M (rows_iq; drivers
of both in gemv_gemm_llama). Weights are decoded inside the kernels (fused), in float32 with float32
activations, so results match ``dequantize(...) @ x`` to float32 rounding. No
repacking is needed: the GGUF layouts already give each sub-block contiguous
bytes, which is what the vectorized inner loops need (see ``row_dot``).

``matvec`` decodes each weight once per call and runs its rows in parallel;
``matmul`` decodes a tile of rows x 512 columns into a float32 scratch tile
once and multiplies it with every token, so the weights are read once for all
N tokens. Numba's thread count (``numba.set_num_threads``) sets the parallelism.
With Numba's OpenMP layer, set OMP_WAIT_POLICY=PASSIVE when other processes may
compete for the cores: spinning workers otherwise slow each call several-fold.
"""

from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType as T

from ..formats import IQ4_NL_VALUES, MXFP4_VALUES_X2
from ..packed import PackedMatrix
from . import gemv_gemm as _g
from . import gemv_gemm_llama as _gl
from .rows_iq import table as _iq_table

_LUT = np.array([IQ4_NL_VALUES, MXFP4_VALUES_X2], np.float32)
_LUT.setflags(write=False)
_EMPTY = np.zeros(0, np.float32)  # stands in for xs where a format needs none
_NEEDS_XSUM = (T.Q4_0, T.Q4_K, T.Q5_K, T.Q4_1, T.Q5_0, T.Q5_1)
_DRIVERS = {  # qtype -> (GEMV driver, GEMM driver)
    T.F32: (_g.gemv_f32, _g.gemm_f32),
    T.F16: (_g.gemv_f16, _g.gemm_f16),
    T.BF16: (_g.gemv_bf16, _g.gemm_bf16),
    T.Q8_0: (_g.gemv_q8_0, _g.gemm_q8_0),
    T.Q4_0: (_g.gemv_q4_0, _g.gemm_q4_0),
    T.MXFP4: (_g.gemv_mxfp4, _g.gemm_mxfp4),
    T.Q4_K: (_g.gemv_q4_k, _g.gemm_q4_k),
    T.Q5_K: (_g.gemv_q5_k, _g.gemm_q5_k),
    T.Q6_K: (_g.gemv_q6_k, _g.gemm_q6_k),
    T.IQ4_XS: (_g.gemv_iq4_xs, _g.gemm_iq4_xs),
    T.Q4_1: (_gl.gemv_q4_1, _gl.gemm_q4_1),
    T.Q5_0: (_gl.gemv_q5_0, _gl.gemm_q5_0),
    T.Q5_1: (_gl.gemv_q5_1, _gl.gemm_q5_1),
    T.IQ4_NL: (_gl.gemv_iq4_nl, _gl.gemm_iq4_nl),
    T.Q2_K: (_gl.gemv_q2_k, _gl.gemm_q2_k),
    T.Q3_K: (_gl.gemv_q3_k, _gl.gemm_q3_k),
    T.TQ1_0: (_gl.gemv_tq1_0, _gl.gemm_tq1_0),
    T.TQ2_0: (_gl.gemv_tq2_0, _gl.gemm_tq2_0),
    T.IQ2_XXS: (_gl.gemv_iq2_xxs, _gl.gemm_iq2_xxs),
    T.IQ2_XS: (_gl.gemv_iq2_xs, _gl.gemm_iq2_xs),
    T.IQ2_S: (_gl.gemv_iq2_s, _gl.gemm_iq2_s),
    T.IQ3_XXS: (_gl.gemv_iq3_xxs, _gl.gemm_iq3_xxs),
    T.IQ3_S: (_gl.gemv_iq3_s, _gl.gemm_iq3_s),
    T.IQ1_S: (_gl.gemv_iq1_s, _gl.gemm_iq1_s),
    T.IQ1_M: (_gl.gemv_iq1_m, _gl.gemm_iq1_m),
}
# the code-book formats take their grid and sign patterns as the table argument
_TABLES = {q: _iq_table(q) for q in (T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M)}

FORMATS = tuple(_DRIVERS)  # the formats with kernels here: every entry of quant.FORMATS
TILE_ROWS, TILE_COLS = _g.TILE_ROWS, _g.TILE_COLS


def _check(name: str, a: np.ndarray, shape: tuple[int, ...]) -> None:
    if not isinstance(a, np.ndarray) or a.dtype != np.float32:
        raise TypeError(f"{name} must be a float32 ndarray, got {getattr(a, 'dtype', type(a))}")
    if a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}, expected {shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (strides {a.strides})")


def _check_w(w) -> None:
    if not isinstance(w, PackedMatrix):
        raise TypeError(f"w must be a PackedMatrix from quant.pack, got {type(w).__name__}")


def matvec(w: PackedMatrix, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out [R] = W [R, C] @ x [C]."""
    _check_w(w)
    _check("x", x, (w.cols,))
    _check("out", out, (w.rows,))
    xs = x.reshape(-1, 32).sum(axis=1, dtype=np.float32) if w.qtype in _NEEDS_XSUM else _EMPTY
    _DRIVERS[w.qtype][0](w.data, x, xs, _TABLES.get(w.qtype, _LUT), out)
    return out


def matmul(w: PackedMatrix, X: np.ndarray, out: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """out [N, R] = X [N, C] @ W.T. ``scratch`` (float32 [workers, TILE_ROWS, TILE_COLS]) may be
    passed to avoid allocating one per call; see ``make_scratch``."""
    _check_w(w)
    if not isinstance(X, np.ndarray) or X.ndim != 2:
        raise ValueError(f"X must be a 2-D [tokens, {w.cols}] array, got {getattr(X, 'shape', type(X))}")
    n = X.shape[0]
    if n == 0:
        raise ValueError("X has no tokens (shape[0] == 0)")
    _check("X", X, (n, w.cols))
    _check("out", out, (n, w.rows))
    if scratch is None:
        scratch = make_scratch()
    elif scratch.dtype != np.float32 or scratch.ndim != 3 or scratch.shape[1:] != (TILE_ROWS, TILE_COLS) \
            or not scratch.flags.c_contiguous:
        raise ValueError(f"scratch must be C-contiguous float32 [workers, {TILE_ROWS}, {TILE_COLS}], "
                         f"got {scratch.dtype} {scratch.shape}")
    _DRIVERS[w.qtype][1](w.data, X, _TABLES.get(w.qtype, _LUT), scratch, out)
    return out


def make_scratch(workers: int | None = None) -> np.ndarray:
    """GEMM scratch tiles for ``workers`` parallel workers (default: Numba's thread count)."""
    workers = numba.get_num_threads() if workers is None else int(workers)
    return np.empty((workers, TILE_ROWS, TILE_COLS), np.float32)
