"""Numba K-quant quantizers: decodable bytes, RMSE within 2% of llama.cpp's own C quantizer, and
Q4_K/Q5_K bytes equal to a plain numpy float32 reference (tests/helpers/kquant_reference.py)."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from quant import dequantize, kquant, quantize, row_bytes
from quant.reference import k_scale_min
from tests.helpers import kquant_reference
from tests.helpers.quant_data import golden_inputs, rmse, weight_sets
from tests.helpers.quant_ggml import ggml_base, ggml_quantize

KQUANTS = [T.Q4_K, T.Q5_K, T.Q6_K]
needs_ggml = pytest.mark.skipif(ggml_base() is None, reason="llama-cpp-python (libggml) is not installed")


@needs_ggml
@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", ["gaussian", "heavy_tailed", "outliers", "shifted"])
def test_rmse_within_2_percent_of_llama_cpp(qtype, kind):
    x = weight_sets(64, 2048, seed=11)[kind]
    ours = rmse(dequantize(quantize(x, qtype), qtype, x.shape), x)
    theirs = rmse(dequantize(ggml_quantize(x, qtype), qtype, x.shape), x)
    assert ours <= 1.02 * theirs, f"{qtype.name} {kind}: rmse {ours:.4g} vs llama.cpp {theirs:.4g}"


@needs_ggml
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0])
def test_simple_quantizers_equal_llama_cpp_bytes(qtype):
    x = weight_sets(8, 1024, seed=12)["heavy_tailed"]
    np.testing.assert_array_equal(quantize(x, qtype), ggml_quantize(x, qtype))


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_degenerate_rows(qtype):
    """Zero, constant, one-spike, tiny and alternating rows quantize to finite values close to x."""
    x = np.zeros((6, 512), np.float32)
    x[1] = -0.75
    x[2, 300] = 5.0
    x[3] = np.random.default_rng(0).standard_normal(512) * 1e-3
    x[4] = np.where(np.arange(512) % 2 == 0, 1.0, -1.0)
    x[5, :256] = 0.125
    raw = quantize(x, qtype)
    assert raw.shape == (6, row_bytes(qtype, 512))
    y = dequantize(raw, qtype, x.shape)
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y[0], 0.0)
    scale = np.abs(x).max(axis=1, keepdims=True) + 1e-30
    assert np.all(np.abs(y - x) <= 0.07 * scale), np.abs(y - x).max(axis=1)


@needs_ggml
@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_tiny_rows_no_worse_than_llama_cpp(qtype):
    """Sub-block scales below the f16 normal range (6e-5) lose precision in every quantizer."""
    x = (np.random.default_rng(1).standard_normal((4, 512)) * np.array([[1e-4], [1e-5], [1e-6], [1e-7]]))
    x = x.astype(np.float32)
    ours = dequantize(quantize(x, qtype), qtype, x.shape)
    theirs = dequantize(ggml_quantize(x, qtype), qtype, x.shape)
    for r in range(4):
        assert rmse(ours[r], x[r]) <= 1.02 * rmse(theirs[r], x[r]) + 1e-12, r


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_K])
def test_scales_and_mins_are_used_sensibly(qtype):
    """Data below zero needs a min (the decoder subtracts dmin * m), and gets one."""
    rng = np.random.default_rng(4)
    x = np.abs(rng.standard_normal((2, 256))).astype(np.float32)
    x[1] -= 1.0
    raw = quantize(x, qtype)
    sc, mn = k_scale_min(raw[:, 4:16])
    assert np.all(mn[1] > 0) and np.all(sc > 0)


def test_quantize_is_deterministic_and_row_independent():
    x = weight_sets(33, 768, seed=13)["outliers"]
    for qtype in KQUANTS:
        whole = quantize(x, qtype)
        np.testing.assert_array_equal(whole, quantize(x, qtype))
        np.testing.assert_array_equal(whole[17:18], quantize(x[17:18].copy(), qtype))


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_K], ids=lambda t: t.name)
def test_affine_kquants_equal_the_numpy_reference(qtype):
    """The lanes' fits (pass 1) bit for bit, then the bytes, on skewed and degenerate rows
    (zero, constant, one-signed, -0.0, tiny, integer-valued sub-blocks) and heavy tails."""
    nbits = 4 if qtype == T.Q4_K else 5
    sets = golden_inputs() + [weight_sets(8, 1024, seed=14)[k] for k in ("outliers", "heavy_tailed")]
    for i, x in enumerate(sets):
        scales = np.empty((x.shape[0], x.shape[1] // 32), np.float32)
        mins = np.empty_like(scales)
        kquant.fit_affine_subblocks(x, *kquant_reference.STEPS[nbits], scales, mins)
        want_s, want_m = kquant_reference.fit(x.reshape(-1, 32), nbits)
        np.testing.assert_array_equal(scales.reshape(-1).view(np.uint32), want_s.view(np.uint32), err_msg=f"set {i}")
        np.testing.assert_array_equal(mins.reshape(-1).view(np.uint32), want_m.view(np.uint32), err_msg=f"set {i}")
        np.testing.assert_array_equal(quantize(x, qtype), kquant_reference.quantize(x, nbits), err_msg=f"set {i}")
