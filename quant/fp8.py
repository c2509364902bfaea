"""FP8 weights with block scales, as Hugging Face FP8 checkpoints store them (input formats only).

Shape legend
    R, C    rows and columns of one matrix (an expert slice of a fused [E, R, C] tensor)
    n       rows of one chunk of that matrix, starting at row `row0`
    b0, b1  rows and columns of weights that share one scale (`weight_block_size`)
    SR, SC  rows and columns of the scale grid: ceil(R / b0), ceil(C / b1)

A weight is its 8-bit code's value times its block's scale (the checkpoint calls the scale
`weight_scale_inv`: it undoes the division made when quantizing), computed in float32 as
transformers, vLLM and llama.cpp's converter compute `weight.float() * scale`. Blocks at the
right and bottom edges may be partial: a scale grid is the ceiling of the matrix over the block.

Codes (safetensors dtypes; torch's float8_e4m3fn and float8_e5m2):
    F8_E4M3  sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities, S.1111.111 is NaN;
             largest finite 448
    F8_E5M2  sign, 5 exponent bits (bias 15), 2 mantissa bits; IEEE-like, with Inf and NaN
"""

from __future__ import annotations

import numba as nb
import numpy as np

# safetensors dtype -> (exponent bits, mantissa bits, whether the top exponent holds Inf/NaN
# as IEEE formats do; E4M3 "fn" keeps it finite except for the all-ones code)
_LAYOUTS = {"F8_E4M3": (4, 3, False), "F8_E5M2": (5, 2, True)}
DTYPES = tuple(_LAYOUTS)


def _decode_table(exp_bits: int, man_bits: int, ieee: bool) -> np.ndarray:
    """float32 [256]: the value of every code, from the format's bit layout."""
    bias = (1 << (exp_bits - 1)) - 1
    top = (1 << exp_bits) - 1
    out = np.empty(256, np.float64)
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        e = (code >> man_bits) & top
        m = code & ((1 << man_bits) - 1)
        if ieee and e == top:
            value = np.inf if m == 0 else np.nan
        elif not ieee and e == top and m == (1 << man_bits) - 1:
            value = np.nan
        elif e == 0:
            value = m / (1 << man_bits) * 2.0 ** (1 - bias)  # subnormal
        else:
            value = (1 + m / (1 << man_bits)) * 2.0 ** (e - bias)
        out[code] = np.copysign(value, sign)  # the sign of -0.0 and -NaN too
    return out.astype(np.float32)  # every value is exact in float32


TABLES = {dtype: _decode_table(*layout) for dtype, layout in _LAYOUTS.items()}


def table(dtype: str) -> np.ndarray:
    """The decode table of a safetensors FP8 dtype (KeyError for any other)."""
    return TABLES[dtype]


@nb.njit(cache=True, nogil=True)
def dequantize_blocks(out, codes, lut, scales, row0, b0, b1):
    """out float32 [n, C] = lut[codes [n, C]] * scales[(row0 + i) // b0 - (row0 // b0), j // b1].

    `scales` float32 [rows of the grid that rows row0..row0+n-1 fall in, SC]."""
    first = row0 // b0
    cols = codes.shape[1]
    for i in range(codes.shape[0]):
        s = scales[(row0 + i) // b0 - first]
        for jb in range(s.shape[0]):
            scale = s[jb]
            for j in range(jb * b1, min(jb * b1 + b1, cols)):
                out[i, j] = lut[codes[i, j]] * scale


def grid(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    """(SR, SC): the scale grid of an R x C matrix in blocks of `block`."""
    return -(-rows // block[0]), -(-cols // block[1])


def dequantize(codes: np.ndarray, dtype: str, scales: np.ndarray, row0: int, block: tuple[int, int]) -> np.ndarray:
    """float32 [n, C] of FP8 codes uint8 [n, C] (rows row0.. of their matrix), given the scale
    grid's rows that they fall in, float32 [(row0 + n - 1) // b0 - row0 // b0 + 1, SC]."""
    n, cols = codes.shape
    b0, b1 = block
    need = (0 if n == 0 else (row0 + n - 1) // b0 - row0 // b0 + 1, -(-cols // b1))
    if codes.dtype != np.uint8 or scales.dtype != np.float32 or scales.shape != need:
        raise ValueError(f"FP8 dequantize: codes {codes.dtype} {codes.shape} with scales {scales.dtype} "
                         f"{scales.shape}; expected uint8 codes and float32 scales {need}")
    out = np.empty((n, cols), np.float32)
    dequantize_blocks(out, np.ascontiguousarray(codes), table(dtype), np.ascontiguousarray(scales), row0, b0, b1)
    return out
