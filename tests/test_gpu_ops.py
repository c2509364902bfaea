"""runtime.model.gpu.ops (and attention_ops, which it re-exports) on numba's CUDA simulator (the card with NUMBA_ENABLE_CUDASIM=0), against the CPU
kernels: runtime.model.ops (rms_norm, rope, route) and runtime.model.attention_kernels.

Inputs are slices of larger device arrays, as the executor passes them (h[:T], slots_d[i, :T]).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from numba import cuda

from runtime.model.attention_kernels import chunk_attention, decode_attention
from runtime.model.gpu import ops as g
from runtime.model.ops import rms_norm, rope, rope_inv_freq, route

EPS = 1e-5


def _dev(a: np.ndarray, extra: int = 2):
    """a on the card as the first rows of a larger array (a slice, like the executor's h[:T])."""
    big = np.zeros((a.shape[0] + extra,) + a.shape[1:], a.dtype)
    big[: a.shape[0]] = a
    return cuda.to_device(big)[: a.shape[0]]


def _close(got, want, tol=2e-5):
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max())))


def test_rms_norm_add_rms_norm_add():
    rng = np.random.default_rng(0)
    T, H = 3, 256
    x = rng.standard_normal((T, H)).astype(np.float32)
    y = rng.standard_normal((T, H)).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)
    xd, yd, wd, out = _dev(x), _dev(y), cuda.to_device(w), _dev(np.zeros((T, H), np.float32))
    g.rms_norm(xd, wd, EPS, out)
    _close(out.copy_to_host(), rms_norm(x, w, EPS))
    g.rms_norm(xd, wd, EPS, xd)  # in place
    _close(xd.copy_to_host(), rms_norm(x, w, EPS))
    hd = _dev(x)
    g.add_rms_norm(hd, yd, wd, EPS, out)
    _close(hd.copy_to_host(), x + y)
    _close(out.copy_to_host(), rms_norm(x + y, w, EPS))
    g.add(hd, yd)
    _close(hd.copy_to_host(), x + 2 * y)
    with pytest.raises(ValueError, match="w has 255"):
        g.rms_norm(xd, cuda.to_device(w[:255]), EPS, out)
    with pytest.raises(ValueError, match="float64"):
        g.add(hd, cuda.to_device(y.astype(np.float64)))


def _proj_rows(rng, T, Nh, Nk, D):
    return (2 * rng.standard_normal((T, (Nh + 2 * Nk) * D + Nh))).astype(np.float32)


def _split(p, Nh, Nk, D):
    T = p.shape[0]
    q = p[:, : Nh * D].reshape(T, Nh, D)
    k = p[:, Nh * D : (Nh + Nk) * D].reshape(T, Nk, D)
    v = p[:, (Nh + Nk) * D : (Nh + 2 * Nk) * D].reshape(T, Nk, D)
    return q, k, v, p[:, (Nh + 2 * Nk) * D :]


def test_qk_norm_rope_and_kv_store():
    """D 128 with partial rotation (R = 64 < D); full rotation runs in test_decode_matches_cpu."""
    D, n_rot = 128, 64
    rng = np.random.default_rng(1)
    T, Nh, Nk, S = 3, 4, 2, 12
    p = _proj_rows(rng, T, Nh, Nk, D)
    qn = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    kn = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    inv = rope_inv_freq(n_rot, 10000.0)
    pos = np.array([37, 38, 39], np.int64)
    pd = _dev(p)
    g.qk_norm_rope(pd, Nh, Nk, D, cuda.to_device(qn), cuda.to_device(kn), EPS, cuda.to_device(inv), _dev(pos))
    got = pd.copy_to_host()
    q, k, v, gate = _split(p, Nh, Nk, D)
    gq, gk, gv, gg = _split(got, Nh, Nk, D)
    _close(gq, rope(rms_norm(q, qn, EPS), pos, inv))
    _close(gk, rope(rms_norm(k, kn, EPS), pos, inv))
    np.testing.assert_array_equal(gv, v)
    np.testing.assert_array_equal(gg, gate)

    kc, vc = cuda.to_device(np.zeros((S, Nk, D), np.float32)), cuda.to_device(np.zeros((S, Nk, D), np.float32))
    kpos = cuda.to_device(np.full(S, -1, np.int64))
    slots = np.array([[0, 0, 0], [5, 2, 9]], np.int64)
    g.kv_store(pd, Nh, Nk, D, kc, vc, kpos, cuda.to_device(slots)[1, :T], _dev(pos))
    want_k, want_v, want_pos = np.zeros((S, Nk, D), np.float32), np.zeros((S, Nk, D), np.float32), np.full(S, -1)
    want_k[slots[1]], want_v[slots[1]], want_pos[slots[1]] = gk, gv, pos
    np.testing.assert_array_equal(kc.copy_to_host(), want_k)
    np.testing.assert_array_equal(vc.copy_to_host(), want_v)
    np.testing.assert_array_equal(kpos.copy_to_host(), want_pos)
    with pytest.raises(ValueError, match="proj rows hold"):
        g.qk_norm_rope(pd, Nh, 1, D, cuda.to_device(qn), cuda.to_device(kn), EPS, cuda.to_device(inv), _dev(pos))
    with pytest.raises(ValueError, match="slots has 2"):
        g.kv_store(pd, Nh, Nk, D, kc, vc, kpos, cuda.to_device(slots[1, :2]), _dev(pos))


def _ring(rng, S, Nk, D, qpos0, window):
    """A cache of S slots: some empty, some too old for the window, the rest visible (shuffled)."""
    kpos = np.full(S, -1, np.int64)
    held = rng.permutation(S)[: S - 7]
    lo = max(0, qpos0 - max(window + 10, S))
    kpos[held] = rng.choice(np.arange(lo, qpos0), size=held.shape[0], replace=False)
    keys = rng.standard_normal((S, Nk, D)).astype(np.float32)
    vals = rng.standard_normal((S, Nk, D)).astype(np.float32)
    return keys, vals, kpos


def _no_scales(S, Nk):
    """The (empty) scales of an f32 KV cache, as the model passes them to the CPU kernels."""
    return np.zeros((S, Nk, 0), np.uint16), np.zeros((S, Nk, 0), np.uint16)


@pytest.mark.parametrize("D, Nk, window, n_rot, S", [(64, 2, 0, 64, 40), (128, 1, 40, 64, 300)])
def test_decode_matches_cpu(D, Nk, window, n_rot, S):
    """T = 1: norm + RoPE, store, attend on the card == decode_attention (which does all three).
    S = 300 takes two attention splits (256 slots each), most of its tiles out of the window."""
    rng = np.random.default_rng(2)
    Nh, qpos = 4, 400
    keys, vals, kpos = _ring(rng, S, Nk, D, qpos, window)
    slot = int(np.flatnonzero(kpos < 0)[0])
    p = _proj_rows(rng, 1, Nh, Nk, D)
    qn = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    kn = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    inv = rope_inv_freq(n_rot, 10000.0)

    q, k, v, gate = (a.reshape(-1).copy() for a in _split(p, Nh, Nk, D))
    ang = qpos * inv
    ck, cv, cp = keys.copy(), vals.copy(), kpos.copy()
    want = np.zeros(Nh * D, np.float32)
    decode_attention(q, k, v, gate, qn, kn, np.float32(EPS), np.cos(ang).astype(np.float32),
                     np.sin(ang).astype(np.float32), ck, cv, cp, slot, qpos, window, np.zeros((Nh, S), np.float32),
                     want, *_no_scales(S, Nk))

    pd, posd = _dev(p), _dev(np.array([qpos], np.int64))
    kd, vd, kpd = cuda.to_device(keys), cuda.to_device(vals), cuda.to_device(kpos)
    g.qk_norm_rope(pd, Nh, Nk, D, cuda.to_device(qn), cuda.to_device(kn), EPS, cuda.to_device(inv), posd)
    g.kv_store(pd, Nh, Nk, D, kd, vd, kpd, _dev(np.array([slot], np.int64)), posd)
    out = _dev(np.zeros((1, Nh * D), np.float32))
    g.attention(pd, Nh, Nk, D, kd, vd, kpd, S, posd, window, out, g.attention_scratch(2, Nh + 1, S + 8))
    np.testing.assert_array_equal(kpd.copy_to_host(), cp)
    _close(kd.copy_to_host(), ck)
    _close(out.copy_to_host()[0], want, 1e-4)


def test_chunk_attention_matches_cpu():
    """T = 3 queries whose keys are stored first: the position mask makes the chunk causal (a
    sliding window here; full attention runs in test_decode_matches_cpu)."""
    rng = np.random.default_rng(3)
    T, Nh, Nk, D, S, qpos0, window = 3, 4, 2, 64, 40, 50, 20
    keys, vals, kpos = _ring(rng, S, Nk, D, qpos0, window)
    p = _proj_rows(rng, T, Nh, Nk, D)
    qpos = np.arange(qpos0, qpos0 + T, dtype=np.int64)
    slots = np.flatnonzero(kpos < 0)[:T].astype(np.int64)
    q, k, v, gate = _split(p, Nh, Nk, D)
    keys[slots], vals[slots], kpos[slots] = k, v, qpos
    n_slots = S - 3  # the last slots lie beyond n_slots: never read
    keys[n_slots:], kpos[n_slots:] = 1e4, qpos0 - 1
    want = np.zeros((T, Nh, D), np.float32)
    chunk_attention(np.ascontiguousarray(q), keys[:n_slots], vals[:n_slots], kpos[:n_slots], qpos, window, want,
                    np.ascontiguousarray(gate), *_no_scales(n_slots, Nk))

    out = _dev(np.zeros((T, Nh * D), np.float32))
    g.attention(_dev(p), Nh, Nk, D, cuda.to_device(keys), cuda.to_device(vals), cuda.to_device(kpos), n_slots,
                _dev(qpos), window, out, g.attention_scratch(4, Nh, S))
    _close(out.copy_to_host().reshape(T, Nh, D), want, 1e-4)
    with pytest.raises(ValueError, match="scratch has shape"):
        g.attention(_dev(p), Nh, Nk, D, cuda.to_device(keys), cuda.to_device(vals), cuda.to_device(kpos), n_slots,
                    _dev(qpos), window, out, g.attention_scratch(2, Nh, S))


def test_router_logits_and_route():
    rng = np.random.default_rng(4)
    T, H, E, K = 2, 256, 8, 3
    x = rng.standard_normal((T, H)).astype(np.float32)
    r = (0.1 * rng.standard_normal((E, H))).astype(np.float32)
    logits = _dev(np.zeros((T, E), np.float32))
    g.router_logits(_dev(x), cuda.to_device(r), logits)
    got_logits = logits.copy_to_host()
    _close(got_logits, x @ r.T, 1e-5)
    got_logits[1] = 0.25  # ties everywhere: without a bias the lowest K indices win
    logits = _dev(got_logits)
    bias = (0.05 * rng.standard_normal(E)).astype(np.float32)
    for b, normalize in ((bias, True), (np.zeros(0, np.float32), False)):
        ids, wts = _dev(np.zeros((T, K), np.int32)), _dev(np.zeros((T, K), np.float32))
        g.route(logits, cuda.to_device(b), K, 2.5, normalize, ids, wts)
        want_ids, want_w = route(got_logits, b if b.shape[0] else None, K, 2.5, normalize, ascending=True)
        np.testing.assert_array_equal(ids.copy_to_host(), want_ids)
        if not b.shape[0]:
            np.testing.assert_array_equal(want_ids[1], np.arange(K))
        _close(wts.copy_to_host(), want_w, 1e-6)
    with pytest.raises(ValueError, match="ids has shape"):
        g.route(logits, cuda.to_device(bias), K + 1, 2.5, True, ids, wts)


_PTX_CHECK = """
import sys
import types
from numba import cuda, types as ty
from numba.cuda.cudadrv import nvvm
if not nvvm.is_available():
    sys.exit(77)
import numba.cuda.dispatcher as dispatcher
# device functions compile for "the current device": with no card here, say it is an H100/H200 (sm_90)
dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
from runtime.model.gpu import attention_ops, ops
f32, f64, i32, i64 = ty.float32, ty.float64, ty.int32, ty.int64
def a(t, n, layout="C"):
    return ty.Array(t, n, layout)
sigs = {
    "_rms_norm": (a(f32, 2), a(f32, 1), f32, a(f32, 2)),
    "_add_rms_norm": (a(f32, 2), a(f32, 2), a(f32, 1), f32, a(f32, 2)),
    "_add": (a(f32, 2), a(f32, 2)),
    "_qk_norm_rope": (a(f32, 2), i64, i64, a(f32, 1), a(f32, 1), f32, a(f64, 1), a(i64, 1)),
    "_kv_store": (a(f32, 2), i64, i64, i64, a(f32, 3), a(f32, 3), a(i64, 1), a(i64, 1, "A"), a(i64, 1)),
    "_attention_split": (a(f32, 2), i64, i64, i64, f32, a(f32, 3), a(f32, 3), a(i64, 1), i64, a(i64, 1), i64,
                         a(f32, 3)),
    "_attention_combine": (a(f32, 2), i64, i64, i64, i64, a(f32, 2), a(f32, 3)),
    "_router_logits": (a(f32, 2), a(f32, 2), a(f32, 2)),
    "_route": (a(f32, 2), a(f32, 1), i64, f32, ty.boolean, a(i32, 2), a(f32, 2)),
}
for name, sig in sigs.items():
    kernel = getattr(ops, name, None) or getattr(attention_ops, name)
    cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
print("compiled", len(sigs))
"""


def test_kernels_compile_for_a_real_card():
    """The simulator runs Python: this compiles every kernel to sm_90 PTX (NVVM, no card needed),
    which rejects what a real compile rejects (non-constant shared sizes, untyped builtins)."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    r = subprocess.run([sys.executable, "-c", _PTX_CHECK], env=env, capture_output=True, text=True, timeout=300)
    if r.returncode == 77:
        pytest.skip("NVVM (the CUDA toolkit's compiler library) is not installed")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compiled 9" in r.stdout
