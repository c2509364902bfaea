"""The few-token block step (runtime.model.few_kernels): an MTP verify pass of 2..8 tokens in
two kernel calls per block must give the bits of as many one-token decode steps.

Model level: a prompt's hidden states evaluated in chunks of 2..8 tokens (the few-token path,
checked to be the one taken) equal the whole prompt's, on the shipped miniature and on the
random tiny one (rings of window 16 that wrap under the chunks), in RAM and with experts
streamed through a budget too small to hold a chunk's union (the token-by-token fallback).
Kernel level, for shapes the miniatures lack (hidden 2048: Q4_K rows in the GEMV's 16-row
VNNI blocks): the T-token group GEMV equals the one-token group GEMV per token, and the
T-token FFN over the union of the tokens' experts equals quant's one-token swiglu_ffns per
token with that token's own experts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from offload.expert_table import build_expert_table
from runtime.loader import load
from runtime.model import block as block_module

SHIPPED = Path(__file__).resolve().parent.parent / "runtime" / "data" / "step35-mini-q4_k_m.gguf"


def _same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    rows = np.nonzero((got != want).reshape(got.shape[0], -1).any(axis=1))[0]
    assert rows.size == 0, f"{what}: {rows.size} rows differ, the first {rows[0]}, by {np.abs(got - want).max():.3g}"


def _chunks_equal_whole(m, n_prompt: int, sizes) -> None:
    """Chunks of each size after a prefix, against the whole prompt; the few path must run."""
    ids = np.random.default_rng(11).integers(0, m.cfg.vocab, n_prompt)
    m.reset()
    want = m.hidden(ids)
    assert m._few, "every block of this model fuses its decode step"
    calls = []
    real = block_module.Block.decode_tokens

    def spy(self, h, pos, kv, experts, buffers):
        calls.append(h.shape[0])
        return real(self, h, pos, kv, experts, buffers)

    block_module.Block.decode_tokens = spy
    try:
        for size in sizes:
            start = n_prompt - 6 * size
            m.reset()
            m.hidden(ids[:start])
            got = np.concatenate([m.hidden(ids[a:a + size]) for a in range(start, n_prompt, size)])
            _same(got, want[start:], f"chunks of {size} from position {start}")
            # after a rollback (a rejected draft), the same tokens again
            m.trim(size - 1)
            _same(m.hidden(ids[n_prompt - size + 1:]), want[n_prompt - size + 1:], f"{size - 1} re-evaluated")
    finally:
        block_module.Block.decode_tokens = real
    assert set(calls) >= set(sizes) - {1}


@pytest.fixture(scope="module")
def shipped():
    m = load(SHIPPED)
    yield m
    m.close()


def test_shipped_chunks_of_a_few_tokens(shipped):
    _chunks_equal_whole(shipped, 190, [2, 3, 4, 5, 8])  # 190: past the ring of 144 slots


@pytest.mark.parametrize("budget", [None, 0.15])
def test_random_miniature_chunks(tiny_gguf, budget):
    """The tiny model's rings (window 16) wrap every few chunks; with 15% of its experts in RAM
    a chunk's union cannot be held at once and its FFN goes token by token."""
    path = tiny_gguf("q4_k_m")
    m = load(path)
    if budget is not None:
        total = build_expert_table(m.file, m.cfg).total_bytes
        m.close()
        m = load(path, ram_budget=int(total * budget))
    try:
        _chunks_equal_whole(m, 120, [2, 3, 4, 7])
        if budget is not None:
            assert m.provider.stats.misses > 0
    finally:
        m.close()


def _mat(rng, qt, r, c):
    from quant import pack, quantize

    return pack(qt, quantize((0.05 * rng.standard_normal((r, c))).astype(np.float32), qt), r, c)


def test_group_gemv_of_tokens_equals_one_token_gemv():
    from gguf import GGMLQuantizationType as T

    from quant import int8_kernels as q8
    from runtime.model import few_kernels as fk

    H, n_tok = 2048, 5
    rng = np.random.default_rng(2)
    mats = [_mat(rng, T.Q4_K, 48, H), _mat(rng, T.Q6_K, 40, H), _mat(rng, T.Q4_K, 8, H)]
    formats = q8.format_set([T.Q4_K, T.Q6_K])
    g = q8.group(mats, formats=formats)
    x = rng.standard_normal((n_tok, H)).astype(np.float32)
    s = fk.tokens_scratch(8, H, H, g.rows, 64, 1, 16, 1)
    a = q8.quantize_activations(x)
    s.xq[:n_tok], s.xd[:n_tok], s.xb[:n_tok] = a.q, a.d, a.b
    out = np.zeros((8, g.rows), np.float32)
    fk.build(formats).gemv(g.qt, g.addr, g.rb, g.starts, n_tok, H, s.xq, s.xd, s.xb, out)
    want = np.stack([q8.matvec_group(g, x[t], np.empty(g.rows, np.float32)) for t in range(n_tok)])
    _same(out[:n_tok], want, "T-token group GEMV")


def test_ffn_of_tokens_over_the_union_equals_one_token_ffns():
    """Five tokens, a shared FFN and two experts each out of five (one expert shared by all five:
    a 4-token row step and a single token), clamps that differ: every token's output equals
    swiglu_ffns over its own shared + experts, in order."""
    from gguf import GGMLQuantizationType as T

    from quant import int8_kernels as q8
    from runtime.model import few_kernels as fk

    H, I = 2048, 256
    rng = np.random.default_rng(9)
    ffns = [(_mat(rng, T.Q4_K, w, H), _mat(rng, T.Q4_K, w, H), _mat(rng, T.Q6_K, H, w))
            for w in (512, I, I, I, I, I)]  # 0: shared, 1..5: experts
    desc = np.stack([q8.ffn_descriptor(*f) for f in ffns])
    limits = np.array([0.0, 7.0, 7.0, 7.0, 7.0, 7.0], np.float32)
    ids = np.array([[1, 3], [3, 4], [0, 3], [1, 3], [2, 3]])  # per token, ascending (0..4: experts 1..5)
    n_tok = ids.shape[0]
    weights = rng.uniform(0.1, 1.0, (n_tok, 2)).astype(np.float32)
    x = (2.0 * rng.standard_normal((n_tok, H))).astype(np.float32)
    h = rng.standard_normal((n_tok, H)).astype(np.float32)
    formats = q8.format_set([T.Q4_K, T.Q6_K])
    want = h.copy()
    one = q8.ffn_scratch(H, 3, 512 + 2 * I)
    for t in range(n_tok):
        rows = [0, *(1 + ids[t])]
        q8.swiglu_ffns(desc[rows], np.array([1.0, *weights[t]], np.float32), limits[rows], x[t], want[t], one, formats)
    union = np.unique(ids)
    entry = np.zeros((n_tok, 3), np.int64)
    entry[:, 1:] = 1 + np.searchsorted(union, ids)
    wts = np.ones((n_tok, 3), np.float32)
    wts[:, 1:] = weights
    f = fk.tokens_ffn_scratch(8, H, 8 * 3, 8 * (512 + 2 * I))
    steps = q8.gemm_step_addresses(formats)  # 16-row GEMM steps over each FFN's tokens (VNNI hosts)
    no_steps = np.zeros_like(steps)
    no_steps.setflags(write=False)  # read-only as the library's steps arrays: the same kernel, not a second compile
    for name, st in (("GEMM steps", steps), ("row dots", no_steps)):
        got = h.copy()
        fk.build(formats).ffn(desc[[0, *(1 + union)]], entry, wts, limits[[0, *(1 + union)]], n_tok, x, got, f, st)
        _same(got, want, f"T-token FFN over the union, by {name}")
