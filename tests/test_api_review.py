"""The Python API's edges a review found: a closed model refuses at once (it hung 60 s streaming,
or raised KeyError in RAM), and detokenize checks its ids (a negative id wrapped to another
token, a large one raised IndexError).

Reference: the vocabulary size in the GGUF header (gguf-py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from gguf import GGUFReader

import runtime
from runtime.base.errors import StepstreamError

MODEL = Path(runtime.__file__).parent / "data" / "step35-mini-q4_k_m.gguf"


@pytest.mark.parametrize("experts", ["ram", "stream"])
def test_a_closed_model_refuses_at_once(experts):
    m = runtime.load(MODEL, n_threads=1, experts=experts)
    ids = m.tokenize("def f():")
    m.close()
    m.close()  # twice is fine
    t0 = time.perf_counter()
    with pytest.raises(StepstreamError, match="the model was closed"):
        list(m.generate(ids, max_tokens=3))
    with pytest.raises(StepstreamError, match="the model was closed"):
        m.eval(ids)
    assert time.perf_counter() - t0 < 5
    assert m.n_past == 0


def test_detokenize_checks_its_ids():
    m = runtime.load(MODEL, n_threads=1)
    vocab = len(GGUFReader(MODEL).fields["tokenizer.ggml.tokens"].data)
    assert m.detokenize([vocab - 1]) == m.detokenize([vocab - 1])  # the last id is fine
    for bad in (-1, vocab, 10**9, 1.5):
        with pytest.raises(StepstreamError, match=f"token id {bad!r} is not in the vocabulary of {vocab} tokens"):
            m.detokenize([5, bad])
