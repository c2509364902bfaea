"""Numba Q2_K and Q3_K quantizers: bytes llama.cpp decodes as we do, RMSE within 2% of (in fact
below) llama.cpp's own C quantizer on the same rows, sane results on degenerate rows."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from quant import dequantize, row_bytes
from quant.kquant_q2q3 import quantize_q2_k, quantize_q3_k
from quant.reference import q3_k_scales
from tests.helpers.quant_data import rmse, weight_sets
from tests.helpers.quant_ggml import ggml_base, ggml_quantize
from tests.helpers.quant_llama import ggml_dequantize

QUANTIZE = {T.Q2_K: quantize_q2_k, T.Q3_K: quantize_q3_k}
needs_ggml = pytest.mark.skipif(ggml_base() is None, reason="llama-cpp-python (libggml) is not installed")


@needs_ggml
@pytest.mark.parametrize("qtype", QUANTIZE, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", ["gaussian", "heavy_tailed", "outliers", "shifted"])
def test_rmse_within_2_percent_of_llama_cpp(qtype, kind):
    x = weight_sets(64, 2048, seed=21)[kind]
    ours = rmse(dequantize(QUANTIZE[qtype](x), qtype, x.shape), x)
    theirs = rmse(dequantize(ggml_quantize(x, qtype), qtype, x.shape), x)
    assert ours <= 1.02 * theirs, f"{qtype.name} {kind}: rmse {ours:.4g} vs llama.cpp {theirs:.4g}"


@needs_ggml
@pytest.mark.parametrize("qtype", QUANTIZE, ids=lambda t: t.name)
def test_llama_cpp_decodes_our_bytes_as_we_do(qtype):
    """The byte layout is the one ggml reads: its dequantize_row_* gives our decoder's values."""
    x = weight_sets(8, 1024, seed=22)["outliers"]
    raw = QUANTIZE[qtype](x)
    assert raw.shape == (8, row_bytes(qtype, 1024)) and raw.dtype == np.uint8
    np.testing.assert_array_equal(ggml_dequantize(raw, qtype, 8, 1024), dequantize(raw, qtype, x.shape))


@pytest.mark.parametrize("qtype", QUANTIZE, ids=lambda t: t.name)
def test_degenerate_rows(qtype):
    """Zero, constant, one-spike, tiny and alternating rows quantize to finite values close to x."""
    x = np.zeros((6, 512), np.float32)
    x[1] = -0.75
    x[2, 300] = 5.0
    x[3] = np.random.default_rng(0).standard_normal(512) * 1e-3
    x[4] = np.where(np.arange(512) % 2 == 0, 1.0, -1.0)
    x[5, :256] = 0.125
    y = dequantize(QUANTIZE[qtype](x), qtype, x.shape)
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y[0], 0.0)
    np.testing.assert_allclose(y[[1, 4]], x[[1, 4]], rtol=0, atol=1e-3)  # two levels fit exactly
    assert abs(y[2, 300] - 5.0) < 0.05 and np.abs(np.delete(y[2], 300)).max() < 0.05
    scale = np.abs(x).max(axis=1, keepdims=True) + 1e-30
    assert np.all(np.abs(y - x) <= 0.35 * scale), np.abs(y - x).max(axis=1)


@needs_ggml
@pytest.mark.parametrize("qtype", QUANTIZE, ids=lambda t: t.name)
def test_tiny_rows_no_worse_than_llama_cpp(qtype):
    """Super-block scales below the f16 normal range (6e-5) lose precision in every quantizer."""
    x = (np.random.default_rng(1).standard_normal((4, 512)) * np.array([[1e-3], [1e-4], [1e-5], [1e-6]]))
    x = x.astype(np.float32)
    ours = dequantize(QUANTIZE[qtype](x), qtype, x.shape)
    theirs = dequantize(ggml_quantize(x, qtype), qtype, x.shape)
    for r in range(4):
        assert rmse(ours[r], x[r]) <= 1.02 * rmse(theirs[r], x[r]) + 1e-12, r


def test_q2_k_uses_mins_and_q3_k_uses_both_signs():
    """Q2_K data below zero needs a min (the decoder subtracts dmin * m) and gets one; Q3_K's
    scales take the sign that puts a sub-block's largest weight on the extra level -4."""
    rng = np.random.default_rng(4)
    x = np.abs(rng.standard_normal((2, 256))).astype(np.float32)
    x[1] -= 1.0
    raw = quantize_q2_k(x)
    assert np.all(raw[1, :16] >> 4 > 0) and np.all(raw[:, :16] & 15 > 0)
    raw3 = quantize_q3_k(np.stack([x[0], -x[0]]))
    sc = q3_k_scales(raw3[:, 96:108])
    d = raw3[:, 108:110].copy().view(np.float16).astype(np.float32)[:, 0]
    signed = d[:, None] * sc  # the decoded scale of every sub-block
    assert np.all(signed[0] < 0) and np.all(signed[1] > 0)


def test_quantize_is_deterministic_and_row_independent():
    x = weight_sets(33, 768, seed=13)["outliers"]
    for q in QUANTIZE.values():
        whole = q(x)
        np.testing.assert_array_equal(whole, q(x))
        np.testing.assert_array_equal(whole[17:18], q(x[17:18].copy()))
