"""Weights in their stored format, and the one function that multiplies by them.

A `Matrix` is a view of the mapped file: no bytes are copied at load. `matmul` is the
single place that turns stored weights into products: float32 weights go to numpy's BLAS,
every other format to the `quant` package's fused dequant GEMV (one token) or GEMM
(a chunk of tokens), which read the GGUF bytes as they are.

Shape legend:  T rows of activations   N out features   C in features
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import quant
from gguf import GGMLQuantizationType as Q
from quant import float_kernels as kernels
from quant import int8_kernels as q8kernels

from runtime.base.errors import StepstreamError
from runtime.base.gguf_file import TensorRef

_FLOAT = {Q.F32: np.float32, Q.F16: np.float16}


@dataclass(frozen=True)
class Matrix:
    """W [N, C] as stored: float data in numpy order, or block bytes [N, row_bytes]."""

    name: str
    qtype: Q
    shape: tuple[int, int]
    data: np.ndarray
    # The kernels' view of the same bytes (None for F32, which BLAS takes as is). Derived, so
    # a Matrix made or copied anywhere (dataclasses.replace, an expert cache) is always ready.
    packed: quant.PackedMatrix | None = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        packed = None
        if self.qtype != Q.F32:
            raw = np.ascontiguousarray(self.data).view(np.uint8)  # float16 data comes typed; kernels take bytes
            packed = quant.pack(self.qtype, raw, int(self.shape[0]), int(self.shape[1]))
        object.__setattr__(self, "packed", packed)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def dense(self) -> np.ndarray:
        """float32 [N, C]."""
        if self.qtype == Q.F32:
            return np.asarray(self.data)
        return dequantize(self.data, self.qtype, self.shape)


def dequantize(data: np.ndarray, qtype: Q, shape) -> np.ndarray:
    if qtype in _FLOAT:
        return np.asarray(data, dtype=np.float32).reshape(shape)
    return quant.dequantize(np.asarray(data), qtype, shape)


def matmul(x: np.ndarray, w: Matrix, q8: bool = False) -> np.ndarray:
    """x [T, C] float32 @ W[N, C].T -> [T, N] float32.

    With q8, x is first rounded to int8 per 256 columns (as llama.cpp does) wherever W's
    format has an int8-activation kernel, and the product runs on integer dot products (a
    chunk of tokens in a format without an int8 GEMM: the float GEMM on the rounded x), so
    one token and a chunk give the same numbers up to float32 rounding. On AVX-512 VNNI hosts
    the chunk runs 16 rows at a time straight from the GGUF rows (quant._vnni).
    """
    if w.packed is None:
        return x @ w.data.T
    x = np.ascontiguousarray(x, dtype=np.float32)
    if q8 and q8kernels.supports(w.qtype, w.shape[1]):
        a = q8kernels.quantize_activations(x)
        if x.shape[0] == 1:
            return q8kernels.matvec(w.packed, a, np.empty((1, w.shape[0]), np.float32)[0])[None]
        if w.qtype in q8kernels.GEMM_FORMATS:
            return q8kernels.matmul(w.packed, a, np.empty((x.shape[0], w.shape[0]), np.float32))
        x = q8_values(a)
    if x.shape[0] == 1:
        out = np.empty((1, w.shape[0]), np.float32)
        kernels.matvec(w.packed, x[0], out[0])
        return out
    return kernels.matmul(w.packed, x, np.empty((x.shape[0], w.shape[0]), np.float32))


def q8_values(a: q8kernels.Q8Activations) -> np.ndarray:
    """The float32 values [T, C] that int8 activations stand for."""
    t, c = a.shape
    return (a.q.reshape(t, c // 256, 256) * a.d[:, :, None]).reshape(t, c)


def matmul_many(x: np.ndarray, ws: list[Matrix], q8: bool = False) -> list[np.ndarray]:
    """[matmul(x, w, q8) for w in ws]; one token with q8 goes in one kernel call when it can."""
    if q8 and x.shape[0] == 1 and all(w.packed is not None and q8kernels.supports(w.qtype, w.shape[1])
                                      for w in ws):
        out = np.empty(sum(w.shape[0] for w in ws), np.float32)
        q8kernels.matvec_many([w.packed for w in ws], q8kernels.quantize_activations(x), out)
        parts, a = [], 0
        for w in ws:
            parts.append(out[None, a : a + w.shape[0]])
            a += w.shape[0]
        return parts
    return [matmul(x, w, q8) for w in ws]


def make_matrix(name: str, qtype: Q, shape, data: np.ndarray) -> Matrix:
    return Matrix(name, qtype, (int(shape[0]), int(shape[1])), data)


def matrix_from_bytes(name: str, qtype: Q, shape: tuple[int, int], raw: np.ndarray) -> Matrix:
    """A Matrix over stored bytes (uint8, e.g. an expert cache slot), typed as the file map types
    them: float formats as their dtype [N, C], block formats as blocks [N, row_bytes]."""
    data = raw.view(_FLOAT[qtype]).reshape(shape) if qtype in _FLOAT else raw.reshape(shape[0], -1)
    return make_matrix(name, qtype, shape, data)


def matrix(ref: TensorRef, shape: tuple[int, int]) -> Matrix:
    """Check a 2-D tensor against the shape the config implies."""
    if tuple(ref.shape) != tuple(shape):
        raise StepstreamError(f"{ref.path}: tensor {ref.name!r} has shape {list(ref.shape)}, the model config implies {list(shape)}")
    return make_matrix(ref.name, ref.qtype, shape, ref.data)


def stacked(ref: TensorRef, shape: tuple[int, int, int]) -> list[Matrix]:
    """A 3-D expert tensor [E, N, C] as E matrices, each a contiguous slice of the file."""
    if tuple(ref.shape) != tuple(shape):
        raise StepstreamError(f"{ref.path}: tensor {ref.name!r} has shape {list(ref.shape)}, the model config implies {list(shape)}")
    return [make_matrix(f"{ref.name}[{e}]", ref.qtype, shape[1:], ref.data[e]) for e in range(shape[0])]


def vector(ref: TensorRef, n: int) -> np.ndarray:
    """A 1-D tensor (norm weight, bias) as float32 [n], copied out of the map."""
    if tuple(ref.shape) != (n,):
        raise StepstreamError(f"{ref.path}: tensor {ref.name!r} has shape {list(ref.shape)}, the model config implies [{n}]")
    return np.array(dequantize(ref.data, ref.qtype, (n,)), dtype=np.float32)


def rows(w: Matrix, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` of W as float32 [len(ids), C]: an embedding lookup that dequantizes only those rows."""
    return dequantize(np.asarray(w.data)[ids], w.qtype, (len(ids), w.shape[1]))


def ffn_descriptor(gate: Matrix, up: Matrix, down: Matrix) -> np.ndarray | None:
    """The fused int8 FFN kernel's view of a SwiGLU FFN (quant.q8kernels.ffn_descriptor), or
    None when a matrix is float32 or its format has no such kernel."""
    if gate.packed is None or up.packed is None or down.packed is None:
        return None
    return q8kernels.ffn_descriptor(gate.packed, up.packed, down.packed)


def q8_group(ms: list[Matrix]) -> q8kernels.Group | None:
    """Matrices sharing an input, prepared for one int8 kernel call per token
    (quant.q8kernels.group), or None when one of them has no int8 kernel."""
    if any(m.packed is None or not q8kernels.supports(m.qtype, m.shape[1]) or m.shape[1] != ms[0].shape[1]
           for m in ms):
        return None
    return q8kernels.group([m.packed for m in ms])


def matvec_q8(g: q8kernels.Group, x: np.ndarray) -> np.ndarray:
    """One token x [1, C] through a prepared group: [1, g.rows]."""
    out = np.empty((1, g.rows), np.float32)
    q8kernels.matvec_group(g, np.ascontiguousarray(x[0], dtype=np.float32), out[0])
    return out
