"""Self-tests of the float64 reference model (tests/reference_model.py).

The reference is the spec the runtime is measured against, so each semantic it claims
gets a check that it actually changes (or does not change) the output the way it should.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.helpers import reference_model as R


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    cfg, W = R.hf_weights(tiny_ckpt)
    return tiny_ckpt, cfg, W


def _tokens(cfg, n, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab, n)


def test_causal_prefix_consistency(tiny):
    _, cfg, W = tiny
    toks = _tokens(cfg, 40)
    full = R.forward_logits(cfg, W, toks)
    part = R.forward_logits(cfg, W, toks[:23])
    np.testing.assert_allclose(part, full[:23], rtol=1e-10, atol=1e-10)


def test_sliding_window_masks_exactly_old_keys(tiny):
    _, cfg, W = tiny
    Wn = cfg.window
    toks = _tokens(cfg, 3 * Wn)
    windowed = R.forward_logits(cfg, W, toks)
    unbounded = R.forward_logits(dataclasses.replace(cfg, window=10**9), W, toks)
    # Positions that cannot reach past the window are unaffected; later ones change.
    np.testing.assert_allclose(windowed[:Wn], unbounded[:Wn], rtol=1e-10, atol=1e-10)
    assert np.abs(windowed[Wn:] - unbounded[Wn:]).max(axis=-1).min() > 1e-6


def test_attention_mask_bounds():
    pos = np.arange(6)
    m = R.attention_mask(pos, 3)
    for p in range(6):
        assert [k for k in range(6) if m[p, k]] == [k for k in range(6) if p - 3 < k <= p]
    assert (R.attention_mask(pos, None) == np.tril(np.ones((6, 6), bool))).all()


def test_swiglu_clamp_formula():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8)) * 4
    g, u, d = rng.standard_normal((5, 8)), rng.standard_normal((5, 8)), rng.standard_normal((8, 5))
    L = 0.7
    gate, up = x @ g.T, x @ u.T
    want = (np.minimum(gate / (1 + np.exp(-gate)), L) * np.clip(up, -L, L)) @ d.T
    np.testing.assert_allclose(R.swiglu(x, g, u, d, L), want, rtol=1e-12)
    np.testing.assert_allclose(R.swiglu(x, g, u, d, 0.0), (gate / (1 + np.exp(-gate)) * up) @ d.T, rtol=1e-12)


def test_clamps_bind_on_the_miniature(tiny):
    _, cfg, W = tiny
    assert any(v > 0 for v in cfg.limit) and any(v > 0 for v in cfg.limit_shared)
    toks = _tokens(cfg, 12)
    base = R.forward_logits(cfg, W, toks)
    for field in ("limit", "limit_shared"):
        off = dataclasses.replace(cfg, **{field: tuple(0.0 for _ in getattr(cfg, field))})
        assert np.abs(R.forward_logits(off, W, toks) - base).max() > 1e-3, field


def test_router_bias_chooses_but_does_not_weigh():
    cfg = dataclasses.replace(_dummy_cfg(), n_expert_used=2, router_scale=3.0, norm_expert_weight=True)
    logits = np.array([[2.0, 1.0, 0.0, -1.0]])
    chosen, w = R.route(cfg, logits, None)
    assert sorted(chosen[0]) == [0, 1]
    np.testing.assert_allclose(w.sum(), 3.0)
    chosen_b, w_b = R.route(cfg, logits, np.array([0.0, 0.0, 0.0, 5.0]))
    assert sorted(chosen_b[0]) == [0, 3]
    s = 1 / (1 + np.exp(-logits[0]))
    expected = {0: s[0], 3: s[3]}
    total = s[0] + s[3]
    for e, wt in zip(chosen_b[0], w_b[0]):
        np.testing.assert_allclose(wt, 3.0 * expected[e] / total)


def test_rope_partial_keeps_tail_and_is_relative():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((1, 1, 128)), rng.standard_normal((1, 1, 128))
    for n_rot in (64, 128):
        rq = R.rope_neox(q, np.array([7]), n_rot, 10000.0)
        np.testing.assert_array_equal(rq[..., n_rot:], q[..., n_rot:])
        np.testing.assert_allclose(np.linalg.norm(rq), np.linalg.norm(q))
        # q.k depends on the position offset only
        a = (R.rope_neox(q, np.array([9]), n_rot, 1e4) * R.rope_neox(k, np.array([4]), n_rot, 1e4)).sum()
        b = (R.rope_neox(q, np.array([25]), n_rot, 1e4) * R.rope_neox(k, np.array([20]), n_rot, 1e4)).sum()
        np.testing.assert_allclose(a, b, rtol=1e-10)


def test_rope_base_matters_per_layer_type(tiny):
    _, cfg, W = tiny
    assert cfg.theta_full != cfg.theta_sliding
    toks = _tokens(cfg, 20)
    base = R.forward_logits(cfg, W, toks)
    for field in ("theta_full", "theta_sliding"):
        other = dataclasses.replace(cfg, **{field: 500.0})
        assert np.abs(R.forward_logits(other, W, toks) - base).max() > 1e-4, field


def test_mtp_shapes_and_teacher_forcing(tiny):
    _, cfg, W = tiny
    toks = _tokens(cfg, 10)
    drafts = R.mtp_logits(cfg, W, toks)
    assert [d.shape for d in drafts] == [(9 - j, cfg.vocab) for j in range(cfg.n_mtp)]
    # Block j at position t only reads tokens up to t+1+j.
    changed = toks.copy()
    changed[-1] = (changed[-1] + 1) % cfg.vocab
    drafts2 = R.mtp_logits(cfg, W, changed)
    for j, (a, b) in enumerate(zip(drafts, drafts2)):
        n = len(toks) - 2 - j  # rows that never read the last token
        np.testing.assert_allclose(a[:n], b[:n], rtol=1e-10, atol=1e-10)
        assert np.abs(a[n:] - b[n:]).max() > 1e-6


def test_entry_points_match(tiny):
    d, cfg, W = tiny
    toks = _tokens(cfg, 6)
    np.testing.assert_array_equal(R.reference_logits(d, toks), R.forward_logits(cfg, W, toks))
    assert len(R.reference_mtp_logits(d, toks)) == cfg.n_mtp


def test_hf_and_gguf_loaders_agree_on_f32(tiny, tiny_gguf):
    d, cfg, W = tiny
    gcfg, G = R.gguf_weights(tiny_gguf("f32"))
    # Same config up to the float32 rounding GGUF metadata stores.
    for f in dataclasses.fields(cfg):
        a, b = getattr(cfg, f.name), getattr(gcfg, f.name)
        if isinstance(a, float) or (isinstance(a, tuple) and a and isinstance(a[0], float)):
            np.testing.assert_allclose(b, a, rtol=1e-6, err_msg=f.name)
        else:
            assert a == b, f.name
    assert sorted(G) == sorted(W)
    for name in W:  # bf16 checkpoint values are exact in f32; norms carry the same +1
        np.testing.assert_array_equal(G[name], W[name], err_msg=name)
    toks = _tokens(cfg, 20)
    np.testing.assert_allclose(R.forward_logits(gcfg, G, toks), R.forward_logits(cfg, W, toks), rtol=1e-5, atol=1e-5)


def _dummy_cfg() -> R.RefConfig:
    return R.RefConfig(
        n_layers=1, n_mtp=0, hidden=4, vocab=4, head_dim=4, sliding=(False,), n_head=(1,), n_head_kv=(1,),
        window=4, theta_full=1e4, theta_sliding=1e4, rope_factors=None, moe=(True,), n_expert_used=2,
        router_scale=1.0, norm_expert_weight=True, limit=(0.0,), limit_shared=(0.0,), eps=1e-5,
    )
