"""Setting the compute thread count of the libraries that do the arithmetic.

numpy's bundled OpenBLAS (matrix products on float weights) and Numba (the quantized
kernels) each keep their own pool. This is process-wide state, set once when a model is
loaded, like llama.cpp's `n_threads`.
"""

from __future__ import annotations

import ctypes
import glob
import os

import numpy as np


def _openblas():
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*"))
    for path in libs:
        lib = ctypes.CDLL(path)
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                setter = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                getter = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                if setter is not None and getter is not None:
                    return setter, getter
    return None


def set_blas_threads(n: int) -> None:
    """OpenBLAS's thread count alone."""
    blas = _openblas()
    if blas is not None:
        blas[0](ctypes.c_int(n))


def set_threads(n: int) -> int:
    """Ask for n compute threads; returns the number Numba will use."""
    set_blas_threads(n)
    import numba

    used = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(used)
    return used
