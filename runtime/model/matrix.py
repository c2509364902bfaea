"""Weights in their stored format, and the one function that multiplies by them.

A `Matrix` is a view of the mapped file: no bytes are copied at load. `matmul` is the
single place that turns stored weights into products: float32 weights to a fixed-order dot
(runtime.model.ops.dense_matmul), every other format to the `quant` package's fused dequant
GEMV (one token) or GEMM (a chunk of tokens), which read the GGUF bytes as they are.

Shape legend:  T rows of activations   N out features   C in features
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import quant
from gguf import GGMLQuantizationType as Q
from quant import float_kernels
from quant import int8_kernels

from runtime.base.errors import StepstreamError
from runtime.base.gguf_file import TensorRef
from runtime.model.ops import dense_matmul

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


def int8_applies(w: Matrix, int8: int) -> bool:
    """Whether products with W round their activations to int8: W's format has int8 kernels
    and is in the model's int8 format set (0 when activations stay float32)."""
    return w.packed is not None and bool(int8 & int8_kernels.FORMAT_BIT.get(int(w.qtype), 0)) \
        and int8_kernels.supports(w.qtype, w.shape[1])


def matmul(x: np.ndarray, w: Matrix, int8: int = 0) -> np.ndarray:
    """x [T, C] float32 @ W[N, C].T -> [T, N] float32.

    int8 is the model's int8 format set (quant.int8_kernels.format_set; 0 for float32
    activations). Where it holds W's format, x is first rounded to int8 per 256 columns (as
    llama.cpp does) and the product runs on integer dot products, whose float steps every
    kernel takes in the same order: a token's row is bit-identical from the one-token GEMV,
    the GEMM (any chunk size) and, for formats without a GEMM, the GEMV's row dot per token.
    Every int8 kernel is compiled for the whole set, once. (float32 activations: the float
    GEMV and GEMM sum in different orders, so one token and a chunk differ in the last bits.)
    """
    if w.packed is None:
        return dense_matmul(x, w.data)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if int8_applies(w, int8):
        return _int8_product(int8_kernels.quantize_activations(x), w, int8)
    if x.shape[0] == 1:
        out = np.empty((1, w.shape[0]), np.float32)
        float_kernels.matvec(w.packed, x[0], out[0])
        return out
    return float_kernels.matmul(w.packed, x, np.empty((x.shape[0], w.shape[0]), np.float32))


def _int8_product(a: int8_kernels.Q8Activations, w: Matrix, int8: int) -> np.ndarray:
    """The quantized activations a [T, C] times W.T -> [T, N] float32 (matmul's int8 path)."""
    if a.shape[0] == 1:
        return int8_kernels.matvec(w.packed, a, np.empty((1, w.shape[0]), np.float32)[0], formats=int8)[None]
    out = np.empty((a.shape[0], w.shape[0]), np.float32)
    if w.qtype in int8_kernels.GEMM_FORMATS:
        return int8_kernels.matmul(w.packed, a, out, formats=int8)
    return int8_kernels.matmul_rows(w.packed, a, out, formats=int8)


def matmul_many(x: np.ndarray, ws: list[Matrix], int8: int = 0) -> list[np.ndarray]:
    """[matmul(x, w, int8) for w in ws]; x is rounded to int8 once for all of them when every W
    takes int8, and one token goes in one kernel call."""
    if all(int8_applies(w, int8) for w in ws):
        a = int8_kernels.quantize_activations(np.ascontiguousarray(x, dtype=np.float32))
        if x.shape[0] > 1:
            return [_int8_product(a, w, int8) for w in ws]
        out = np.empty(sum(w.shape[0] for w in ws), np.float32)
        int8_kernels.matvec_many([w.packed for w in ws], a, out, formats=int8)
        parts, c = [], 0
        for w in ws:
            parts.append(out[None, c : c + w.shape[0]])
            c += w.shape[0]
        return parts
    return [matmul(x, w, int8) for w in ws]


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
    """The fused int8 FFN kernel's view of a SwiGLU FFN (quant.int8_kernels.ffn_descriptor), or
    None when a matrix is float32 or its format has no such kernel."""
    if gate.packed is None or up.packed is None or down.packed is None:
        return None
    return int8_kernels.ffn_descriptor(gate.packed, up.packed, down.packed)


def q8_group(ms: list[Matrix], int8: int) -> int8_kernels.Group | None:
    """Matrices sharing an input, prepared for one int8 kernel call per token
    (quant.int8_kernels.group), or None when one of them does not take int8 activations."""
    if not all(int8_applies(m, int8) and m.shape[1] == ms[0].shape[1] for m in ms):
        return None
    return int8_kernels.group([m.packed for m in ms], formats=int8)


def matvec_q8(g: int8_kernels.Group, x: np.ndarray) -> np.ndarray:
    """One token x [1, C] through a prepared group: [1, g.rows]."""
    out = np.empty((1, g.rows), np.float32)
    int8_kernels.matvec_group(g, np.ascontiguousarray(x[0], dtype=np.float32), out[0])
    return out
