"""The int8-activation kernels of the code-book (IQ1, IQ2, IQ3) and ternary (TQ1_0, TQ2_0) formats,
against a float64 reference on gguf-py's dequantized weights and the int8-rounded activations.

Weights are random GGUF bytes (every grid row, sign pattern, scale and delta bit occurs) with
their f16 fields set to moderate values, so nothing depends on this project's decoders:
gguf.quants.dequantize is the reference decoding. The GEMVs are compiled for one format set
(ALL: theirs and Q4_K), the GEMMs for another (NEW_SET), so the module compiles
each kind once.
"""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from quant import int8_kernels as q8
from quant import pack
from quant.int8_kernels import row_dot
from tests.test_quant_q8_formats import activations, assert_close, values

# format: byte offsets of its f16 fields in a 256-weight block (IQ1_M: its d is spread over the
# top nibbles of its four u16 scales, set by _iq1m_d)
HALVES = {T.IQ2_XXS: (0,), T.IQ2_XS: (0,), T.IQ2_S: (0,), T.IQ3_XXS: (0,), T.IQ3_S: (0,), T.IQ1_S: (0,),
          T.IQ1_M: (), T.TQ1_0: (52,), T.TQ2_0: (64,)}
NEW = list(HALVES)
ALL = q8.format_set(NEW + [T.Q4_K])  # the GEMVs' (Q4_K: the format they are mixed with)
NEW_SET = q8.format_set(NEW)  # the GEMMs' (ALL's GEMM, every format's 4-token steps, compiles for 20 s)


def _iq1m_d(raw, d):
    """Write f16 d [rows, blocks] into IQ1_M blocks raw [rows, blocks, 56]: nibble i of d is the
    top nibble of the u16 scale i (bytes 48 .. 56)."""
    sc = raw[:, :, 48:56].copy().view(np.uint16) & np.uint16(0x0FFF)
    bits = d.view(np.uint16)
    for i in range(4):
        sc[:, :, i] |= ((bits >> np.uint16(4 * i)) & np.uint16(15)) << np.uint16(12)
    raw[:, :, 48:56] = sc.view(np.uint8)


def weights(qtype, rows, cols, seed=0):
    """Random GGUF rows of qtype (Q4_K too, to mix in) and their float64 values by gguf-py."""
    per, nbytes = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // per, nbytes), dtype=np.uint8)
    for off in HALVES.get(qtype, (0, 2)):
        h = rng.uniform(-0.03, 0.03, (rows, cols // per)).astype(np.float16)
        raw[:, :, off:off + 2] = h.view(np.uint8).reshape(rows, cols // per, 2)
    if qtype == T.IQ1_M:
        _iq1m_d(raw, rng.uniform(-0.03, 0.03, (rows, cols // per)).astype(np.float16))
    raw = raw.reshape(rows, -1)
    return pack(qtype, raw, rows, cols), gguf_dequantize(raw, qtype).reshape(rows, cols).astype(np.float64)


@pytest.mark.parametrize("qtype", NEW, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,cols", [(1, 256), (5, 512), (37, 1280)])
def test_matvec_against_reference(qtype, rows, cols):
    """The GEMV is close to the reference and is the format's row dot, bit for bit."""
    w, W = weights(qtype, rows, cols, seed=rows)
    a = q8.quantize_activations(activations(3, cols, seed=rows))  # token 2: no zero or +-1 block
    dot = row_dot.PORTABLE[int(qtype)]
    for t in range(3):
        got = q8.matvec(w, a, np.empty(rows, np.float32), token=t, formats=ALL)
        assert_close(got, W, values(a)[t])
        np.testing.assert_array_equal(got, [dot(w.data[r], a.q[t], a.d[t], a.b[t]) for r in range(rows)])


@pytest.mark.parametrize("qtype", NEW, ids=lambda t: t.name)
def test_gemm_rows_are_the_gemv_rows(qtype):
    """Prefill's GEMMs give each token the GEMV's bits: matmul_rows (each token through the row
    dot), and on AVX2 hosts q8.matmul (IQ1/IQ2/IQ3: 8-token steps, a last group of 2-7 tokens
    padded to 8, one token left alone; TQ: 4-token steps, then one token); without AVX2,
    q8.matmul refuses them and names the kernel that takes them."""
    for n in (9, 13, 14):  # IQ3_S on VNNI hosts: 16-row steps of 8, 4, 2 and 1 tokens, 3 rows left over
        _gemm_rows_are_the_gemv_rows(qtype, n)


def _gemm_rows_are_the_gemv_rows(qtype, n):
    w, W = weights(qtype, 19, 768, seed=n)
    a = q8.quantize_activations(activations(n, 768, seed=n))
    gemv = np.stack([q8.matvec(w, a, np.empty(19, np.float32), token=t, formats=ALL) for t in range(n)])
    out = q8.matmul_rows(w, a, np.full((n, 19), np.nan, np.float32), formats=NEW_SET)
    np.testing.assert_array_equal(out, gemv)
    for t in range(n):
        assert_close(out[t], W, values(a)[t])
    if qtype in q8.GEMM_FORMATS:
        out = q8.matmul(w, a, np.full((n, 19), np.nan, np.float32), formats=NEW_SET)
        np.testing.assert_array_equal(out, gemv)
    else:
        with pytest.raises(ValueError, match=f"no int8-activation GEMM for {qtype.name}.*matmul_rows"):
            q8.matmul(w, a, np.empty((n, 19), np.float32), formats=NEW_SET)


def test_avx2_row_steps_where_the_host_has_avx2():
    from quant.int8_kernels import avx2, iq_avx2, ternary

    simd = {T(c) for c in (*iq_avx2.SIMD4, *ternary.SIMD4)}
    assert simd == set(NEW) == {T(c) for c in (*iq_avx2.SIMD, *ternary.SIMD)}
    assert (simd <= set(q8.GEMM_FORMATS)) == avx2.AVAILABLE


def test_runtime_products_take_the_int8_path():
    """A model's matrices of these formats run on int8 activations (runtime.model.matrix): its
    int8 set holds them, and a chunk's rows are the one-token GEMV's (kernels compiled for
    another format set give the same bits: test_quant_q8)."""
    from runtime.model.matrix import int8_applies, make_matrix, matmul

    x = activations(3, 512, seed=4)
    a = q8.quantize_activations(x)
    for i, qt in enumerate(NEW):
        w, W = weights(qt, 7, 512, seed=20 + i)
        m = make_matrix(f"blk.0.ffn_gate_exps.{qt.name}", qt, (7, 512), np.asarray(w.data))
        assert int8_applies(m, NEW_SET) and not int8_applies(m, q8.format_set([T.Q4_K]))
        chunk = matmul(x, m, NEW_SET)
        for t in range(3):
            np.testing.assert_array_equal(chunk[t], q8.matvec(w, a, np.empty(7, np.float32), token=t, formats=ALL))
            assert_close(chunk[t], W, values(a)[t])


def test_matvec_many_mixes_every_new_format_with_q4_k():
    mats = [weights(qt, 3 + 2 * i, 512, seed=40 + i) for i, qt in enumerate(NEW + [T.Q4_K])]
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


def test_swiglu_ffns_mixes_new_formats_with_q4_k():
    """The fused expert call with IQ2_XXS and TQ1_0 as gate/up and as down, next to Q4_K ones
    (odd widths of 256s), compiled for ALL (its GEMVs are the module's, already built)."""
    H = 512
    specs = [(T.IQ2_XXS, T.Q4_K, 256, 0.5, 0.0), (T.Q4_K, T.TQ1_0, 768, 1.5, 4.0),
             (T.TQ1_0, T.IQ2_XXS, 256, -0.75, 0.0)]
    descs, refs, alive = [], [], []
    for i, (gu, dn, inter, weight, limit) in enumerate(specs):
        (g, Gd), (u, Ud), (d, Dd) = (weights(gu, inter, H, 10 * i), weights(gu, inter, H, 10 * i + 1),
                                     weights(dn, H, inter, 10 * i + 2))
        alive += [g, u, d]
        descs.append(q8.ffn_descriptor(g, u, d))
        refs.append(((Gd, Ud, Dd), weight, limit))
    assert all(d is not None for d in descs)
    x = 0.2 * activations(1, H)[0]
    out = np.full(H, 0.5, np.float32)
    q8.swiglu_ffns(np.stack(descs), np.array([r[1] for r in refs], np.float32),
                   np.array([r[2] for r in refs], np.float32), x, out,
                   q8.ffn_scratch(H, len(specs), sum(s[2] for s in specs)), formats=ALL)
    xv = values(q8.quantize_activations(x))[0]
    want = 0.5 + sum(wt * _ref_ffn(W, xv, lim) for W, wt, lim in refs)
    err = np.abs(out - want)
    assert err.max() <= 1e-5 * np.abs(want).max(), err.max()


@pytest.mark.parametrize("qtype", NEW, ids=lambda t: t.name)
def test_supported_on_rows_of_256_multiples(qtype):
    assert q8.supports(qtype, 512) and not q8.supports(qtype, 0)


_NO_AVX = """
import numpy as np
from gguf import GGMLQuantizationType as T
from quant import int8_kernels as q8
from quant.int8_kernels import avx2
import test_quant_q8_formats as f
import test_quant_q8_iq as iq
assert not avx2.AVAILABLE and not q8.GEMM_FORMATS
LOW, CODE_BOOK = (T.Q3_K, T.Q5_0, T.IQ4_XS), (T.IQ2_XXS, T.IQ1_M, T.TQ1_0)
SET = q8.format_set(LOW + CODE_BOOK)  # one GEMV and one matmul_rows for all six
a = q8.quantize_activations(f.activations(3, 512))
for qtype in LOW + CODE_BOOK:
    w, W = (f if qtype in LOW else iq).weights(qtype, 7, 512, seed=2)
    for k in range(3):
        f.assert_close(q8.matvec(w, a, np.empty(7, np.float32), token=k, formats=SET), W, f.values(a)[k])
    rows = q8.matmul_rows(w, a, np.empty((3, 7), np.float32), formats=SET)
    f.assert_close(rows[2], W, f.values(a)[2])
print("ok")
"""


@pytest.mark.slow
def test_hosts_without_avx_run_the_portable_loops_in_the_kernels(tmp_path):
    """Numba targeting a CPU without AVX: the kernels are built from the portable row dots (the
    AVX2 intrinsics never reach LLVM, which would abort) and still match the reference, for
    formats of both kernel files: the low-bit ones of test_quant_q8_formats and the code-book
    and ternary ones here. One process and one format set for all six (a process and a set per
    file took 44 s of the suite's CPU)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_ENABLE_AVX": "0", "NUMBA_CACHE_DIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__)),
                                          os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", _NO_AVX], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr[-2000:]
