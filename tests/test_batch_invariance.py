"""A position's hidden state and logits do not depend on how the prompt was cut into chunks.

The server keeps a conversation's KV cache and evaluates only a prompt's new suffix, and MTP
verifies drafts in a batch: both promise what a fresh evaluation of the whole prompt gives.
So each test evaluates a prompt whole (chunks of n_batch) as the reference, then the same
prompt cut elsewhere: at points that are not multiples of n_batch, token by token (the fused
decode kernels), after trim() and re-evaluation, with another n_batch, and with routed
experts streamed through a small RAM budget; every row must be np.array_equal to the
reference. Before the kernels summed in a fixed order per row, such cuts differed by 1e-6 at
first and by up to 1 after an int8 rounding flipped (int8 activations).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from offload.expert_table import build_expert_table
from runtime.loader import load

SHIPPED = Path(__file__).resolve().parent.parent / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
N_PROMPT = 200  # past the shipped model's ring (window 128 + rollback 16), so the rings wrap


def _prompt(vocab: int, n: int = N_PROMPT) -> np.ndarray:
    return np.random.default_rng(7).integers(0, vocab, n)


def _pieces(m, ids: np.ndarray, cuts: list[int]) -> np.ndarray:
    """Hidden states of ids from an empty cache, evaluated in the pieces between `cuts`; a
    piece of one token goes through the decode path."""
    m.reset()
    bounds = [0, *cuts, ids.size]
    return np.concatenate([m.hidden(ids[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])


def _same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    rows = np.nonzero((got != want).any(axis=1))[0]
    assert rows.size == 0, (f"{what}: {rows.size} rows differ, the first at position {rows[0]}, "
                            f"by up to {np.abs(got - want).max():.3g}")


def _check_cuts(m, ids: np.ndarray, want: np.ndarray) -> None:
    n = ids.size
    for cuts in ([1], [17], [63], [100], [150], [5, 9, 40, 41, 130, 145], list(range(n - 12, n))):
        _same(_pieces(m, ids, cuts), want, f"cut at {cuts}")
    # trim and evaluate again: within the rollback, by chunk and token by token
    m.reset()
    m.hidden(ids)
    m.trim(13)
    _same(m.hidden(ids[n - 13:]), want[n - 13:], "13 positions trimmed, then one chunk")
    m.trim(6)
    got = np.concatenate([m.hidden(ids[i:i + 1]) for i in range(n - 6, n)])
    _same(got, want[n - 6:], "6 positions trimmed, then token by token")


def _check_logits(m, ids: np.ndarray, want_h: np.ndarray) -> None:
    """Logits of a chunk of rows == logits row by row (one-token output GEMV), and eval()'s."""
    want = m.output(want_h)
    for i in (0, 77, ids.size - 1):
        _same(m.output(want_h[i:i + 1]), want[i:i + 1], f"logits of row {i} alone")
    m.reset()
    m.eval(ids[:-30])
    steps = [m.eval(ids[i:i + 1]) for i in range(ids.size - 30, ids.size)]
    _same(np.stack(steps), want[-30:], "eval() logits token by token")


@pytest.fixture(scope="module")
def shipped():
    m = load(SHIPPED)
    yield m
    m.close()


@pytest.fixture(scope="module")
def shipped_reference(shipped):
    ids = _prompt(shipped.cfg.vocab)
    shipped.reset()
    return ids, shipped.hidden(ids)


def test_shipped_model_cuts_decode_and_trim(shipped, shipped_reference):
    ids, want = shipped_reference
    assert shipped.options.n_batch == 64
    _check_cuts(shipped, ids, want)


def test_shipped_model_logits(shipped, shipped_reference):
    ids, want = shipped_reference
    _check_logits(shipped, ids, want)


def test_shipped_model_other_batch_size_and_streamed_experts(shipped_reference):
    """n_batch 23 chunks the prompt at other points; a RAM budget of a third of the experts
    streams them (cache misses, evictions) and decodes through the provider's held() path."""
    ids, want = shipped_reference
    m = load(SHIPPED, n_batch=23)
    try:
        m.reset()
        _same(m.hidden(ids), want, "n_batch 23")
        total = build_expert_table(m.file, m.cfg).total_bytes
    finally:
        m.close()
    m = load(SHIPPED, ram_budget=int(total * 0.3))
    try:
        _check_cuts(m, ids, want)
        assert m.provider.stats.misses > 0 and m.provider.cache.counters.evictions > 0
    finally:
        m.close()


@pytest.mark.parametrize("ftype, budget", [("q4_k_m", None), ("q4_k_m", 0.3), ("q8_0", None)])
def test_random_miniature(tiny_gguf, ftype, budget):
    """The random tiny model (window 16: its rings wrap every few dozen positions). Its Q8_0
    file has no int8 GEMM: a chunk runs each token through the GEMV's row dot."""
    path = tiny_gguf(ftype)
    ram = load(path)
    ids = _prompt(ram.cfg.vocab)
    ram.reset()
    want = ram.hidden(ids)
    m = ram
    if budget is not None:
        m = load(path, ram_budget=int(build_expert_table(ram.file, ram.cfg).total_bytes * budget))
    try:
        _check_cuts(m, ids, want)
        _check_logits(m, ids, want)
        if budget is not None:
            assert m.provider.stats.misses > 0
    finally:
        m.close()
        ram.close()


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q5_K", "Q8_0"])
@pytest.mark.parametrize("cols", [256, 2048])
def test_int8_gemm_rows_equal_the_one_token_gemv(qtype, cols):
    """Kernel level, for shapes the miniatures lack: every token's row of an int8 GEMM (chunks
    of 1 to 19 tokens, step remainders included; 40 rows, not a multiple of the VNNI GEMM's 16)
    is bit-identical to the one-token GEMV, alone and inside a group of matrices (the decode
    kernels' path; its 16-row VNNI blocks for Q4_K rows of 2048 columns)."""
    from gguf import GGMLQuantizationType as T

    from quant import int8_kernels as q8
    from quant import pack, quantize

    qt = T[qtype]
    rng = np.random.default_rng(3)
    w = pack(qt, quantize((0.05 * rng.standard_normal((40, cols))).astype(np.float32), qt), 40, cols)
    other = pack(T.Q6_K, quantize((0.05 * rng.standard_normal((24, cols))).astype(np.float32), T.Q6_K), 24, cols)
    formats = q8.format_set([T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0])  # one set for every case: one compile of each kernel
    x = rng.standard_normal((19, cols)).astype(np.float32)
    a = q8.quantize_activations(x)
    one = np.stack([q8.matvec(w, a, np.empty(40, np.float32), token=t, formats=formats) for t in range(19)])
    for n in (1, 2, 3, 5, 8, 11, 19):
        sub = q8.quantize_activations(x[:n])
        out = np.empty((n, 40), np.float32)
        gemm = q8.matmul if qt in q8.GEMM_FORMATS else q8.matmul_rows
        gemm(w, sub, out, formats=formats)
        _same(out, one[:n], f"{qtype} GEMM of {n} tokens")
    g = q8.group([other, w], formats=formats)
    for t in (0, 7):
        out = np.empty(64, np.float32)
        q8.matvec_group(g, x[t], out)
        _same(out[None, 24:], one[t:t + 1], f"{qtype} in a group, token {t}")


def test_fused_ffn_step_equals_the_chunk_composition():
    """One token through the fused decode FFN kernel (a shared FFN and two routed experts, hidden
    2048: Q4_K gate/up rows in 16-row VNNI blocks) == the prefill composition for a chunk of 5
    tokens: int8 GEMMs, SwiGLU, down GEMMs, weighted sum in entry order, then the residual."""
    from gguf import GGMLQuantizationType as T

    from quant import int8_kernels as q8
    from quant import pack, quantize
    from runtime.model.ops import swiglu

    H, widths = 2048, (512, 256, 256)
    rng = np.random.default_rng(5)

    def mat(qt, r, c):
        return pack(qt, quantize((0.05 * rng.standard_normal((r, c))).astype(np.float32), qt), r, c)

    ffns = [(mat(T.Q4_K, i, H), mat(T.Q4_K, i, H), mat(T.Q6_K, H, i)) for i in widths]
    weights = np.array([1.0, 0.37, 0.81], np.float32)
    limits = np.array([0.0, 7.0, 0.5], np.float32)
    formats = q8.format_set([T.Q4_K, T.Q6_K])
    x = rng.standard_normal((5, H)).astype(np.float32)
    h = rng.standard_normal((5, H)).astype(np.float32)

    def gemm(w, v):
        return q8.matmul(w, q8.quantize_activations(v), np.empty((v.shape[0], w.rows), np.float32), formats=formats)

    ys = [gemm(d, swiglu(gemm(g, x), gemm(u, x), lim)) * wt for (g, u, d), wt, lim in zip(ffns, weights, limits)]
    want = h + (ys[0] + ys[1] + ys[2])
    desc = np.stack([q8.ffn_descriptor(*f) for f in ffns])
    scratch = q8.ffn_scratch(H, 3, sum(widths))
    for t in range(5):
        got = h[t].copy()
        q8.swiglu_ffns(desc, weights, limits, x[t], got, scratch, formats)
        _same(got[None], want[t:t + 1], f"fused FFN, token {t}")
