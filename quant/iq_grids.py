"""The code books of llama.cpp's IQ formats, built once from the tables gguf-py ships.

    GRIDS[qtype]  int8 [G, W]  grid row g holds W weights before scale and sign (W = 8, or 4 for IQ3)
    KSIGNS        uint8 [128]  a 7-bit sign index -> 8 sign bits (bit 7 makes the count of minus signs
                               even, so 7 stored bits give 8 signs)

gguf-py holds each grid as hex text of small indices into a few values (``grid_hex`` and
``grid_map``), which is ggml's ``iq*_grid`` table packed; ``init_grid`` expands it. The
values are small integers (IQ2: 8, 25, 43; IQ3_XXS: 4..62; IQ3_S: 1..15; IQ1: -1, 0, 1), so
they are kept as int8 for integer kernels and converted where floats are wanted. IQ1_M uses
IQ1_S's grid. The arrays are read-only.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants as _gq


def _grid(cls) -> np.ndarray:
    cls.init_grid()
    g = np.asarray(cls.grid, np.float32).reshape(cls.grid_shape)
    out = g.astype(np.int8)
    assert np.array_equal(out.astype(np.float32), g), cls.__name__  # integral and in int8 range
    out.setflags(write=False)
    return out


GRIDS: dict[T, np.ndarray] = {
    T.IQ2_XXS: _grid(_gq.IQ2_XXS),
    T.IQ2_XS: _grid(_gq.IQ2_XS),
    T.IQ2_S: _grid(_gq.IQ2_S),
    T.IQ3_XXS: _grid(_gq.IQ3_XXS),
    T.IQ3_S: _grid(_gq.IQ3_S),
    T.IQ1_S: _grid(_gq.IQ1_S),
}
GRIDS[T.IQ1_M] = GRIDS[T.IQ1_S]

KSIGNS = np.frombuffer(_gq.IQ2_XXS.ksigns, np.uint8).copy()
KSIGNS.setflags(write=False)
assert KSIGNS.shape == (128,)

IQ1_DELTA = np.float32(0.125)  # IQ1_S/IQ1_M shift every grid entry by +-1/8
