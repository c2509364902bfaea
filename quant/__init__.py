"""GGUF tensor formats: reference codecs, quantizers, and the kernels that multiply by them.

    quantize(x float32 [R, C], qtype) -> uint8 [R, row_bytes(qtype, C)]   (GGUF bytes)
    dequantize(data uint8, qtype, shape) -> float32 shape
    FORMATS, QuantFormat, row_bytes, check_row, get_format               (quant.formats)
    pack(qtype, raw, R, C) -> PackedMatrix                                (quant.packed)

Kernels, in two subpackages that take a PackedMatrix:
    quant.int8_kernels    activations rounded to int8, integer dot products (the default)
    quant.float_kernels   float32 activations, every format (the fallback, and the exact path)

This package imports nothing else of the project. Importing it registers the Numba cache
locator of quant.jit, so every kernel's cache key covers the sources it inlines.
"""

from . import jit  # noqa: F401  (first: the cache locator must exist before any kernel is defined)
from .codec import dequantize, quantize
from .formats import FORMATS, QuantFormat, check_row, get_format, row_bytes
from .packed import PackedMatrix, pack

__all__ = ["FORMATS", "PackedMatrix", "QuantFormat", "check_row", "dequantize", "get_format", "pack", "quantize",
           "row_bytes"]
