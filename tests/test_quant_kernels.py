"""GEMV / GEMM kernels against numpy on the dequantized weights, odd shapes included."""

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from quant import FORMATS, dequantize, pack, quantize, row_bytes
from quant import float_kernels
from quant.float_kernels import TILE_COLS, TILE_ROWS, make_scratch, matmul, matvec

KERNEL_FORMATS = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.MXFP4, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS]
# rows: one row, fewer rows than a tile, a tile plus one, odd and not a multiple of the thread count
ROWS = [1, 5, TILE_ROWS + 1, 37]
# columns: one super-block, a non-multiple of the GEMM tile width (1280 = 2.5 tiles), several tiles
COLS = [256, 1280, 2 * TILE_COLS + 256]
TOKENS = [1, 3, 4, 9]  # below, at and across the 4-token blocking


def weights(qtype, rows, cols, seed=0):
    """GGUF bytes and their float32 values for a random [rows, cols] matrix."""
    rng = np.random.default_rng(seed)
    x = (0.05 * rng.standard_t(4, (rows, cols))).astype(np.float32)
    if qtype == T.IQ4_XS:  # no quantizer: random codes with sane f16 scales
        raw = rng.integers(0, 256, (rows, row_bytes(qtype, cols)), dtype=np.uint8)
        raw.reshape(-1, 136)[:, 0:2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    else:
        raw = quantize(x, qtype)
    return raw, dequantize(raw, qtype, (rows, cols))


def assert_close(got, W, X):
    """float32 rounding only: error bounded by a few ulps of sum |W| |X| (float64 reference)."""
    W64, X64 = W.astype(np.float64), X.astype(np.float64)
    want = X64 @ W64.T
    scale = np.abs(X64) @ np.abs(W64).T
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= 2e-6 * scale + 1e-30), float((err / (scale + 1e-30)).max())


@pytest.mark.parametrize("qtype", KERNEL_FORMATS, ids=lambda t: t.name)
def test_matvec_and_matmul_match_numpy(qtype):
    rng = np.random.default_rng(int(qtype))
    for rows in ROWS:
        for cols in COLS:
            raw, W = weights(qtype, rows, cols, seed=rows * cols)
            w = pack(qtype, raw, rows, cols)
            x = rng.standard_normal(cols).astype(np.float32)
            y = matvec(w, x, np.full(rows, np.nan, np.float32))
            assert_close(y[None, :], W, x[None, :])
            for n in TOKENS:
                X = rng.standard_normal((n, cols)).astype(np.float32)
                Y = matmul(w, X, np.full((n, rows), np.nan, np.float32))
                assert_close(Y, W, X)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q8_0, T.F16], ids=lambda t: t.name)
def test_results_do_not_depend_on_thread_count(qtype):
    raw, W = weights(qtype, 37, 1280, seed=3)
    w = pack(qtype, raw, 37, 1280)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(1280).astype(np.float32)
    X = rng.standard_normal((5, 1280)).astype(np.float32)
    before = numba.get_num_threads()
    results = []
    try:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            results.append((matvec(w, x, np.empty(37, np.float32)), matmul(w, X, np.empty((5, 37), np.float32))))
    finally:
        numba.set_num_threads(before)
    for y, Y in results:  # rows are independent, so the sums are the same bit for bit
        np.testing.assert_array_equal(y, results[0][0])
        np.testing.assert_array_equal(Y, results[0][1])
    # and a scratch with more workers than threads covers every row too
    Y = matmul(w, X, np.full((5, 37), np.nan, np.float32), scratch=make_scratch(3))
    assert_close(Y, W, X)


def test_matmul_rows_agree_with_matvec():
    raw, W = weights(T.Q4_K, 21, 4096, seed=4)
    w = pack(T.Q4_K, raw, 21, 4096)
    X = np.random.default_rng(2).standard_normal((6, 4096)).astype(np.float32)
    Y = matmul(w, X, np.empty((6, 21), np.float32))
    for t in range(6):
        np.testing.assert_allclose(Y[t], matvec(w, X[t].copy(), np.empty(21, np.float32)), rtol=2e-5, atol=1e-5)


def test_pack_uses_the_bytes_in_place():
    raw, _ = weights(T.Q4_K, 4, 512)
    flat = raw.reshape(-1)
    w = pack(T.Q4_K, flat, 4, 512)
    assert np.shares_memory(w.data, raw) and w.data.shape == (4, 288) and w.nbytes == raw.nbytes


def test_errors_name_the_offending_value():
    raw, _ = weights(T.Q4_K, 4, 512)
    w = pack(T.Q4_K, raw, 4, 512)
    x = np.zeros(512, np.float32)
    with pytest.raises(ValueError, match="n_cols=500"):
        pack(T.Q4_K, raw, 4, 500)
    with pytest.raises(ValueError, match="1152 bytes"):
        pack(T.Q4_K, raw, 5, 512)
    with pytest.raises(TypeError, match="int8"):
        pack(T.Q4_K, raw.view(np.int8), 4, 512)
    with pytest.raises(ValueError, match="unsupported tensor type"):
        pack(T.Q8_1, raw, 4, 512)  # ggml's activation format, never stored in model files
    with pytest.raises(TypeError, match="float64"):
        matvec(w, x.astype(np.float64), np.empty(4, np.float32))
    with pytest.raises(ValueError, match=r"x has shape \(256,\)"):
        matvec(w, x[:256], np.empty(4, np.float32))
    with pytest.raises(ValueError, match=r"out has shape \(5,\)"):
        matvec(w, x, np.empty(5, np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        matvec(w, np.zeros(1024, np.float32)[::2], np.empty(4, np.float32))
    with pytest.raises(ValueError, match=r"out has shape \(4, 2\)"):
        matmul(w, np.zeros((2, 512), np.float32), np.empty((4, 2), np.float32))
    with pytest.raises(ValueError, match="no tokens"):
        matmul(w, np.zeros((0, 512), np.float32), np.empty((0, 4), np.float32))
    with pytest.raises(ValueError, match="scratch"):
        matmul(w, np.zeros((2, 512), np.float32), np.empty((2, 4), np.float32), scratch=np.empty((2, 8, 8), np.float32))
    with pytest.raises(TypeError, match="PackedMatrix"):
        matvec(raw, x, np.empty(4, np.float32))


def test_every_required_format_has_kernels():
    required = {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_K, T.Q5_K, T.Q6_K}
    assert required <= set(KERNEL_FORMATS) <= set(FORMATS)
    # every format the table lists (and the loader therefore accepts) runs on the float path;
    # the formats of llama.cpp's presets are tested in test_quant_formats_llama
    assert set(float_kernels.FORMATS) == set(FORMATS)


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_float_formats_take_any_row_length(qtype):
    rng = np.random.default_rng(9)
    for rows, cols in ((3, 7), (10, 1000)):
        raw, W = weights(qtype, rows, cols)
        w = pack(qtype, raw, rows, cols)
        x = rng.standard_normal(cols).astype(np.float32)
        assert_close(matvec(w, x, np.empty(rows, np.float32))[None, :], W, x[None, :])
        X = rng.standard_normal((5, cols)).astype(np.float32)
        assert_close(matmul(w, X, np.empty((5, rows), np.float32)), W, X)
