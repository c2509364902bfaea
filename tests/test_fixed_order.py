"""Fixed-order float sums stay fixed inside full fast-math kernels (issue 11's numerical item).

Numba gives code it inlines (``inline="always"``) the caller's fast-math flags, so a norm whose
sum must not be reassociated is compiled on its own and called (quant.jit). Its adds reach the
caller's machine code with their own flags, also where LLVM inlines the call: no ``reassoc`` or
``contract`` on any float add of a fast-math decode step's norm.
"""

from __future__ import annotations

import re

import numba as nb
import numpy as np

from runtime.model.ops import rms_norm_row


@nb.njit(fastmath=True)
def _fast_caller(x, w, eps, out):
    """A full fast-math kernel that norms its input, as the decode step's attention half does."""
    rms_norm_row(x, w, eps, out)
    for i in range(out.shape[0]):
        out[i] = out[i] * np.float32(2.0)


def test_a_called_fixed_order_norm_keeps_its_flags_in_a_fast_math_caller():
    x = np.linspace(-3, 3, 1000, dtype=np.float32)
    w = np.full(1000, 1.5, np.float32)
    out = np.empty_like(x)
    _fast_caller(x, w, np.float32(1e-6), out)
    x64 = x.astype(np.float64)
    ref = 2.0 * x64 * 1.5 / np.sqrt(np.mean(x64 * x64) + 1e-6)
    np.testing.assert_allclose(out, ref, rtol=1e-5)
    (ir,) = _fast_caller.inspect_llvm().values()
    adds = re.findall(r"= fadd((?: [a-z]+)*) ", ir)
    assert adds, "no float add in the kernel: the norm's sum was not linked in"
    assert not [f for f in adds if "reassoc" in f or "contract" in f or "fast" in f], sorted(set(adds))
