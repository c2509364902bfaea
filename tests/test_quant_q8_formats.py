"""The int8-activation kernels of the formats llama.cpp's low-bit presets write (Q2_K, Q3_K, ...),
against a float64 reference on gguf-py's dequantized weights and the int8-rounded activations.

Weights are random GGUF bytes (every code, scale and high-bit pattern occurs) with their f16
fields set to moderate values, so nothing depends on this project's quantizers or decoders:
gguf.quants.dequantize is the reference decoding.
"""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from quant import pack
from quant import int8_kernels as q8
from quant.int8_kernels import avx2, row_dot

# format: (bytes per block, weights per block, byte offsets of its f16 fields)
LAYOUT = {T.Q2_K: (84, 256, (80, 82)), T.Q3_K: (110, 256, (108,)), T.Q4_0: (18, 32, (0,)), T.Q4_1: (20, 32, (0, 2)),
          T.Q5_0: (22, 32, (0,)), T.Q5_1: (24, 32, (0, 2)), T.IQ4_NL: (18, 32, (0,)), T.IQ4_XS: (136, 256, (0,))}
NEW = list(LAYOUT)
LAYOUT.update({T.Q4_K: (144, 256, (0, 2)), T.Q8_0: (34, 32, (0,))})  # formats of before, to mix in
# one kernel of each kind for every test here, compiled once, not per format: the formats this file
# tests and those of before (the IQ1/IQ2/IQ3/TQ kernels are test_quant_q8_iq's; a set holding
# them too compiles their row code into every kernel here, for nothing)
ALL = q8.format_set(NEW + [T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0])
# (test_quant_q8.SET is the same set)


def weights(qtype, rows, cols, seed=0):
    """Random GGUF rows of qtype and their float64 values by gguf-py."""
    nbytes, per, halves = LAYOUT[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // per, nbytes), dtype=np.uint8)
    for off in halves:
        h = rng.uniform(-0.03, 0.03, (rows, cols // per)).astype(np.float16)
        raw[:, :, off:off + 2] = h.view(np.uint8).reshape(rows, cols // per, 2)
    raw = raw.reshape(rows, -1)
    return pack(qtype, raw, rows, cols), gguf_dequantize(raw, qtype).reshape(rows, cols).astype(np.float64)


def activations(n, cols, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, (n, cols)).astype(np.float32)
    x[0, cols - 256:] = np.where(np.arange(256) % 2, 1.0, -1.0)  # activations at +-127
    if n > 1:
        x[1, :256] = 0.0  # an all-zero block
    return x


def values(a):
    n, c = a.shape
    return (a.q.astype(np.float64).reshape(n, c // 256, 256) * a.d[:, :, None]).reshape(n, c)


def assert_close(got, W, xv):
    want = W @ xv
    bound = np.abs(W) @ np.abs(xv)
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= 2e-6 * bound + 1e-30), float((err / (bound + 1e-30)).max())


@pytest.mark.parametrize("qtype", NEW, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,cols", [(1, 512), (5, 256), (37, 1280)])
def test_matvec_against_reference(qtype, rows, cols):
    w, W = weights(qtype, rows, cols)
    a = q8.quantize_activations(activations(2, cols))
    for t in range(2):
        assert_close(q8.matvec(w, a, np.empty(rows, np.float32), token=t, formats=ALL), W, values(a)[t])


@pytest.mark.parametrize("qtype", NEW, ids=lambda t: t.name)
def test_portable_row_dot_is_the_kernels_bit_for_bit(qtype):
    """The loop hosts without AVX2 run: close to the reference, and on AVX2 hosts the same bits
    as the GEMV: the explicit-SIMD row dot, and on VNNI hosts the one-token 16-row steps for
    the first 32 of the 37 rows (the float steps are the same by construction)."""
    w, W = weights(qtype, 37, 1280, seed=3)
    a = q8.quantize_activations(activations(2, 1280))
    dot = row_dot.PORTABLE[int(qtype)]
    for t in range(2):
        port = np.array([dot(w.data[r], a.q[t], a.d[t], a.b[t]) for r in range(37)], np.float32)
        assert_close(port, W, values(a)[t])
        if avx2.AVAILABLE:
            np.testing.assert_array_equal(q8.matvec(w, a, np.empty(37, np.float32), token=t, formats=ALL), port)


@pytest.mark.parametrize("qtype", NEW, ids=lambda t: t.name)
@pytest.mark.parametrize("n,rows", [(1, 19), (3, 19), (4, 19), (9, 19), (17, 35)])
def test_matmul_rows_are_the_gemv_rows(qtype, n, rows):
    """Prefill's GEMM (16-row VNNI steps for Q2_K/Q3_K on AVX-512 VNNI hosts, 4-token row steps
    where the host has AVX2, else the row dot per token) gives each token the GEMV's bits, on odd
    row counts: groups of 16 and rows left over, 8-token passes and the shorter ones after them."""
    w, W = weights(qtype, rows, 768, seed=n)
    a = q8.quantize_activations(activations(n, 768, seed=n))
    gemm = q8.matmul if qtype in q8.GEMM_FORMATS else q8.matmul_rows
    # the kernels of the set ALL, as the other tests here: each format's own compiled 83 s for the
    # eight, the set's 45 s
    out = gemm(w, a, np.full((n, rows), np.nan, np.float32), formats=ALL)
    gemv = np.stack([q8.matvec(w, a, np.empty(rows, np.float32), token=t, formats=ALL) for t in range(n)])
    np.testing.assert_array_equal(out, gemv)
    for t in range(n):
        assert_close(out[t], W, values(a)[t])


def test_matvec_many_mixes_the_new_formats_with_the_old():
    mats = [weights(qt, 7 + 2 * i, 512, seed=i) for i, qt in enumerate(NEW + [T.Q4_K, T.Q8_0])]
    a = q8.quantize_activations(activations(1, 512))
    rows = sum(w.rows for w, _ in mats)
    out = q8.matvec_many([w for w, _ in mats], a, np.empty(rows, np.float32), formats=ALL)
    assert_close(out, np.concatenate([W for _, W in mats]), values(a)[0])


def _ref_ffn(W, xv, limit):
    gate, up, down = W
    g, u = gate @ xv, up @ xv
    act = g / (1 + np.exp(-g))
    if limit > 1e-6:
        act, u = np.minimum(act, limit), np.clip(u, -limit, limit)
    hidden = q8.quantize_activations((act * u).astype(np.float32))
    return down @ values(hidden)[0]


@pytest.mark.parametrize("kinds", [[T.Q2_K, T.IQ4_XS, T.Q5_0], pytest.param(NEW, marks=pytest.mark.slow)],
                         ids=["three", "all"])
def test_swiglu_ffns_with_the_new_formats(kinds):
    """New formats as gate/up and as down of the fused expert call (odd widths of 256s), in the
    kernel of the set ALL, as the other tests here."""
    H = 512
    specs = [(qt, kinds[(i + 1) % len(kinds)], 256 * (1 + 2 * (i % 2)), 0.5 + i, 4.0 * (i % 2))
             for i, qt in enumerate(kinds)]
    descs, refs, alive = [], [], []
    for i, (gu, dn, inter, weight, limit) in enumerate(specs):
        (g, Gd), (u, Ud), (d, Dd) = (weights(gu, inter, H, 10 * i), weights(gu, inter, H, 10 * i + 1),
                                     weights(dn, H, inter, 10 * i + 2))
        alive += [g, u, d]
        descs.append(q8.ffn_descriptor(g, u, d))
        refs.append(((Gd, Ud, Dd), weight, limit))
    x = 0.2 * activations(1, H)[0]  # gate values of a few units: SwiGLU neither vanishes nor overflows
    out = np.full(H, 0.5, np.float32)
    q8.swiglu_ffns(np.stack(descs), np.array([r[1] for r in refs], np.float32),
                   np.array([r[2] for r in refs], np.float32), x, out,
                   q8.ffn_scratch(H, len(specs), sum(s[2] for s in specs)), formats=ALL)
    xv = values(q8.quantize_activations(x))[0]
    want = 0.5 + sum(wt * _ref_ffn(W, xv, lim) for W, wt, lim in refs)
    err = np.abs(out - want)
    assert err.max() <= 1e-5 * np.abs(want).max(), err.max()


@pytest.mark.parametrize("qtype", NEW, ids=lambda t: t.name)
def test_supported_on_rows_of_256_multiples_only(qtype):
    assert q8.supports(qtype, 512) and not q8.supports(qtype, 32 * 9)


def test_format_tables_agree_with_gguf():
    """Every int8 format has a bit of its own, a row dot, a 4-token step where the host has AVX2,
    and the bytes per 256 columns gguf-py's block sizes give."""
    from gguf import GGML_QUANT_SIZES

    from quant.int8_kernels.dispatch import BYTES_PER_256

    bits = [q8.FORMAT_BIT[int(t)] for t in q8.FORMATS]
    assert len(set(bits)) == len(bits) and all(b & (b - 1) == 0 for b in bits)
    for t in q8.FORMATS:
        per, nbytes = GGML_QUANT_SIZES[t]
        assert BYTES_PER_256[int(t)] == 256 // per * nbytes, t.name
        assert int(t) in row_dot.PORTABLE
    assert set(q8.GEMM_FORMATS) == (set(q8.FORMATS) if avx2.AVAILABLE else set())

