"""`stepstream profile` on experts held in RAM: a prompt of more than a few tokens went through
prefill, whose one request per chunk the recorder took for one token's (a review found 396
counts per layer for a 1,359-token prompt where 5,436 were due, and --trace refused: "asked for
16 experts per token"). The reference is the same prompt one token at a time, each a decode
step that asks for its own K experts."""

from __future__ import annotations

import numpy as np

import runtime
from offload.profile import ExpertProfile, RecordingProvider
from offload.trace import TraceRecorder

MODEL = runtime.__file__.rsplit("/", 1)[0] + "/data/step35-mini-q4_k_m.gguf"


def _record(n_batch: int, ids: list[int]):
    m = runtime.load(MODEL, n_ctx=512, n_batch=n_batch, n_threads=1, experts="ram", mtp=0)
    profile, recorder = ExpertProfile("mini", 0), TraceRecorder(m.cfg.n_expert_used)
    m.provider = RecordingProvider(m.provider, profile, m.cfg.n_expert, trace=recorder)
    m.eval(ids)
    moe = {i: m.cfg.n_expert for i in range(m.cfg.n_layers) if m.cfg.moe[i]}
    return profile, recorder.trace("mini", 0, moe), m.cfg.n_expert_used


def test_chunked_prefill_records_each_token_as_decoding_does():
    ids = [5 + (i * 37) % 1500 for i in range(300)]
    chunked, chunked_trace, k = _record(64, ids)
    single, single_trace, _ = _record(1, ids)
    assert chunked_trace.tokens == single_trace.tokens == len(ids)
    np.testing.assert_array_equal(np.sort(chunked_trace.ids, axis=2), np.sort(single_trace.ids, axis=2))  # slot order aside
    assert chunked.counts == single.counts
    assert all(sum(row) == len(ids) * k for row in chunked.counts.values())
