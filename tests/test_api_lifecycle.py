"""A model's whole life through the Python API, as a review of it measured: what close() frees,
which thread's count n_threads sets, trim's argument, and llama-cpp-python's small accessors
(against llama-cpp-python on the same file)."""

from __future__ import annotations

import gc
import os
import threading

import numba
import numpy as np
import pytest

import runtime
from runtime.base.errors import StepstreamError
from runtime.model.model import Model

MODEL = "runtime/data/step35-mini-q4_k_m.gguf"


def _maps() -> int:
    """Mappings of the model file in this process."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if os.path.basename(MODEL) in line)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _text(m, prompt="def fib(n):", n=6) -> str:
    return m.create_completion(prompt, max_tokens=n, temperature=0)["choices"][0]["text"]


@pytest.mark.parametrize("mtp", [0, "auto"])
def test_close_frees_the_maps_descriptors_and_caches_of_a_model_still_referenced(mtp):
    """close() freed only the expert provider: 20 closed models held 20 maps, 40 descriptors and
    their KV caches (a review). Now a closed model keeps none, and says it is closed."""
    gc.collect()  # what earlier tests left for the collector goes now, not between two counts below
    fds, maps = _fds(), _maps()
    kept = []
    for _ in range(3):
        m = runtime.load(MODEL, n_threads=1, n_ctx=512, mtp=mtp)
        want = _text(m)
        assert _maps() == maps + 1
        m.close()
        kept.append(m)
        assert _maps() == maps and _fds() == fds
        assert m.cache.nbytes == 0 and m.n_past == 0 and list(m.history) == []
        assert m.detokenize(m.tokenize("def fib")) == b"def fib"  # the tokenizer stays
        for call in (lambda: _text(m), lambda: m.eval([1, 2]), lambda: list(m.generate([1, 2], 3)),
                     lambda: m.output(np.zeros((1, m.cfg.hidden), np.float32)), m.warm_up):
            with pytest.raises(StepstreamError, match="the model was closed"):
                call()
        m.close()  # twice: nothing more to do
    assert want == _text(runtime.load(MODEL, n_threads=1, n_ctx=512))


def test_a_model_dropped_without_close_frees_its_map_at_once():
    """Reference cycles (a file and its parts, a model and its MTP drafter) kept the map and the
    descriptors until the garbage collector ran."""
    gc.collect()
    maps = _maps()
    gc.disable()
    try:
        for mtp in (0, 3):
            m = runtime.load(MODEL, n_threads=1, n_ctx=256, mtp=mtp)
            _text(m)
            del m
            assert _maps() == maps
    finally:
        gc.enable()


def test_with_closes_the_model():
    with runtime.load(MODEL, n_threads=1, n_ctx=128) as m:
        assert _text(m, n=2)
    assert m.closed and m.file.closed


def test_n_threads_holds_on_every_thread_that_calls():
    """Numba's thread count is per thread: a call from a worker thread ran with the default
    count, and a second model's load changed the first's (a review: 11-14 tok/s against 260+)."""
    seen = []
    real = Model._hidden

    def spying(self, *a, **k):
        seen.append((self.options.n_threads, numba.get_num_threads()))
        return real(self, *a, **k)

    one = runtime.load(MODEL, n_threads=1, n_ctx=128)
    two = runtime.load(MODEL, n_threads=2, n_ctx=128)  # after one's load, on the same thread
    Model._hidden = spying
    try:
        _text(one, n=2)
        worker = threading.Thread(target=lambda: (_text(one, n=2), _text(two, n=2)))
        worker.start()
        worker.join()
    finally:
        Model._hidden = real
    assert seen and all(got == min(want, numba.config.NUMBA_NUM_THREADS) for want, got in seen), seen
    assert {want for want, _ in seen} == {1, 2}


@pytest.mark.parametrize("bad", [2.5, np.float64(1.0), True, "1"])
def test_trim_refuses_what_is_not_a_count_and_changes_nothing(bad):
    """trim(2.5) set n_past to 12.5 before failing, and every later call failed until reset()."""
    m = runtime.load(MODEL, n_threads=1, n_ctx=128)
    want = _text(m)
    before = (m.n_past, list(m.history))
    with pytest.raises(StepstreamError, match="trim.*integer"):
        m.trim(bad)
    assert (m.n_past, list(m.history)) == before
    assert _text(m) == want
    m.trim(np.int64(2))  # numpy's integers are counts
    assert m.n_past == before[0] - 2


def test_small_accessors_as_llama_cpp_python_gives_them():
    import llama_cpp

    llm = llama_cpp.Llama(model_path=MODEL, n_ctx=64, verbose=False)
    m = runtime.load(MODEL, n_ctx=64)
    try:
        assert (m.n_vocab(), m.n_embd(), m.token_bos(), m.token_eos()) == \
            (llm.n_vocab(), llm.n_embd(), llm.token_bos(), llm.token_eos())
    finally:
        llm.close()


def test_a_generation_stepped_after_close_says_the_model_was_closed():
    """close() bumped the cache's version, so a stream stepped after it said "stale" (a review)."""
    m = runtime.load(MODEL, n_threads=1, n_ctx=128, mtp=3)
    stream = m.create_completion("def fib(n):", max_tokens=30, temperature=0, stream=True)
    next(stream), next(stream)
    m.close()
    with pytest.raises(StepstreamError, match="the model was closed"):
        list(stream)
    for call in (lambda: m.mtp_logits([1, 2, 3]), lambda: m.mtp_draft(1, 2)):
        with pytest.raises(StepstreamError, match="the model was closed"):
            call()
