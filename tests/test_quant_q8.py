"""The int8-activation kernels (quant.int8_kernels) against float64 references.

References use the dequantized weights (gguf.quants) and the values the int8 activations
stand for, so the only allowed difference is float32 rounding. Where the host has AVX2 the
kernels run the explicit-SIMD row dots; the portable ones are checked here directly too.
"""

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from quant import dequantize, pack, quantize
from quant import int8_kernels as q8
from quant.int8_kernels import avx2, avx512_vnni, row_dot

FORMATS = [T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0]
# The format set the per-format tests' kernels are compiled for: one kernel of each kind for
# them all (each format's own took 46 s to compile in the suite; kernels of any set that holds
# a matrix's format give the same numbers: test_kernels_for_a_format_set_give_the_same_numbers).
# The set of test_quant_q8_formats.py, so that a worker running both compiles it once.
SET = q8.format_set([T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.IQ4_NL,
                     T.IQ4_XS])
ROWS = [1, 5, 37]
COLS = [256, 1280]


def weights(qtype, rows, cols, seed=0, scale=0.05):
    rng = np.random.default_rng(seed)
    x = (scale * rng.standard_t(4, (rows, cols)) * np.exp(rng.standard_normal((rows, 1)))).astype(np.float32)
    raw = quantize(x, qtype)
    return pack(qtype, raw, rows, cols), dequantize(raw, qtype, (rows, cols)).astype(np.float64)


def activations(n, cols, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, (n, cols)).astype(np.float32)
    x[:, 3] = 0.0
    if n > 1:
        x[1, :256] = 0.0  # an all-zero block
    return x


def values(a: q8.Q8Activations) -> np.ndarray:
    n, c = a.shape
    return (a.q.astype(np.float64).reshape(n, c // 256, 256) * a.d[:, :, None]).reshape(n, c)


def assert_close(got, W, xv):
    want = W @ xv
    bound = np.abs(W) @ np.abs(xv)
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= 2e-6 * bound + 1e-30), float((err / (bound + 1e-30)).max())


def test_quantize_activations_matches_numpy():
    x = activations(3, 1280)
    a = q8.quantize_activations(x)
    blocks = x.reshape(3, -1, 256)
    amax = np.abs(blocks).max(-1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(blocks * inv[:, :, None]).astype(np.int8)
    np.testing.assert_array_equal(a.q, q.reshape(3, -1))
    np.testing.assert_allclose(a.d, amax / np.float32(127), rtol=1e-7)
    np.testing.assert_array_equal(a.b, q.reshape(3, -1, 16).astype(np.int32).sum(-1).reshape(3, -1))
    assert np.all(np.abs(a.q) <= 127)
    assert np.all(a.d[1, 0] == 0) and np.all(a.q[1, :256] == 0)
    # rounding error at most half a step
    assert np.all(np.abs(values(a) - x) <= np.repeat(a.d, 256, 1) * 0.5000001 + 1e-7)


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("cols", COLS)
def test_matvec(qtype, rows, cols):
    w, W = weights(qtype, rows, cols)
    a = q8.quantize_activations(activations(2, cols))
    for t in range(2):
        out = q8.matvec(w, a, np.empty(rows, np.float32), token=t, formats=SET)
        assert_close(out, W, values(a)[t])


@numba.njit(cache=False)
def _portable(qtype, w, xq, xd, xb, out):
    for r in range(w.shape[0]):
        if qtype == row_dot.Q4_K:
            out[r] = row_dot.q8dot_q4_k(w[r], xq, xd, xb)
        elif qtype == row_dot.Q6_K:
            out[r] = row_dot.q8dot_q6_k(w[r], xq, xd, xb)
        elif qtype == row_dot.Q5_K:
            out[r] = row_dot.q8dot_q5_k(w[r], xq, xd, xb)
        else:
            out[r] = row_dot.q8dot_q8_0(w[r], xq, xd, xb)


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_portable_row_dots(qtype):
    """The loops used where the host has no AVX2."""
    w, W = weights(qtype, 37, 1280, seed=3)
    a = q8.quantize_activations(activations(1, 1280))
    out = np.empty(37, np.float32)
    _portable(int(qtype), w.data, a.q[0], a.d[0], a.b[0], out)
    assert_close(out, W, values(a)[0])


@pytest.mark.skipif(not avx2.AVAILABLE, reason="host has no AVX2")
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_simd_rows_equal_portable_rows(qtype):
    """Both compute the same integers; only the float32 sum per super-block may differ."""
    w, _ = weights(qtype, 64, 2048, seed=4, scale=1.0)
    a = q8.quantize_activations(activations(1, 2048) * 40)
    simd = q8.matvec(w, a, np.empty(64, np.float32), formats=SET)
    port = np.empty(64, np.float32)
    _portable(int(qtype), w.data, a.q[0], a.d[0], a.b[0], port)
    np.testing.assert_allclose(simd, port, rtol=1e-5, atol=1e-5 * np.abs(port).max())


def _extreme_q8_0(rows, cols, seed):
    """Q8_0 rows with every code -128 .. 127 (the quantizer never writes -128, a file may) and
    a few all-zero blocks: the sign trick must hold at the ends of the range."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // 32, 34), dtype=np.uint8)
    raw[:, :, :2] = np.frombuffer(rng.uniform(-0.02, 0.02, (rows, cols // 32)).astype(np.float16).tobytes(),
                                  np.uint8).reshape(rows, cols // 32, 2)
    raw[:, 0, 2:] = 0x80  # -128
    raw[::3, 1, 2:] = 0
    raw = raw.reshape(rows, -1)
    return pack(T.Q8_0, raw, rows, cols), dequantize(raw, T.Q8_0, (rows, cols)).astype(np.float64)


@pytest.mark.skipif(not avx2.AVAILABLE, reason="host has no AVX2")
@pytest.mark.parametrize("qtype", [T.Q5_K, T.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 37])
def test_simd_rows_are_the_portable_rows_bit_for_bit(qtype, rows):
    """The AVX2 Q5_K and Q8_0 row dots make the portable loops' roundings: the same bits, and
    close to the float64 reference, on odd row counts and activations at +-127."""
    w, W = weights(qtype, rows, 1280, seed=6, scale=1.0) if qtype == T.Q5_K else _extreme_q8_0(rows, 1280, 6)
    x = activations(2, 1280) * 40
    x[0, 256:512] = np.where(np.arange(256) % 2, 1.0, -1.0)  # every activation +-127
    a = q8.quantize_activations(x)
    for t in range(2):
        simd = q8.matvec(w, a, np.empty(rows, np.float32), token=t, formats=SET)
        port = np.empty(rows, np.float32)
        _portable(int(qtype), w.data, a.q[t], a.d[t], a.b[t], port)
        np.testing.assert_array_equal(simd, port)
        assert_close(simd, W, values(a)[t])


def test_matvec_many_mixes_formats_and_sizes():
    mats = [weights(qt, r, 512, seed=i) for i, (qt, r) in enumerate([(T.Q4_K, 7), (T.Q6_K, 1), (T.Q8_0, 33),
                                                                     (T.Q5_K, 16)])]
    a = q8.quantize_activations(activations(1, 512))
    out = q8.matvec_many([w for w, _ in mats], a, np.empty(57, np.float32))
    assert_close(out, np.concatenate([W for _, W in mats]), values(a)[0])


def test_group_gemv_reads_each_matrix_own_columns():
    """gemv's col0: matrix m multiplies columns col0[m] .. col0[m] + its own width of one long
    activation vector (how swiglu_ffns runs every down matrix in one call), each against float64."""
    specs = [(T.Q4_K, 40, 1280, 0), (T.Q6_K, 3, 256, 1280), (T.Q8_0, 17, 512, 256), (T.Q5_K, 32, 2048, 1536)]
    mats = [weights(qt, r, c, seed=i) for i, (qt, r, c, _) in enumerate(specs)]
    a = q8.quantize_activations(activations(1, 3584))
    ws = [w for w, _ in mats]
    qt = np.array([int(w.qtype) for w in ws], np.int64)
    addr = np.array([w.data.ctypes.data for w in ws], np.int64)
    rb = np.array([w.data.shape[1] for w in ws], np.int64)
    starts = np.concatenate([[0], np.cumsum([w.rows for w in ws])]).astype(np.int64)
    col0 = np.array([c0 for *_, c0 in specs], np.int64)
    out = np.full(int(starts[-1]), np.nan, np.float32)
    fs = q8.format_set(qt.tolist())
    q8.kernels(fs).gemv(qt, addr, rb, starts, col0, a.q[0], a.d[0], a.b[0], out, q8.step_addresses(fs))
    xv = values(a)[0]
    for m, ((_, W), (_, _, c, c0)) in enumerate(zip(mats, specs)):
        assert_close(out[starts[m]:starts[m + 1]], W, xv[c0:c0 + c])


def _ref_ffn(W, xv, limit):
    gate, up, down = W
    g, u = gate @ xv, up @ xv
    act = g / (1 + np.exp(-g))
    if limit > 1e-6:
        act, u = np.minimum(act, limit), np.clip(u, -limit, limit)
    hidden = q8.quantize_activations((act * u).astype(np.float32))
    return down @ values(hidden)[0]


def test_swiglu_ffns_against_reference():
    H = 512
    specs = [(T.Q4_K, T.Q6_K, 256, 0.7, 0.0), (T.Q6_K, T.Q4_K, 768, 1.3, 0.4), (T.Q8_0, T.Q5_K, 512, -0.2, 7.0)]
    descs, refs, alive = [], [], []  # the descriptors hold addresses: keep their matrices alive
    for i, (gu, dn, inter, weight, limit) in enumerate(specs):
        (g, Gd), (u, Ud), (d, Dd) = (weights(gu, inter, H, 10 * i), weights(gu, inter, H, 10 * i + 1),
                                     weights(dn, H, inter, 10 * i + 2))
        alive += [g, u, d]
        descs.append(q8.ffn_descriptor(g, u, d))
        refs.append(((Gd, Ud, Dd), weight, limit))
    x = 3 * activations(1, H)[0]
    out = np.full(H, 0.5, np.float32)
    q8.swiglu_ffns(np.stack(descs), np.array([r[1] for r in refs], np.float32),
                   np.array([r[2] for r in refs], np.float32), x, out, q8.ffn_scratch(H, 4, 2048))
    xv = values(q8.quantize_activations(x))[0]
    want = 0.5 + sum(wt * _ref_ffn(W, xv, lim) for W, wt, lim in refs)
    err = np.abs(out - want)
    assert err.max() <= 1e-5 * np.abs(want).max(), err.max()


def test_errors():
    w, _ = weights(T.Q4_K, 4, 512)
    with pytest.raises(ValueError, match="multiple of 256"):
        q8.quantize_activations(np.zeros((1, 100), np.float32))
    with pytest.raises(TypeError, match="float32"):
        q8.quantize_activations(np.zeros((1, 256), np.float64))
    a = q8.quantize_activations(np.ones((1, 256), np.float32))
    with pytest.raises(ValueError, match="256 columns, W has 512"):
        q8.matvec(w, a, np.empty(4, np.float32))
    q40 = pack(T.F16, np.ones((4, 512), np.float16).view(np.uint8), 4, 512)
    with pytest.raises(ValueError, match="no int8-activation kernel"):
        q8.matvec(q40, q8.quantize_activations(np.ones((1, 512), np.float32)), np.empty(4, np.float32))
    with pytest.raises(ValueError, match="out must be"):
        q8.matvec(w, q8.quantize_activations(np.ones((1, 512), np.float32)), np.empty(5, np.float32))
    assert q8.supports(T.Q6_K, 1280) and not q8.supports(T.Q6_K, 1000) and not q8.supports(T.F16, 256)


@pytest.mark.skipif(not q8.GEMM_FORMATS, reason="no int8 GEMM on this host (needs AVX2)")
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
@pytest.mark.parametrize("n", [1, 2, 4, 7, 9, 17])  # below, at and across the 4- and 8-token steps
@pytest.mark.parametrize("rows,cols", [(37, 1280), (8, 256), (64, 768)])  # groups of 16 and rows left over
def test_matmul(qtype, n, rows, cols):
    w, W = weights(qtype, rows, cols, seed=5)
    a = q8.quantize_activations(activations(n, cols, seed=n))
    out = q8.matmul(w, a, np.full((n, rows), np.nan, np.float32), formats=SET)
    xv = values(a)
    for t in range(n):
        assert_close(out[t], W, xv[t])
    # each token's row is the GEMV's, to the bit: 4-token row steps (Q8_0), and the 16-row VNNI
    # steps (Q4_K, Q5_K, Q6_K) with the rows past the last group of 16 one at a time
    gemv = np.stack([q8.matvec(w, a, np.empty(rows, np.float32), token=t, formats=SET) for t in range(n)])
    np.testing.assert_array_equal(out, gemv)


@pytest.mark.skipif(not q8.GEMM_FORMATS, reason="no int8 GEMM on this host (needs AVX2)")
@pytest.mark.parametrize("qtype", FORMATS + [T.Q2_K, T.Q3_K, T.Q4_0, T.Q5_1], ids=lambda t: t.name)
def test_matmul_reads_nothing_past_the_last_row(qtype):
    """The weights end where a protected page starts, as a file's last tensor ends a memory map:
    the kernels (16-row loads, per-row scale reads) must not touch it."""
    import ctypes
    import mmap

    w, W = weights(qtype, 32, 512, seed=9)
    page = mmap.PAGESIZE
    size = -(-w.data.nbytes // page) * page
    buf = mmap.mmap(-1, size + page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mprotect(ctypes.c_void_p(base + size), page, 0) == 0, ctypes.get_errno()  # PROT_NONE
    arr = np.frombuffer(buf, np.uint8, count=size)
    arr[size - w.data.nbytes:] = w.data.ravel()
    tail = pack(qtype, arr[size - w.data.nbytes:].reshape(w.data.shape), 32, 512)
    for n in (1, 3, 8):
        a = q8.quantize_activations(activations(n, 512, seed=n))
        out = q8.matmul(tail, a, np.empty((n, 32), np.float32), formats=SET)
        for t in range(n):
            assert_close(out[t], W, values(a)[t])
    del arr, tail, out


def test_activations_must_be_contiguous():
    a = q8.quantize_activations(activations(4, 512))
    with pytest.raises(ValueError, match=r"q must be C-contiguous int8 \[N, C\]"):
        q8.Q8Activations(a.q[::2], a.d[::2], a.b[::2])
    with pytest.raises(ValueError, match=r"d must be C-contiguous float32 \[4, 2\]"):
        q8.Q8Activations(a.q, a.d[:, :1], a.b)


def test_matmul_refuses_formats_without_gemm(monkeypatch):
    """As on a host without AVX2, where no format has an int8 GEMM (matmul_rows serves them)."""
    monkeypatch.setattr(q8, "GEMM_FORMATS", ())
    w, _ = weights(T.Q8_0, 4, 256)
    with pytest.raises(ValueError, match="no int8-activation GEMM for Q8_0"):
        q8.matmul(w, q8.quantize_activations(np.ones((2, 256), np.float32)), np.empty((2, 4), np.float32))


def _q4_k_blocks(path, rows: int, cols: int) -> str:
    """Q4_K blocks of the (rows, cols) weights the subprocess scripts below draw first from
    default_rng(0), saved to ``path``: they quantize nothing themselves, since a process with its
    own cache or Numba target would compile the Q4_K encoder again (30-40 s of a cold run)
    for weights that are the same in every process."""
    x = (0.05 * np.random.default_rng(0).standard_normal((rows, cols))).astype(np.float32)
    np.save(path, quantize(x, T.Q4_K))
    return str(path)


_FALLBACK = """
import sys
import numpy as np
from gguf import GGMLQuantizationType as T
from quant import pack, dequantize
from quant import int8_kernels as q8
from quant.int8_kernels import avx2, avx512_vnni
assert not avx512_vnni.AVAILABLE
rng = np.random.default_rng(0)
x = (0.05 * rng.standard_normal((20, 256))).astype(np.float32)
raw = np.load(sys.argv[1])  # quantize(x, T.Q4_K), made by the test (see _q4_k_blocks)
w = pack(T.Q4_K, raw, 20, 256)
a = q8.quantize_activations(rng.standard_normal((3, 256)).astype(np.float32))
W = dequantize(raw, T.Q4_K, (20, 256)).astype(np.float64)
xv = (a.q.astype(np.float64).reshape(3, 1, 256) * a.d[:, :, None]).reshape(3, 256)
if q8.GEMM_FORMATS:
    out = q8.matmul(w, a, np.empty((3, 20), np.float32))
    assert np.abs(out - xv @ W.T).max() <= 1e-5 * np.abs(xv @ W.T).max()
print("ok", avx2.AVAILABLE)
if avx2.AVAILABLE:
    import test_quant_q8 as t
    for name, bits in t.vnni_row_dot_bits().items():
        print(name, bits)
"""

_VNNI_ROW_DOTS = (T.Q8_0, T.IQ4_NL, T.Q4_0, T.Q5_1)  # vpdpbusd on VNNI hosts, vpmaddubsw elsewhere


def vnni_row_dot_bits() -> dict:
    """The AVX2 row dots of _VNNI_ROW_DOTS on random GGUF rows, as hex of their float32 bits."""
    from tests.test_quant_q8_formats import activations as acts
    from tests.test_quant_q8_formats import weights as fmt_weights

    out = {}
    for qtype in _VNNI_ROW_DOTS:
        w, _ = fmt_weights(qtype, 9, 768, seed=4)
        a = q8.quantize_activations(acts(2, 768))
        dot = row_dot._SIMD[int(qtype)]
        got = np.array([[dot(w.data[r], a.q[k], a.d[k], a.b[k]) for r in range(9)] for k in range(2)], np.float32)
        out[qtype.name] = got.view(np.uint32).tobytes().hex()
    return out


@pytest.mark.parametrize("env", [{"NUMBA_CPU_FEATURES": "+avx2,+f16c,+fma,+avx,+sse4.2,+popcnt"},
                                 {"NUMBA_ENABLE_AVX": "0"}], ids=["features", "no-avx"])
@pytest.mark.slow
def test_hosts_without_vnni_fall_back(env, tmp_path):
    """A Numba target without AVX-512 VNNI (or without AVX) gets the other kernels, never an LLVM
    abort on the VNNI intrinsics. Without VNNI, the row dots that take vpdpbusd on VNNI hosts
    (IQ4_NL values and Q8_0 bytes as value + 128) take vpmaddubsw with the signs on the
    activations: the same exact integers, so the same bits as here."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(__file__)
    path = os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")])
    blocks = _q4_k_blocks(tmp_path / "q4_k.npy", 20, 256)
    r = subprocess.run([sys.executable, "-c", _FALLBACK, blocks], capture_output=True, text=True, timeout=600,
                       env={**os.environ, **env, "NUMBA_CACHE_DIR": str(tmp_path), "PYTHONPATH": path})
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr[-2000:]
    if "NUMBA_CPU_FEATURES" in env and avx2.AVAILABLE:
        # an AVX2 host without VNNI: the same bits as this host's row dots (both sums are exact)
        theirs = dict(line.split() for line in r.stdout.splitlines()[1:])
        assert theirs == vnni_row_dot_bits()


def q5k_step_bits(rows: np.ndarray, xq: np.ndarray, xs: np.ndarray, xd: np.ndarray) -> str:
    """Q5_K's one- and eight-token VNNI steps (step_library, called by address) on one group of
    16 GGUF rows, for tokens xq [8, C] (xs their 32-column sums, xd their scales), as hex of the
    results' float32 bits."""
    import ctypes

    from quant.int8_kernels import step_library

    addresses = step_library.addresses("q5_k")
    step = ctypes.CFUNCTYPE(None, *[ctypes.c_int64] * 11)
    got = []
    for slot, n_tok in ((step_library.STEP_TOKENS.index(1), 1), (step_library.STEP_TOKENS.index(8), 8)):
        out = np.zeros((n_tok, 16), np.float32)
        step(int(addresses[slot]))(rows.ctypes.data, rows.shape[1], rows.shape[1] // 176, xq.ctypes.data, xq.strides[0],
                                   xs.ctypes.data, xs.strides[0], xd.ctypes.data, xd.strides[0], out.ctypes.data,
                                   out.strides[0])
        got.append(out)
    return np.concatenate(got).view(np.uint32).tobytes().hex()


@pytest.mark.slow
@pytest.mark.skipif(not avx512_vnni.GFNI, reason="a VNNI host with GFNI is needed to turn GFNI off")
def test_vnni_hosts_without_gfni_give_the_same_q5k_bits(tmp_path):
    """Q5_K's steps move their fifth bits with one GFNI affine transform where the host has GFNI,
    and with byte shifts where it has VNNI but not GFNI (Cascade Lake): the same codes, so the
    same bits. The second is checked here by turning GFNI off in a child process, which compiles
    only the Q5_K steps."""
    import os
    import subprocess
    import sys

    from llvmlite import binding as llvm

    rng = np.random.default_rng(8)
    rows = weights(T.Q5_K, 16, 768, seed=8, scale=1.0)[0].data
    xq = rng.integers(-127, 128, (8, 768), dtype=np.int8)
    xs = xq.reshape(8, -1, 32).sum(axis=2, dtype=np.int16)
    xd = rng.uniform(0.001, 0.05, (8, 3)).astype(np.float32)
    np.savez(tmp_path / "in.npz", rows=rows, xq=xq, xs=xs, xd=xd)
    features = llvm.get_host_cpu_features().flatten().replace("+gfni", "-gfni")
    here = os.path.dirname(__file__)
    code = ("import numpy as np\nfrom quant.int8_kernels import avx512_vnni\nfrom test_quant_q8 import q5k_step_bits\n"
            "assert avx512_vnni.AVAILABLE and not avx512_vnni.GFNI\n"
            f"a = np.load({str(tmp_path / 'in.npz')!r})\n"
            "print(q5k_step_bits(a['rows'], a['xq'], a['xs'], a['xd']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "NUMBA_CPU_FEATURES": features, "NUMBA_CACHE_DIR": str(tmp_path),
                            "PYTHONPATH": os.pathsep.join([here, os.path.dirname(here)])})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == q5k_step_bits(rows, xq, xs, xd)


@pytest.mark.slow
@pytest.mark.skipif(avx512_vnni.AVAILABLE, reason="checked by test_gemm_steps_compile_once_then_load's processes")
def test_gemm_kernels_load_from_the_cache(tmp_path):
    """The GEMM drivers are found in Numba's cache by a second process (their cache key holds
    only picklable, stable values), so prefill never recompiles them after an install."""
    import os
    import subprocess
    import sys

    code = ("import numpy as np\nfrom gguf import GGMLQuantizationType as T\n"
            "from quant import int8_kernels as q8, pack, quantize\n"
            "w = pack(T.Q4_K, quantize(np.ones((20, 256), np.float32), T.Q4_K), 20, 256)\n"
            "q8.matmul(w, q8.quantize_activations(np.ones((3, 256), np.float32)), np.empty((3, 20), np.float32))\n"
            "print(sum(q8.kernels(q8.format_set([T.Q4_K])).gemm.stats.cache_hits.values()))\n")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-2000:]
    assert runs[1].stdout.strip() == "1", (runs[0].stdout, runs[1].stdout)


def test_kernels_for_a_format_set_give_the_same_numbers():
    """A kernel compiled for exactly its matrices' formats and one compiled for every format agree
    bit for bit; a set that leaves out a matrix's format is refused (its rows would be misread)."""
    everything = q8.format_set(q8.FORMATS)
    mats = [weights(qt, 9, 512, seed=i)[0] for i, qt in enumerate([T.Q6_K, T.Q4_K, T.Q8_0])]
    a = q8.quantize_activations(activations(1, 512))
    own = q8.matvec_many(mats, a, np.empty(27, np.float32))
    wide = q8.matvec_many(mats, a, np.empty(27, np.float32), formats=everything)
    np.testing.assert_array_equal(own, wide)
    with pytest.raises(ValueError, match="leaves out Q8_0"):
        q8.matvec_many(mats, a, np.empty(27, np.float32), formats=q8.format_set([T.Q4_K, T.Q6_K]))
    assert q8.format_set([T.Q4_K, T.F32]) == q8.FORMAT_BIT[int(T.Q4_K)]


def test_row_dot_switch_runs_from_python_too():
    from quant.int8_kernels.row_dot import q8dot

    w, W = weights(T.Q5_K, 1, 256)
    a = q8.quantize_activations(activations(1, 256))
    got = q8dot(q8.format_set([T.Q5_K]), int(T.Q5_K), w.data[0], a.q[0], a.d[0], a.b[0])
    assert_close(np.array([got]), W, values(a)[0])


_STEPS = """
import sys
import numpy as np
from gguf import GGMLQuantizationType as T
from quant import int8_kernels as q8, pack, dequantize
from quant.int8_kernels import step_library
rng = np.random.default_rng(0)
x = (0.05 * rng.standard_normal((37, 512))).astype(np.float32)
raw = np.load(sys.argv[1])  # quantize(x, T.Q4_K), made by the test (see _q4_k_blocks)
a = q8.quantize_activations(rng.standard_normal((11, 512)).astype(np.float32))
out = q8.matmul(pack(T.Q4_K, raw, 37, 512), a, np.empty((11, 37), np.float32))
W = dequantize(raw, T.Q4_K, (37, 512)).astype(np.float64)
xv = (a.q.astype(np.float64).reshape(11, 2, 256) * a.d[:, :, None]).reshape(11, 512)
want = xv @ W.T
assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max()
print(step_library.source, out.tobytes().hex()[:64],
      sum(q8.kernels(q8.format_set([T.Q4_K])).gemm.stats.cache_hits.values()))
"""


@pytest.mark.skipif(not avx512_vnni.AVAILABLE, reason="the VNNI steps compile only on AVX-512 VNNI hosts")
def test_gemm_steps_compile_once_then_load(tmp_path):
    """The VNNI steps' library is compiled by the first process, loaded from the cache by the next
    (same numbers), and a damaged cache file is compiled again and replaced."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    blocks = _q4_k_blocks(tmp_path / "q4_k.npy", 37, 512)

    def run():
        r = subprocess.run([sys.executable, "-c", _STEPS, blocks], capture_output=True, text=True, timeout=600,
                           env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.split()

    first, second = run(), run()
    assert first[0] == "compiled" and second[0] == "cache" and first[1] == second[1]
    assert second[2] == "1"  # the GEMM driver too (test_gemm_kernels_load_from_the_cache's check)
    (lib,) = tmp_path.rglob("vnni_steps-*.lib")  # a Q4_K GEMM compiles only the Q4_K steps
    assert lib.name.startswith("vnni_steps-q4_k-")
    lib.write_bytes(lib.read_bytes()[:1000])
    third, fourth = run(), run()
    assert third[0] == "compiled" and fourth[0] == "cache" and third[1] == first[1] == fourth[1]
    assert not list(tmp_path.rglob("*.tmp"))
