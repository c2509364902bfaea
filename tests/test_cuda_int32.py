"""The row kernels' 32-bit helpers (quant.cuda_kernels.int32): their LLVM IR, compiled for the CPU
with numba's generic intrinsic, against their plain-Python meaning on random and edge words.
(dp4a is inline PTX: its Python twin is what the simulator runs, checked here against numpy.)"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.core.extending import intrinsic

from quant.cuda_kernels import int32

imad32, k4_scale_min = int32.intrinsics(intrinsic)


@njit
def _imad_all(a, b, c, out):
    for i in range(a.size):
        out[i] = imad32(a[i], b[i], c[i])


@njit
def _k4_all(s, out):
    for i in range(s.shape[0]):
        for j in range(8):
            sc, mn = k4_scale_min(s[i, 0], s[i, 1], s[i, 2], j)
            out[i, j, 0] = sc
            out[i, j, 1] = mn


def test_k4_scale_min_ir_is_ggmls_get_scale_min_k4():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(500, 12), dtype=np.uint8)
    raw[0], raw[1] = 0, 255  # every bit clear, every bit set
    words = raw.view("<u4").astype(np.int64)  # as the kernels load them: widened
    got = np.zeros((500, 8, 2), np.int64)
    _k4_all(words, got)
    for i in range(500):
        q = raw[i]
        for j in range(8):  # ggml-quants.c, get_scale_min_k4, on the bytes
            if j < 4:
                want = (q[j] & 63, q[j + 4] & 63)
            else:
                want = ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
            assert tuple(got[i, j]) == want
            assert int32.k4_scale_min_py(*(int(w) for w in words[i]), j) == want


def test_imad32_ir_and_dot4_py():
    rng = np.random.default_rng(1)
    a = rng.integers(-(2**15), 2**15, 1000)
    b = rng.integers(-(2**15), 2**15, 1000)
    c = rng.integers(-(2**20), 2**20, 1000)
    out = np.zeros(1000, np.int64)
    _imad_all(a, b, c, out)
    np.testing.assert_array_equal(out, a * b + c)
    x = rng.integers(0, 2**32, size=(1000, 2), dtype=np.uint64).astype(np.int64)
    x[0] = (0x80808080, 0x7F7F7F7F)  # the extremes of int8
    for u, v in x:
        bu = np.array([u], "<u4").view(np.int8).astype(np.int64)
        bv = np.array([v], "<u4").view(np.int8).astype(np.int64)
        assert int32.dot4_py(int(u), int(v), 7) == 7 + int(bu @ bv)
        assert int32.dot4_py(int(u) - 2**32 * (u >= 2**31), int(v), 0) == int(bu @ bv)  # a sign-extended word
