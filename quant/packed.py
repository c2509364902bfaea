"""A weight matrix as its GGUF bytes, checked once and wrapped without copying.

    w = pack(qtype, raw, R, C)      W [R, C] from any uint8 array holding its GGUF rows
    w.data  uint8 [R, row_bytes(qtype, C)], C-contiguous and read-only

Both kernel sets (quant.float_kernels, quant.int8_kernels) take PackedMatrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from .formats import check_row, get_format, row_bytes


@dataclass(frozen=True)
class PackedMatrix:
    """A weight matrix W [rows, cols] in one GGUF format, ready for the kernels."""
    qtype: T
    rows: int
    cols: int
    data: np.ndarray  # uint8 [rows, row_bytes(qtype, cols)], C-contiguous

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


def pack(qtype, raw: np.ndarray, rows: int, cols: int) -> PackedMatrix:
    """Wrap the GGUF bytes of a [rows, cols] matrix (any uint8 array holding them, e.g. a slice
    of a memory map) after checking them. Copies only when raw is not C-contiguous."""
    fmt = get_format(qtype)
    qtype = T(qtype)
    check_row(qtype, cols)
    if rows <= 0:
        raise ValueError(f"rows={rows} must be positive")
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8:
        raise TypeError(f"raw must be a uint8 ndarray, got {getattr(raw, 'dtype', type(raw))}")
    rb = row_bytes(qtype, cols)
    if raw.size != rows * rb:
        raise ValueError(f"raw holds {raw.size} bytes; {fmt.name} [{rows}, {cols}] needs "
                         f"{rows} x {rb} = {rows * rb}")
    data = np.ascontiguousarray(raw).reshape(rows, rb).view()
    # Always read-only: a mapped file's bytes are, copies in RAM would not be, and Numba compiles a
    # kernel once per argument type. One type means one compiled kernel, so the same weights give
    # bit-identical results whether they are mapped, copied or in an expert cache slot.
    data.flags.writeable = False
    return PackedMatrix(qtype, int(rows), int(cols), data)
