"""Test blocks for the formats llama.cpp writes and stepstream only reads, and llama.cpp's own
decoders and importance-matrix quantizers as references (ctypes into the libggml-base of
llama-cpp-python, as tests.helpers.quant_ggml does for its plain quantizers)."""

from __future__ import annotations

import ctypes

import numpy as np
from gguf import GGMLQuantizationType as T

from quant.formats import get_format, row_bytes
from tests.helpers.quant_ggml import ggml_base

# byte offsets of the f16 fields inside one block (IQ1_M spreads its f16 over four nibbles)
F16_FIELDS = {
    T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.IQ4_NL: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.IQ4_XS: (0,),
    T.TQ1_0: (52,), T.TQ2_0: (64,), T.IQ2_XXS: (0,), T.IQ2_XS: (0,), T.IQ2_S: (0,), T.IQ3_XXS: (0,),
    T.IQ3_S: (0,), T.IQ1_S: (0,),
}


def finite_blocks(rng: np.random.Generator, qtype, rows: int, cols: int, scale: float = 0.01) -> np.ndarray:
    """uint8 [rows, row_bytes]: random codes (every bit pattern is a valid code in these formats)
    with finite f16 scales of about ``scale``, so the weights are finite and of sane size."""
    qtype = T(qtype)
    fmt = get_format(qtype)
    raw = rng.integers(0, 256, (rows, row_bytes(qtype, cols)), dtype=np.uint8)
    blocks = raw.reshape(-1, fmt.block_bytes)
    n = blocks.shape[0]
    if qtype == T.IQ1_M:  # d's four nibbles are the top nibbles of the u16 scales at bytes 48..55
        d = (scale * rng.uniform(0.5, 1.5, n)).astype(np.float16).view(np.uint16)
        for k in range(4):
            nib = ((d >> np.uint16(4 * k)) & np.uint16(15)).astype(np.uint8)
            blocks[:, 49 + 2 * k] = (blocks[:, 49 + 2 * k] & np.uint8(15)) | (nib << np.uint8(4))
        return raw
    for off in F16_FIELDS[qtype]:
        d = (scale * rng.uniform(-1.5, 1.5, n)).astype(np.float16)
        blocks[:, off:off + 2] = d.view(np.uint8).reshape(n, 2)
    return raw


def ggml_dequantize(raw: np.ndarray, qtype, rows: int, cols: int) -> np.ndarray:
    """llama.cpp's own decoding (ggml's ``dequantize_row_*``) of [rows, cols] weights."""
    lib = ggml_base()
    assert lib is not None, "llama-cpp-python is not installed"
    fn = getattr(lib, f"dequantize_row_{get_format(qtype).name.lower().replace('_k', '_K')}")
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    raw = np.ascontiguousarray(raw, np.uint8)
    out = np.empty((rows, cols), np.float32)
    fn(raw.ctypes.data, out.ctypes.data, rows * cols)
    return out


def ggml_quantize_imatrix(x: np.ndarray, qtype, imatrix: np.ndarray) -> np.ndarray:
    """llama.cpp's quantization of float32 x [R, C] with an importance matrix float32 [C] (the
    IQ1/IQ2 types need one), as uint8 [R, row_bytes]."""
    lib = ggml_base()
    assert lib is not None, "llama-cpp-python is not installed"
    x = np.ascontiguousarray(x, dtype=np.float32)
    imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
    rows, cols = x.shape
    assert imatrix.shape == (cols,)
    out = np.zeros((rows, row_bytes(qtype, cols)), np.uint8)
    lib.ggml_quantize_init(int(qtype))
    n = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, cols, imatrix.ctypes.data)
    assert n == out.nbytes, (n, out.nbytes)
    return out
