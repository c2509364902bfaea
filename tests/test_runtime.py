"""The runtime's forward pass on the f32 GGUF: against llama.cpp, the float64 reference,
and itself (chunked prefill, one-token decode, trim)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import reference_model as R
from tests.helpers.llama import llama_cpp_logits
from runtime.loader import load


@pytest.fixture(scope="module")
def f32_path(tiny_gguf):
    return tiny_gguf("f32")


@pytest.fixture(scope="module")
def model(f32_path):
    return load(f32_path, n_ctx=256)


@pytest.fixture(scope="module")
def prompt(model):
    """4x the sliding window, ids spread over the whole vocabulary."""
    n = 4 * model.cfg.window
    return np.random.default_rng(7).integers(0, model.cfg.vocab, n).tolist()


@pytest.fixture(scope="module")
def full_logits(model, prompt):
    return model.logits(prompt)


def test_config_from_our_gguf(model):
    cfg = model.cfg
    assert cfg.n_layers == 4 and cfg.n_mtp == 3
    assert cfg.sliding[:4] == (False, True, True, True)
    assert cfg.n_rot[:2] == (cfg.head_dim // 2, cfg.head_dim)
    assert cfg.moe[:4] == (False, True, True, True) and not any(cfg.moe[4:])
    assert cfg.rope_base_full != cfg.rope_base_sliding
    assert any(v > 0 for v in cfg.swiglu_limit) and any(v > 0 for v in cfg.swiglu_limit_shared)
    assert len(model.weights.nextn) == 3


def test_f32_matches_llama_cpp_every_position(f32_path, prompt, full_logits):
    ref = llama_cpp_logits(f32_path, prompt, n_ctx=256)
    assert full_logits.dtype == np.float32 and full_logits.shape == ref.shape
    cos = R.cosine_rows(full_logits, ref)
    assert cos.min() >= 0.9999, (cos.argmin(), cos.min())
    assert (full_logits.argmax(-1) == ref.argmax(-1)).all()


def test_f32_matches_float64_reference(tiny_ckpt, f32_path, prompt, full_logits):
    ref = R.reference_logits(tiny_ckpt, prompt)
    cos = R.cosine_rows(full_logits, ref)
    assert cos.min() >= 0.9999
    assert (full_logits.argmax(-1) == ref.argmax(-1)).all()
    # f32 arithmetic on f32 weights: far tighter than the acceptance bound
    assert np.abs(full_logits - ref).max() < 1e-3


def test_chunk_size_does_not_change_logits(f32_path, prompt, full_logits):
    for n_batch in (1, 5, 16, 1000):
        np.testing.assert_allclose(load(f32_path, n_ctx=256, n_batch=n_batch).logits(prompt), full_logits, rtol=1e-4, atol=1e-4)


def test_incremental_decode_equals_full_recompute(model, prompt, full_logits):
    model.reset()
    start = 10
    got = [model.eval(prompt[:start], all_logits=True)]
    for t in prompt[start:]:
        got.append(model.eval([t])[None])
    np.testing.assert_allclose(np.concatenate(got), full_logits, rtol=1e-4, atol=1e-4)
    assert model.n_past == len(prompt)


def test_trim_then_decode_equals_never_decoded(model, prompt):
    n = 3 * model.cfg.window + 5  # past the ring's wrap-around
    detour = [(t + 11) % model.cfg.vocab for t in prompt[n : n + 6]]
    model.reset()
    model.eval(prompt[:n])
    model.eval(detour[:3])
    for t in detour[3:]:
        model.eval([t])
    model.trim(len(detour))
    assert model.n_past == n
    after_trim = model.eval(prompt[n : n + 4], all_logits=True)
    model.reset()
    straight = model.eval(prompt[: n + 4], all_logits=True)[n:]
    np.testing.assert_allclose(after_trim, straight, rtol=1e-4, atol=1e-4)


def test_trim_beyond_the_sliding_ring_is_refused(f32_path, prompt):
    from runtime.base.errors import StepstreamError

    m = load(f32_path, n_ctx=256, rollback=2)
    m.eval(prompt[:40])
    m.trim(3)  # rollback + 1 still leaves every visible key in the ring
    with pytest.raises(StepstreamError, match="rollback"):
        m.trim(5)
    with pytest.raises(StepstreamError, match="holds"):
        m.trim(1000)
    m.reset()
    assert m.n_past == 0


def test_logits_start_from_an_empty_cache(model, prompt, full_logits):
    model.reset()
    model.eval(prompt[:7])
    np.testing.assert_array_equal(model.logits(prompt), full_logits)


def test_mtp_heads_match_the_reference(tiny_ckpt, model, prompt):
    ours = model.mtp_logits(prompt[:40])
    ref = R.reference_mtp_logits(tiny_ckpt, prompt[:40])
    assert len(ours) == len(ref) == model.cfg.n_mtp
    for j, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape == (39 - j, model.cfg.vocab)
        assert R.cosine_rows(a, b).min() >= 0.9999, j
        assert (a.argmax(-1) == b.argmax(-1)).all()


def test_llama3_rope_scaling_on_full_layers(tmp_path):
    """A checkpoint with llama3 rope scaling: the converter's rope_freqs tensor divides the
    full-attention blocks' frequencies; llama.cpp, the reference and the runtime agree."""
    import json

    from convert.converter import convert
    from convert.mini import write_mini

    ckpt = write_mini(tmp_path / "ckpt", "tiny", seed=2)
    cfg_path = ckpt / "config.json"
    raw = json.loads(cfg_path.read_text())
    raw["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 16}
    cfg_path.write_text(json.dumps(raw))
    path = tmp_path / "scaled-f32.gguf"
    convert(ckpt, path, "f32", progress=False)
    tokens = np.random.default_rng(5).integers(0, 700, 64).tolist()
    m = load(path, n_ctx=128)
    assert m.weights.rope_factors is not None and m.weights.rope_factors.max() == 8.0
    ours = m.logits(tokens)
    ref = R.reference_logits(ckpt, tokens)
    assert R.cosine_rows(ours, ref).min() >= 0.9999
    llama = llama_cpp_logits(path, tokens, n_ctx=128)
    assert R.cosine_rows(ours, llama).min() >= 0.9999
    assert (ours.argmax(-1) == llama.argmax(-1)).all()
    # and the scaling matters: without it the logits move
    unscaled = R.forward_logits(*_without_rope_factors(ckpt), tokens)
    assert np.abs(unscaled - ref).max() > 1e-3


def _without_rope_factors(ckpt):
    import dataclasses

    cfg, W = R.hf_weights(ckpt)
    return dataclasses.replace(cfg, rope_factors=None), W


def test_full_attention_cache_grows_past_its_first_allocation(f32_path, tiny_ckpt):
    m = load(f32_path, n_ctx=512)
    first = m.cache.layers[0].capacity
    tokens = np.random.default_rng(9).integers(0, m.cfg.vocab, first + 12).tolist()
    m.eval(tokens[: first - 6])
    steps = [m.eval([t]) for t in tokens[first - 6 :]]
    assert m.cache.layers[0].capacity > first
    full = m.logits(tokens)
    np.testing.assert_allclose(np.stack(steps), full[first - 6 :], rtol=1e-4, atol=1e-4)
    ref = R.reference_logits(tiny_ckpt, tokens)
    assert R.cosine_rows(full, ref).min() >= 0.9999


@pytest.mark.parametrize("window", [0, 16])
def test_chunk_attention_matches_float64_reference(window):
    """The chunk attention kernel: grouped heads, empty cache slots, causal and sliding masks, head gates."""
    from runtime.model.attention_kernels import chunk_attention

    rng = np.random.default_rng(0)
    q = rng.standard_normal((37, 4, 16)).astype(np.float32)
    k = rng.standard_normal((50, 2, 16)).astype(np.float32)
    v = rng.standard_normal((50, 2, 16)).astype(np.float32)
    kpos = rng.permutation(60)[:50].astype(np.int64)  # slots in any order, some positions absent
    kpos[[3, 17]] = -1  # empty slots
    qpos = np.arange(20, 57, dtype=np.int64)
    gate = rng.standard_normal((37, 4)).astype(np.float32)
    out = np.empty_like(q)
    no_scale = np.zeros((50, 2, 0), np.uint16)  # f32 keys and values carry no scales: the model's types
    chunk_attention(q, k, v, kpos, qpos, window, out, gate, no_scale, no_scale)

    want = np.empty(q.shape)
    for t, p in enumerate(qpos):
        seen = (kpos >= 0) & (kpos <= p) & ((kpos > p - window) if window else True)
        for h in range(4):
            s = k[seen, h // 2].astype(np.float64) @ q[t, h].astype(np.float64) / 4.0
            w = np.exp(s - s.max())
            want[t, h] = (w / w.sum()) @ v[seen, h // 2].astype(np.float64) / (1 + np.exp(-np.float64(gate[t, h])))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_grouped_query_attention_matches_llama_cpp(tmp_path, monkeypatch):
    """Two KV heads shared by 2 (full) or 4 (sliding) query heads each: query head h reads KV head h // G."""
    from convert import mini
    from convert.converter import convert

    monkeypatch.setitem(mini.PRESETS, "gqa", mini.Preset(256, 4, 128, 4, 8, 2, 16, 4, 256, 256, 512, 700, 16, 1, "GQA test"))
    ckpt = mini.write_mini(tmp_path / "ckpt", "gqa", seed=4)
    path = tmp_path / "gqa-f32.gguf"
    convert(ckpt, path, "f32", progress=False)
    m = load(path, n_ctx=128)
    assert m.cfg.n_head_kv[:2] == (2, 2) and m.cfg.n_head[:2] == (4, 8)
    tokens = np.random.default_rng(6).integers(0, m.cfg.vocab, 4 * m.cfg.window).tolist()
    ours = m.logits(tokens)
    llama = llama_cpp_logits(path, tokens, n_ctx=128)
    assert R.cosine_rows(ours, llama).min() >= 0.9999
    assert (ours.argmax(-1) == llama.argmax(-1)).all()
    assert R.cosine_rows(ours, R.reference_logits(ckpt, tokens)).min() >= 0.9999
