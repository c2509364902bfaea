"""GGUF block quantization formats: reference codecs, Numba quantizers and dequant-matmul kernels."""
