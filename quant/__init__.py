"""GGUF block quantization formats: reference codecs, Numba quantizers and dequant-matmul kernels.

    quantize(x float32 [R, C], qtype) -> uint8 [R, row_bytes(qtype, C)]   (GGUF bytes)
    dequantize(data uint8, qtype, shape) -> float32 shape
    FORMATS, QuantFormat, row_bytes, check_row                          (quant.formats)
    pack, matvec, matmul, make_scratch, PackedMatrix                    (quant.kernels)
"""

from .api import dequantize, quantize
from .formats import FORMATS, QuantFormat, check_row, get_format, row_bytes
from .kernels import PackedMatrix, make_scratch, matmul, matvec, pack

__all__ = ["FORMATS", "PackedMatrix", "QuantFormat", "check_row", "dequantize", "get_format", "make_scratch",
           "matmul", "matvec", "pack", "quantize", "row_bytes"]
