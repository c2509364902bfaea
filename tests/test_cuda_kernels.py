"""The CUDA kernels against the CPU's int8 kernels and a float64 reference (numba's simulator
by default, tests/conftest.py; NUMBA_ENABLE_CUDASIM=0 runs them on a card)."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants

pytest.importorskip("numba.cuda")
from numba import cuda  # noqa: E402

import quant  # noqa: E402
from quant import cuda_kernels as ck  # noqa: E402
from quant import int8_kernels  # noqa: E402

FORMATS = (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0)
# the CPU kernels these are compared with, built once for all four formats (each format's own
# kernels took four compiles; tests/test_batch_invariance.py builds this set too)
CPU_SET = int8_kernels.format_set(FORMATS)


@pytest.fixture(autouse=True, scope="module")
def _quick_thread_switches():
    """The simulator runs a block's 32 threads as Python threads in lock-step: switching between
    them every 0.2 ms instead of 5 ms makes these tests 3x faster."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(2e-4)
    yield
    sys.setswitchinterval(before)


def _matrix(rng, qtype, rows, cols):
    """GGUF bytes [rows, row_bytes] of random weights, and the packed matrix over them."""
    raw = quant.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)  # our quantizer; gguf-py reads
    return raw, quant.pack(qtype, raw.reshape(-1), rows, cols)


def _arena(parts):
    """One arena holding the byte arrays on words but not on 8-byte boundaries (the kernels read it
    as words); their offsets."""
    offsets, at = [], 4
    for p in parts:
        offsets.append(at)
        at += (p.size + 3) // 4 * 4 + 4
        at += 4 if at % 8 == 0 else 0  # the next one at 4 mod 8 too
    arena = np.zeros(at, np.uint8)
    for p, o in zip(parts, offsets):
        arena[o : o + p.size] = p.reshape(-1)
    return cuda.to_device(arena), offsets


def _acts(x):
    t, c = x.shape
    dev = cuda.device_array((t, c), np.int8), cuda.device_array((t, c // 256), np.float32)
    ck.quantize(cuda.to_device(x), *dev)
    return dev


def test_quantize_is_bit_exact_with_the_cpu():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 512)) * [[1.0], [1e-3], [40.0]]).astype(np.float32)
    x[1, :256] = 0.0  # an all-zero block: scale 0
    x[2, 7] = 127.5 * np.abs(x[2, 256:]).max() / 127.0  # a tie after scaling is likely elsewhere
    got = [a.copy_to_host() for a in _acts(x)]
    want = int8_kernels.quantize_activations(x)
    np.testing.assert_array_equal(got[0], want.q)
    np.testing.assert_array_equal(got[1], want.d)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_a_block_holding_inf_or_nan_gets_a_nan_scale_as_on_the_cpu(bad):
    """A damaged weight upstream must not vanish in the int8 rounding (the CPU's rule, tests/
    test_nonfinite_weights.py): the block's scale is NaN, every other block's bits are the CPU's."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 512)).astype(np.float32)
    x[1, 300] = bad  # block 1 of token 1
    q, d = (a.copy_to_host() for a in _acts(x))
    want = int8_kernels.quantize_activations(x)
    assert np.isnan(d[1, 1]) and np.isnan(want.d[1, 1])
    keep = np.ones_like(d, bool)
    keep[1, 1] = False
    np.testing.assert_array_equal(d[keep], want.d[keep])
    np.testing.assert_array_equal(q[0], want.q[0])
    np.testing.assert_array_equal(q[1, :256], want.q[1, :256])


@pytest.mark.parametrize("which, bad", [(0, np.inf), (1, np.inf), (0, np.nan), (1, -np.nan)])
def test_the_swiglu_of_inf_or_nan_is_nan_as_on_the_cpu(which, bad):
    """The clamp (0.7 here) would turn an Inf gate or up into the clamp, and a NaN into either
    bound: the block's scale must be NaN instead, as the CPU's swiglu_row makes it; the other
    block is the CPU's SwiGLU, rounded as the CPU rounds it, to the bit."""
    from quant.int8_kernels.ffn import swiglu_row
    from quant.cuda_kernels.kernels import ffn_act_kernel

    rng = np.random.default_rng(2)
    gu = rng.standard_normal((1, 2, 512)).astype(np.float32) * 2
    gu[0, which, 300] = bad  # block 1
    desc3 = np.zeros((1, 3, 4), np.int64)
    desc3[0, 0, 2] = 512  # the FFN's width
    limits = np.array([0.7], np.float32)
    hq, hd = cuda.device_array((1, 512), np.int8), cuda.device_array((1, 2), np.float32)
    ffn_act_kernel[(2, 1), 256](cuda.to_device(desc3), cuda.to_device(limits), cuda.to_device(gu), hq, hd)
    q, d = hq.copy_to_host(), hd.copy_to_host()
    assert np.isnan(d[0, 1])
    h = np.empty(256, np.float32)  # the CPU's SwiGLU of the clean block (a NaN gate can stop it, see
    swiglu_row(gu[0, 0, :256], gu[0, 1, :256], limits[0], h)  # test_nonfinite_weights)
    want = int8_kernels.quantize_activations(h[None])
    assert d[0, 0] == want.d[0, 0]
    np.testing.assert_array_equal(q[0, :256], want.q[0, :256])


@pytest.mark.parametrize("T", [1, 3, 9])
def test_matvec_of_stacked_formats_equals_the_cpu_and_float64(T):
    rng = np.random.default_rng(T)
    cols = 768  # 3 super-blocks: every other Q6_K row starts 2 bytes past a word
    mats = [_matrix(rng, q, r, cols) for q, r in zip(FORMATS, (7, 5, 6, 3))]
    arena, offs = _arena([raw for raw, _ in mats])
    desc = np.stack([ck.descriptor(o, p.qtype, p.rows, cols) for o, (_, p) in zip(offs, mats)])
    starts = np.cumsum([0] + [p.rows for _, p in mats]).astype(np.int64)
    x = rng.standard_normal((T, cols)).astype(np.float32)
    xq, xd = _acts(x)
    out = cuda.device_array((T, int(starts[-1])), np.float32)
    ck.matvec(arena, cuda.to_device(desc), cuda.to_device(starts), xq, xd, out)
    got = out.copy_to_host()
    a = int8_kernels.quantize_activations(x)
    xr = (a.q.reshape(T, -1, 256) * a.d[:, :, None]).reshape(T, cols).astype(np.float64)
    for (raw, p), s0 in zip(mats, starts):
        cpu = np.stack([int8_kernels.matvec(p, a, np.empty(p.rows, np.float32), token=t, formats=CPU_SET) for t in range(T)])
        ref = xr @ quants.dequantize(raw, p.qtype).reshape(p.rows, cols).astype(np.float64).T
        part = got[:, s0 : s0 + p.rows]
        scale = np.abs(ref).max()
        np.testing.assert_allclose(part, cpu, rtol=0, atol=2e-5 * scale, err_msg=p.qtype.name)
        np.testing.assert_allclose(part, ref, rtol=0, atol=2e-5 * scale, err_msg=p.qtype.name)


@pytest.mark.slow  # 1,536 row products of 32 lock-stepped Python threads: 100 s on 2 loaded cores
def test_swiglu_ffns_equals_the_cpu():
    rng = np.random.default_rng(5)
    H = 256
    ffns = []  # (gate, up, down) in several formats
    for qt, width in ((Q.Q6_K, 256), (Q.Q4_K, 256)):
        g, u = _matrix(rng, qt, width, H), _matrix(rng, qt, width, H)
        d = _matrix(rng, Q.Q5_K, H, width)
        ffns.append((g, u, d))
    arena, offs = _arena([m[0] for f in ffns for m in f])
    desc3 = np.zeros((len(ffns), 3, 4), np.int64)
    for i, f in enumerate(ffns):
        for j, (_, p) in enumerate(f):
            desc3[i, j] = ck.descriptor(offs[3 * i + j], p.qtype, p.rows, p.cols)
    weights = np.array([1.0, -0.6], np.float32)
    limits = np.array([0.0, 0.7], np.float32)  # no clamp, and a clamp that bites
    x = rng.standard_normal((1, H)).astype(np.float32)
    xq, xd = _acts(x)
    base = rng.standard_normal((2, H)).astype(np.float32)
    out = cuda.to_device(base)  # added into row 1 of a 2-D array, through a view
    ck.swiglu_ffns(arena, cuda.to_device(desc3), cuda.to_device(weights), cuda.to_device(limits), xq, xd,
                   out[1], ck.ffn_scratch(3, 512))  # wider than needed: rows past a width are skipped
    cpu = base[1].copy()
    desc = np.stack([int8_kernels.ffn_descriptor(g[1], u[1], d[1]) for g, u, d in ffns])
    int8_kernels.swiglu_ffns(desc, weights, limits, x[0], cpu, int8_kernels.ffn_scratch(H, 2, 512),
                             formats=CPU_SET)
    got = out.copy_to_host()
    np.testing.assert_array_equal(got[0], base[0])
    np.testing.assert_allclose(got[1], cpu, rtol=0, atol=1e-4 * np.abs(cpu - base[1]).max())


def test_bad_arguments_name_the_value():
    a = cuda.device_array((1, 300), np.int8)
    with pytest.raises(ValueError, match="300 columns"):
        ck.matvec(cuda.device_array(8, np.uint8), cuda.device_array((1, 4), np.int64),
                  cuda.device_array(2, np.int64), a, a, cuda.device_array((1, 1), np.float32))
    with pytest.raises(ValueError, match="IQ4_NL"):
        ck.descriptor(0, Q.IQ4_NL, 4, 256)
    with pytest.raises(ValueError, match="offset 6 is not a multiple of 4"):
        ck.descriptor(6, Q.Q4_K, 4, 256)
    with pytest.raises(ValueError, match="arena holds 10 bytes, not a multiple of 4"):
        ck.matvec(cuda.device_array(10, np.uint8), cuda.device_array((1, 4), np.int64),
                  cuda.device_array(2, np.int64), a, a, cuda.device_array((1, 1), np.float32))


@cuda.jit
def _sum_through_shared(base, out):
    """out[l] = the sum over the block's threads i of base + i, through a static shared array that
    each thread first asks for right after a barrier (as quantize_kernel asks for ibuf)."""
    l = cuda.threadIdx.x
    cuda.syncthreads()
    buf = cuda.shared.array(64, np.int32)
    buf[l] = base + l
    cuda.syncthreads()
    s = 0
    for i in range(cuda.blockDim.x):
        s += buf[i]
    out[l] = s


class _MeetingDict(dict):
    """A launch's shared-array table whose look-ups all happen before any of them returns: each
    thread looks up, then waits until every thread of the block has (once, at most 0.2 s, so
    that look-ups made one at a time under a lock go on). Numba's own allocator then has every
    thread miss and make an array of its own, the widest case of the race."""

    def __init__(self, threads):
        super().__init__()
        self.threads, self.arrived, self.waited = threads, 0, False
        self.met = threading.Condition()

    def get(self, key, default=None):
        found = super().get(key, default)
        with self.met:
            self.arrived += 1
            self.met.notify_all()
            if not self.waited:
                self.waited = not self.met.wait_for(lambda: self.arrived >= self.threads, timeout=0.2)
        return found


def test_every_thread_of_a_block_gets_the_same_shared_array(monkeypatch):
    """numba's simulator makes a launch's static shared array on the first request from its line,
    and its look-up and store were not atomic (quant.cuda_kernels.simulator): a thread switch in
    between gave a thread an array of its own about once in a hundred launches, and the flaky
    matvec test of issue 16 its garbage. Here all look-ups come before any store; the locked
    allocator still gives the block one array."""
    from quant.cuda_kernels import simulator

    if not simulator.SIMULATED:
        pytest.skip("numba's simulator only: a card lays out shared memory at compile time")
    from numba.cuda.simulator import kernelapi

    numba_init = kernelapi.FakeCUDAShared.__init__

    def init(self, dynshared_size):
        numba_init(self, dynshared_size)
        self._allocations = _MeetingDict(64)

    monkeypatch.setattr(kernelapi.FakeCUDAShared, "__init__", init)
    assert simulator.thread_safe_shared_arrays()
    for base in (1000, 2000):  # values no earlier launch left in a recycled buffer
        out = np.zeros(64, np.int64)
        _sum_through_shared[1, 64](base, out)
        np.testing.assert_array_equal(out, np.full(64, 64 * base + 63 * 64 // 2))


def test_bench_reports_positive_rates_on_valid_blocks():
    from quant.cuda_kernels.bench import _random_rows, copy_gbps, gemv_gbps, launch_us

    r = gemv_gbps(Q.Q6_K, 3, 256, repeats=1)
    assert r["bytes"] == 3 * 210 and r["gbps"] > 0
    assert r["check_rows"] == 3 and r["check_ok"] and r["check_cos"] > 0.999  # what it timed is right
    assert copy_gbps(1024, repeats=1) > 0
    assert launch_us(repeats=2) > 0
    for qt in FORMATS:  # the random blocks decode to finite weights
        raw = _random_rows(np.random.default_rng(1), qt, 2, 256)
        assert np.isfinite(quants.dequantize(raw, qt)).all()


_PTX_CHECK = """
import sys, types
from numba import cuda, types as ty
from numba.cuda.cudadrv import nvvm
if not nvvm.is_available():
    sys.exit(77)
import numba.cuda.dispatcher as dispatcher
dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
from quant.cuda_kernels import kernels as k
from runtime.model.gpu import expert_desc as e
f32, i8, i32, i64, u8 = ty.float32, ty.int8, ty.int32, ty.int64, ty.uint8
def a(t, n, layout="C"):
    return ty.Array(t, n, layout)
sigs = [
    (k.quantize_kernel, (a(f32, 2), a(i8, 2), a(f32, 2))),
    (k.matvec_kernel, (a(u8, 1), a(i64, 2), a(i64, 1), a(i8, 2), a(f32, 2), a(f32, 2))),
    (k.ffn_gate_up_kernel, (a(u8, 1), a(i64, 3), a(i8, 2), a(f32, 2), a(f32, 3))),
    (k.ffn_act_kernel, (a(i64, 3), a(f32, 1), a(f32, 3), a(i8, 2), a(f32, 2))),
    (k.ffn_down_kernel, (a(u8, 1), a(i64, 3), a(i8, 2), a(f32, 2), a(f32, 1), a(f32, 1))),
    (e._gather, (a(i32, 2), a(f32, 2), a(i64, 3), a(i64, 3), f32, f32, a(i64, 3), a(f32, 1), a(f32, 1))),
]
for kern, sig in sigs:
    ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0))
    if kern is k.matvec_kernel:
        print("dp4a", ptx.count("dp4a.s32.s32"))
print("compiled", len(sigs))
"""


def test_kernels_compile_for_a_real_card():
    """The simulator runs Python: compile every kernel (and the executor's descriptor gather) to
    sm_90 PTX with NVVM, no card needed; this rejects what a real compile rejects (it caught
    min/max/abs on float32, which the simulator ran), and checks that the row products use the
    card's dp4a (quant.cuda_kernels.int32) rather than falling back to the portable sum."""
    import os
    import subprocess

    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    r = subprocess.run([sys.executable, "-c", _PTX_CHECK], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode == 77:
        pytest.skip("NVVM (the CUDA toolkit's compiler library) is not installed")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compiled 6" in r.stdout
    assert int(r.stdout.split("dp4a ")[1].split()[0]) >= 4, r.stdout  # the card's byte products, not the spelled-out sum
