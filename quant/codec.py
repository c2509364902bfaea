"""quantize / dequantize whole tensors: float32 rows <-> GGUF on-disk bytes.

Shape legend
    R  rows, C  weights per row (a multiple of the format's block size)
    quantize(x float32 [R, C], qtype)          -> uint8 [R, row_bytes(qtype, C)]
    dequantize(data uint8 [..., bytes], qtype, shape [..., C]) -> float32 shape
"""

from __future__ import annotations

import math

import numpy as np
from gguf import GGMLQuantizationType as T

from . import kquant, kquant_q2q3, reference, reference_iq
from .formats import check_row, get_format, row_bytes

# numpy codecs build a few temporaries per element: work in slices of this many weights
_CHUNK = 1 << 20

_KQUANT = {T.Q2_K: kquant_q2q3.quantize_q2_k, T.Q3_K: kquant_q2q3.quantize_q3_k,
           T.Q4_K: kquant.quantize_q4_k, T.Q5_K: kquant.quantize_q5_k, T.Q6_K: kquant.quantize_q6_k}
_DEQUANT = {**reference.DEQUANT, **reference_iq.DEQUANT}


def quantizable() -> tuple[T, ...]:
    """The tensor types `quantize` writes."""
    return (*reference.QUANT, *_KQUANT)


def quantize(x: np.ndarray, qtype) -> np.ndarray:
    """GGUF bytes uint8 [R, row_bytes(qtype, C)] for float32 weights x [R, C]."""
    fmt = get_format(qtype)
    qtype = T(qtype)
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise TypeError(f"quantize needs a float32 ndarray, got {getattr(x, 'dtype', type(x))}")
    if x.ndim != 2:
        raise ValueError(f"quantize needs a 2-D array [rows, cols], got shape {x.shape}")
    rows, cols = x.shape
    check_row(qtype, cols)
    x = np.ascontiguousarray(x)
    if qtype in _KQUANT:
        return _KQUANT[qtype](x)
    if qtype not in reference.QUANT:
        raise ValueError(f"no quantizer for {fmt.name}: stepstream reads {fmt.name} but does not write it "
                         f"(llama.cpp's llama-quantize does); quantizable: "
                         f"{', '.join(get_format(t).name for t in [*reference.QUANT, *_KQUANT])}")
    encode = reference.QUANT[qtype]
    out = np.empty((rows, row_bytes(qtype, cols)), np.uint8)
    step = max(1, _CHUNK // cols)
    for r0 in range(0, rows, step):
        part = x[r0:r0 + step]
        blocks = encode(part.reshape(-1, fmt.block_size))
        out[r0:r0 + step] = blocks.reshape(part.shape[0], -1)
    return out


def dequantize(data: np.ndarray, qtype, shape) -> np.ndarray:
    """float32 weights of the given shape from their GGUF bytes (any array of uint8 holding them)."""
    fmt = get_format(qtype)
    qtype = T(qtype)
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ValueError("dequantize needs a shape with at least one dimension")
    cols = shape[-1]
    check_row(qtype, cols)
    rows = math.prod(shape[:-1])
    rb = row_bytes(qtype, cols)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise TypeError(f"dequantize needs a uint8 ndarray, got {getattr(data, 'dtype', type(data))}")
    if data.size != rows * rb:
        raise ValueError(f"{data.size} bytes of {fmt.name} do not hold shape {shape} "
                         f"({rows} rows x {rb} bytes = {rows * rb})")
    blocks = np.ascontiguousarray(data).reshape(-1, fmt.block_bytes)
    decode = _DEQUANT[qtype]
    out = np.empty((blocks.shape[0], fmt.block_size), np.float32)
    step = max(1, _CHUNK // fmt.block_size)
    for b0 in range(0, blocks.shape[0], step):
        out[b0:b0 + step] = decode(blocks[b0:b0 + step])
    return out.reshape(shape)
