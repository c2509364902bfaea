"""int8_kernels.swiglu_experts, a prefill chunk's routed experts in one call, against the
per-expert path it replaces (the same bits) and a float64 reference on gguf-py's dequantized
weights (close).

The experts mix formats with 16-row VNNI steps (Q4_K, Q5_K, IQ3_S: activation sums per 32
columns; Q6_K: per 16) and without (TQ2_0: 4-token row steps), widths of 256 and 768, and token
counts of 0, 1, 3, 6, 8 and 17 (the steps' 8-token passes and the shorter ones after them).
"""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from gguf.quants import dequantize as gguf_dequantize

from quant import int8_kernels as q8
from quant import pack
from tests.test_quant_q8_formats import LAYOUT, activations, assert_close, values
from tests.test_quant_q8_formats import weights as _weights
from tests.test_quant_q8_iq import weights as _iq_weights

H = 512
SPECS = [  # gate/up format, down format, width, tokens
    (T.Q4_K, T.Q6_K, 256, 17), (T.Q5_K, T.Q4_K, 768, 3), (T.Q6_K, T.Q4_K, 256, 0), (T.TQ2_0, T.Q5_K, 256, 8),
    (T.Q4_K, T.TQ2_0, 512, 1), (T.IQ3_S, T.Q6_K, 256, 6)]
FORMATS = q8.format_set([t for s in SPECS for t in s[:2]])
LIMITS = [7.0, 0.0, 7.0, 0.0, 3.0, 0.0]


_HALVES = {T.Q5_K: (0, 2), T.Q6_K: (208,)}  # their f16 fields (random bytes there could be NaN)


def weights(qtype, rows, cols, seed):
    if qtype in LAYOUT:
        return _weights(qtype, rows, cols, seed)
    if qtype in _HALVES:
        return _k_weights(qtype, rows, cols, seed)
    return _iq_weights(qtype, rows, cols, seed)


def _k_weights(qtype, rows, cols, seed):
    nbytes = {T.Q5_K: 176, T.Q6_K: 210}[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // 256, nbytes), dtype=np.uint8)
    for off in _HALVES[qtype]:
        raw[:, :, off:off + 2] = rng.uniform(-0.03, 0.03, (rows, cols // 256)).astype(np.float16).view(np.uint8) \
            .reshape(rows, cols // 256, 2)
    raw = raw.reshape(rows, -1)
    return pack(qtype, raw, rows, cols), gguf_dequantize(raw, qtype).reshape(rows, cols).astype(np.float64)


@pytest.fixture(scope="module")
def chunk():
    rng = np.random.default_rng(5)
    experts, refs = [], []
    for i, (gu, dn, width, _) in enumerate(SPECS):
        (g, G), (u, U), (d, D) = (weights(gu, width, H, 10 * i), weights(gu, width, H, 10 * i + 1),
                                  weights(dn, H, width, 10 * i + 2))
        experts.append((g, u, d))
        refs.append((G, U, D))
    n_tok = 20
    rows = [np.sort(rng.choice(n_tok, n, replace=False)) for *_, n in SPECS]
    x = 0.2 * activations(n_tok, H, seed=3)  # gate values of a few units: SwiGLU neither vanishes nor overflows
    entry_weights = rng.uniform(0.1, 1.0, sum(len(r) for r in rows)).astype(np.float32)
    return experts, refs, rows, x, entry_weights


def _fused(experts, rows, x, entry_weights, out):
    starts = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([len(r) for r in rows], out=starts[1:])
    desc = np.stack([q8.ffn_descriptor(*e) for e in experts])
    return q8.swiglu_experts(desc, np.concatenate(rows), starts, entry_weights, np.array(LIMITS, np.float32),
                             x, out, formats=FORMATS)


def _per_expert(experts, rows, x, entry_weights, out):
    """runtime.model.ffn's path before the fused call: matmul_many, swiglu, matmul, the weighted add."""
    from runtime.model.ops import swiglu

    def product(xs, w):
        a = q8.quantize_activations(np.ascontiguousarray(xs))
        o = np.empty((xs.shape[0], w.rows), np.float32)
        return q8.matmul(w, a, o, formats=FORMATS) if xs.shape[0] > 1 else \
            q8.matvec(w, a, o[0], formats=FORMATS)[None]

    j = 0
    for (g, u, d), r, lim in zip(experts, rows, LIMITS):
        if len(r):
            y = product(swiglu(product(x[r], g), product(x[r], u), lim), d)
            out[r] += y * entry_weights[j:j + len(r), None]
        j += len(r)
    return out


def test_the_per_expert_paths_bits(chunk):
    experts, _, rows, x, ew = chunk
    base = np.random.default_rng(1).standard_normal((x.shape[0], H)).astype(np.float32)
    got = _fused(experts, rows, x, ew, base.copy())
    np.testing.assert_array_equal(got, _per_expert(experts, rows, x, ew, base.copy()))


def test_close_to_the_float64_reference(chunk):
    experts, refs, rows, x, ew = chunk
    got = _fused(experts, rows, x, ew, np.zeros((x.shape[0], H), np.float32))
    xv = values(q8.quantize_activations(x))
    want = np.zeros((x.shape[0], H))
    j = 0
    for (G, U, D), r, lim in zip(refs, rows, LIMITS):
        for t in r:
            g, u = G @ xv[t], U @ xv[t]
            act = g / (1 + np.exp(-g))
            if lim > 1e-6:
                act, u = np.minimum(act, lim), np.clip(u, -lim, lim)
            hidden = q8.quantize_activations((act * u).astype(np.float32))
            want[t] += ew[j] * (D @ values(hidden)[0])
            j += 1
    for t in range(x.shape[0]):
        if np.any(want[t]):
            assert np.abs(got[t] - want[t]).max() <= 1e-5 * np.abs(want[t]).max()
        else:
            assert not np.any(got[t])  # a token no expert took is left as it was


def test_bad_arguments_are_refused(chunk):
    experts, _, rows, x, ew = chunk
    desc = np.stack([q8.ffn_descriptor(*e) for e in experts])
    starts = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([len(r) for r in rows], out=starts[1:])
    out = np.zeros((x.shape[0], H), np.float32)
    lims = np.array(LIMITS, np.float32)
    with pytest.raises(ValueError, match="index the 20 tokens"):
        q8.swiglu_experts(desc, np.concatenate(rows) + 5, starts, ew, lims, x, out, formats=FORMATS)
    with pytest.raises(ValueError, match="do not describe"):
        q8.swiglu_experts(desc, np.concatenate(rows), starts[:-1], ew, lims, x, out, formats=FORMATS)
    with pytest.raises(ValueError, match="leaves out"):
        q8.swiglu_experts(desc, np.concatenate(rows), starts, ew, lims, x, out, formats=q8.format_set([T.Q4_K]))
    assert not np.any(out)
