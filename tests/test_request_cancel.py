"""A request whose client leaves while its prompt is evaluated stops within one batch (a server
review: a 3,744-token prompt abandoned after 0.1 s held the queue for its whole 2.2 s, since
`cancelled()` was asked only before the prompt and after each token; llama-server releases the
slot between batches). The cache then holds the batches evaluated, a prefix the next request
reuses, and its reply is the one a fresh model gives."""

from __future__ import annotations

import numpy as np
import pytest

import runtime
from runtime.generation.loop import sampling_params
from runtime.generation.request import Request, run

MODEL = "runtime/data/step35-mini-q4_k_m.gguf"
N_BATCH = 64


def _after(n_calls: int):
    """A cancelled() that says yes from its n_calls-th call on; calls counted in `asked`."""
    asked = []

    def cancelled():
        asked.append(1)
        return len(asked) >= n_calls

    return cancelled, asked


def _reply(model, prompt, mtp, cancelled=lambda: False):
    req = Request(prompt, sampling_params(temperature=0.0), 6, logprobs=2, mtp=mtp, cancelled=cancelled)
    steps = list(run(model, req))
    return [lp for s in steps for lp in s.logprobs], req.timings


@pytest.mark.parametrize("mtp", [0, 3])
def test_a_request_cancelled_during_its_prompt_stops_within_a_batch(mtp):
    m = runtime.load(MODEL, n_threads=1, n_ctx=1024, n_batch=N_BATCH)
    prompt = m.tokenize("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n" * 20)
    assert len(prompt) > 6 * N_BATCH
    # asked before the prompt (run), then before each batch: the third batch is never evaluated
    cancelled, asked = _after(4)
    lps, t = _reply(m, prompt, mtp, cancelled)
    assert lps == [] and t.predicted_n == 0
    assert m.n_past == 2 * N_BATCH, m.n_past  # two batches evaluated, then it stopped
    again, t = _reply(m, prompt, mtp)
    assert t.cached_n == 2 * N_BATCH  # the evaluated prefix is reused
    fresh = runtime.load(MODEL, n_threads=1, n_ctx=1024, n_batch=N_BATCH)
    want, _ = _reply(fresh, prompt, mtp)
    assert [(a.token, a.logprob, a.top) for a in again] == [(b.token, b.logprob, b.top) for b in want]
    assert len(want) == 6 and np.isfinite([a.logprob for a in want]).all()
