"""Weights in their stored format, and the one function that multiplies by them.

A `Matrix` is a view of the mapped file: no bytes are copied at load. `matmul` is the
single place that turns stored weights into products, so a faster kernel (the `quant`
package's GEMV/GEMM) replaces one function body, not the model code.

Shape legend:  T rows of activations   N out features   C in features
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from runtime.errors import StepstreamError
from runtime.gguf_file import TensorRef

_FLOAT = {Q.F32: np.float32, Q.F16: np.float16}


@dataclass(frozen=True)
class Matrix:
    """W [N, C] as stored: float data in numpy order, or block bytes [N, row_bytes]."""

    name: str
    qtype: Q
    shape: tuple[int, int]
    data: np.ndarray

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
    return np.asarray(gguf.quants.dequantize(np.asarray(data), qtype), dtype=np.float32).reshape(shape)


def matmul(x: np.ndarray, w: Matrix) -> np.ndarray:
    """x [T, C] float32 @ W[N, C].T -> [T, N] float32."""
    if w.qtype == Q.F32:
        return x @ w.data.T
    return x @ w.dense().T


def matrix(ref: TensorRef, shape: tuple[int, int]) -> Matrix:
    """Check a 2-D tensor against the shape the config implies."""
    if tuple(ref.shape) != tuple(shape):
        raise StepstreamError(f"{ref.path}: tensor {ref.name!r} has shape {list(ref.shape)}, the model config implies {list(shape)}")
    return Matrix(ref.name, ref.qtype, (int(shape[0]), int(shape[1])), ref.data)


def stacked(ref: TensorRef, shape: tuple[int, int, int]) -> list[Matrix]:
    """A 3-D expert tensor [E, N, C] as E matrices, each a contiguous slice of the file."""
    if tuple(ref.shape) != tuple(shape):
        raise StepstreamError(f"{ref.path}: tensor {ref.name!r} has shape {list(ref.shape)}, the model config implies {list(shape)}")
    return [Matrix(f"{ref.name}[{e}]", ref.qtype, (int(shape[1]), int(shape[2])), ref.data[e]) for e in range(shape[0])]


def vector(ref: TensorRef, n: int) -> np.ndarray:
    """A 1-D tensor (norm weight, bias) as float32 [n], copied out of the map."""
    if tuple(ref.shape) != (n,):
        raise StepstreamError(f"{ref.path}: tensor {ref.name!r} has shape {list(ref.shape)}, the model config implies [{n}]")
    return np.array(dequantize(ref.data, ref.qtype, (n,)), dtype=np.float32)


def rows(w: Matrix, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` of W as float32 [len(ids), C]: an embedding lookup that dequantizes only those rows."""
    return dequantize(np.asarray(w.data)[ids], w.qtype, (len(ids), w.shape[1]))
