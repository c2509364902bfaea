"""The format table and the numpy reference codecs, checked bit for bit against gguf-py."""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import quant
from quant import FORMATS, check_row, dequantize, quantize, row_bytes
from tests.helpers.quant_data import weight_sets
from tests.helpers.quant_llama import finite_blocks

ALL = list(FORMATS)
REQUIRED = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_K, T.Q5_K, T.Q6_K]
GGUF_QUANTIZERS = [T.Q8_0, T.Q4_0, T.BF16, T.MXFP4, T.F16, T.F32, T.Q4_1, T.Q5_0, T.Q5_1, T.TQ1_0, T.TQ2_0]
QUANTIZABLE = [*GGUF_QUANTIZERS, T.Q4_K, T.Q5_K, T.Q6_K]


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def test_table_covers_required_formats_and_matches_gguf_sizes():
    for qtype in REQUIRED:
        assert qtype in FORMATS
    for qtype, fmt in FORMATS.items():
        assert (fmt.block_size, fmt.block_bytes) == gguf.GGML_QUANT_SIZES[qtype]
        assert fmt.name == qtype.name and fmt.layout
    assert FORMATS[T.Q4_K].bits_per_weight == 4.5


def test_row_bytes_and_check_row():
    assert row_bytes(T.Q4_K, 4096) == 16 * 144
    assert row_bytes(T.Q8_0, 1280) == 40 * 34
    assert row_bytes(T.F32, 7) == 28
    assert row_bytes(int(T.Q6_K), 256) == 210  # integer ids work too
    with pytest.raises(ValueError, match="n_cols=1000"):
        check_row(T.Q4_K, 1000)
    with pytest.raises(ValueError, match="n_cols=0"):
        row_bytes(T.Q4_0, 0)
    assert row_bytes(T.Q2_K, 512) == 2 * 84 and row_bytes(T.Q5_0, 64) == 2 * 22
    with pytest.raises(ValueError, match="unsupported tensor type"):
        row_bytes(T.Q8_1, 256)  # ggml's activation format, never stored in model files


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_dequantize_random_bytes_bit_exact(qtype):
    """Any byte pattern, NaN and infinite scales included, decodes exactly as gguf-py does."""
    rng = np.random.default_rng(int(qtype))
    cols = 2 * FORMATS[qtype].block_size * (256 // FORMATS[qtype].block_size or 1)
    raw = rng.integers(0, 256, size=(5, row_bytes(qtype, cols)), dtype=np.uint8)
    with np.errstate(all="ignore"):
        want = gguf.quants.dequantize(raw, qtype)
        got = dequantize(raw, qtype, (5, cols))
    assert got.dtype == np.float32 and got.shape == (5, cols)
    np.testing.assert_array_equal(bits(got), bits(want))


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_dequantize_real_quantized_weights_bit_exact(qtype):
    x = weight_sets(6, 512, seed=3)["outliers"]
    raw = quantize(x, qtype) if qtype in QUANTIZABLE else finite_blocks(np.random.default_rng(7), qtype, 6, 512)
    with np.errstate(all="ignore"):
        want = gguf.quants.dequantize(raw, qtype)
    got = dequantize(raw.reshape(-1), qtype, (2, 3, 512))  # any shape, any byte layout of the rows
    np.testing.assert_array_equal(bits(got.reshape(6, 512)), bits(want))


@pytest.mark.parametrize("qtype", GGUF_QUANTIZERS, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", ["gaussian", "heavy_tailed", "outliers", "shifted"])
def test_quantize_matches_gguf_bit_exact(qtype, kind):
    x = weight_sets(16, 1024, seed=1)[kind]
    want = np.asarray(gguf.quants.quantize(x, qtype)).view(np.uint8).reshape(16, -1)
    got = quantize(x, qtype)
    assert got.dtype == np.uint8 and got.shape == (16, row_bytes(qtype, 1024))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("qtype", GGUF_QUANTIZERS, ids=lambda t: t.name)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # 3e4 * N(0,1) exceeds f16
def test_quantize_edge_values_match_gguf(qtype):
    """Zero blocks, exact rounding ties, sign changes, tiny and huge magnitudes."""
    rng = np.random.default_rng(5)
    x = np.zeros((6, 256), np.float32)
    x[1] = (np.arange(256) % 32 - 15.5) / 4                        # halves everywhere
    x[2] = rng.integers(-127, 128, 256) * np.float32(0.5) + 0.25    # Q8_0 ties after scaling
    x[3] = rng.standard_normal(256) * 1e-6
    x[4] = rng.standard_normal(256) * 3e4
    x[5, ::3] = -1.0
    want = np.asarray(gguf.quants.quantize(x, qtype)).view(np.uint8).reshape(6, -1)
    np.testing.assert_array_equal(quantize(x, qtype), want)


def test_bf16_nan_inf_and_rounding_match_gguf():
    special = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8,
                        3.3895314e38, 1e-40], np.float32)
    payload = np.array([0x7F800001, 0xFFC12345], np.uint32).view(np.float32)
    x = np.concatenate([special, payload]).reshape(1, -1)
    want = np.asarray(gguf.quants.quantize(x, T.BF16)).view(np.uint8).reshape(1, -1)
    np.testing.assert_array_equal(quantize(x, T.BF16), want)


@pytest.mark.parametrize("qtype", REQUIRED, ids=lambda t: t.name)
def test_round_trip_error_is_small(qtype):
    x = weight_sets(8, 512, seed=2)["gaussian"]
    y = dequantize(quantize(x, qtype), qtype, x.shape)
    rel = np.sqrt(np.mean((y - x) ** 2) / np.mean(x ** 2))
    limit = {T.F32: 0, T.F16: 1e-3, T.BF16: 5e-3, T.Q8_0: 1e-2, T.Q6_K: 3e-2,
             T.Q5_K: 6e-2, T.Q4_K: 0.12, T.Q4_0: 0.15}[qtype]
    assert rel <= limit


def test_argument_errors_name_the_value():
    x = np.zeros((2, 256), np.float32)
    with pytest.raises(TypeError, match="float64"):
        quantize(x.astype(np.float64), T.Q8_0)
    with pytest.raises(ValueError, match=r"\(256,\)"):
        quantize(x[0], T.Q8_0)
    with pytest.raises(ValueError, match="n_cols=100"):
        quantize(np.zeros((2, 100), np.float32), T.Q4_K)
    with pytest.raises(ValueError, match="no quantizer for IQ4_XS"):
        quantize(x, T.IQ4_XS)
    with pytest.raises(ValueError, match="no quantizer for IQ4_NL: stepstream reads IQ4_NL but does not write it"):
        quantize(x, T.IQ4_NL)
    raw = quantize(x, T.Q8_0)
    with pytest.raises(ValueError, match="544 bytes"):
        dequantize(raw, T.Q8_0, (3, 256))
    with pytest.raises(TypeError, match="int8"):
        dequantize(raw.view(np.int8), T.Q8_0, (2, 256))


def test_package_reexports():
    assert quant.quantize is quantize and quant.dequantize is dequantize
    assert quant.row_bytes is row_bytes and quant.FORMATS is FORMATS
