"""ctypes access to llama.cpp's own C quantizers, in the libggml shipped inside llama-cpp-python.

Used by the tests as the reference for quantization error. ``ggml_quantize_chunk``
without an importance matrix runs ggml's ``quantize_row_*_ref`` functions.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import pathlib

import numpy as np

from quant.formats import row_bytes


@functools.cache
def ggml_base() -> ctypes.CDLL | None:
    """libggml-base from the installed llama_cpp package, or None when it is not installed."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    path = pathlib.Path(spec.origin).parent / "lib" / "libggml-base.so"
    if not path.exists():
        return None
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def ggml_quantize(x: np.ndarray, qtype) -> np.ndarray:
    """llama.cpp's quantization of float32 x [R, C] as uint8 [R, row_bytes]."""
    lib = ggml_base()
    assert lib is not None, "llama-cpp-python is not installed"
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    out = np.zeros((rows, row_bytes(qtype, cols)), np.uint8)
    lib.ggml_quantize_init(int(qtype))  # ggml's type ids are the GGUF ones
    n = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, cols, None)
    assert n == out.nbytes, (n, out.nbytes)
    return out
