"""save_state / load_state, llama-cpp-python's way to keep a prompt's KV cache and return to it:
the logits after a restored state equal a fresh evaluation's bit for bit (sliding rings wrapped
and q8_0 caches included), the restored prefix is reused rather than evaluated again, the state
pickles, and a state of another file or cache layout is refused with the cache untouched."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime.model.kv_state import StateMismatch

MODEL = Path(runtime.__file__).parent / "data" / "step35-mini-q4_k_m.gguf"
RING = 144  # the shipped model's sliding rings: window 128 + rollback 16


def _ids(model, n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(100, 2000, n)]


@pytest.mark.parametrize("cache_type", ["f16", "q8_0"])
def test_a_restored_state_gives_the_fresh_logits_and_is_reused(cache_type):
    m = runtime.load(MODEL, n_ctx=512, n_threads=1, cache_type_k=cache_type, cache_type_v=cache_type)
    try:
        system = _ids(m, RING + 60, 1)  # past the rings' capacity: they have wrapped
        question = _ids(m, 5, 2)
        m.eval(system)
        state = m.save_state()
        assert state.n_tokens == len(system) and list(state.input_ids) == system and state.nbytes > 0
        m.eval_prompt(_ids(m, 300, 3))  # another conversation overwrites every ring slot
        m.load_state(pickle.loads(pickle.dumps(state)))
        assert list(m.history) == system
        logits, kept = m.eval_prompt(system + question)
        assert kept == len(system)  # nothing of the saved prompt evaluated again
        m.reset()
        fresh, _ = m.eval_prompt(system + question)
        assert np.array_equal(logits, fresh)
    finally:
        m.close()


def test_the_state_equals_llama_cpp_pythons_in_what_it_names():
    llama_cpp = pytest.importorskip("llama_cpp")
    ours = runtime.load(MODEL, n_ctx=256, n_threads=1)
    theirs = llama_cpp.Llama(model_path=str(MODEL), n_ctx=256, n_threads=1, verbose=False)
    try:
        ids = ours.tokenize("The quick brown fox")
        ours.eval(ids)
        theirs.eval(ids)
        a, b = ours.save_state(), theirs.save_state()
        assert a.n_tokens == b.n_tokens == len(ids)
        assert list(a.input_ids) == list(b.input_ids[: b.n_tokens])  # (theirs holds n_ctx entries)
    finally:
        ours.close()
        theirs.close()


def test_a_state_of_another_file_or_layout_is_refused_and_the_cache_kept(tmp_path):
    m = runtime.load(MODEL, n_ctx=512, n_threads=1)
    other = runtime.load(MODEL, n_ctx=512, n_threads=1, cache_type_k="q8_0")
    copy = tmp_path / "copy.gguf"
    with open(copy, "wb") as f:  # another file: the same weights, a byte more
        with open(MODEL, "rb") as src:
            shutil.copyfileobj(src, f)
        f.write(b"\0")
    try:
        m.eval(_ids(m, 40, 4))
        before = list(m.history)
        other.eval(_ids(m, 10, 5))
        with pytest.raises(StateMismatch, match="block 0.s key type is q8_0 in the state, f16 here"):
            m.load_state(other.save_state())
        assert list(m.history) == before and m.n_past == 40
        with pytest.raises(StateMismatch, match="expected a state from save_state"):
            m.load_state({"tokens": []})
        assert m.n_past == 40
        logits, kept = m.eval_prompt(before + [7])
        assert kept == 40 and np.isfinite(logits).all()
        twin = runtime.load(copy, n_ctx=512, n_threads=1)
        with pytest.raises(StateMismatch, match=r"saved from step35-mini-q4_k_m.gguf \(\d+ bytes\), this model is copy"):
            twin.load_state(m.save_state())
        twin.close()
    finally:
        m.close()
        other.close()
    small = runtime.load(MODEL, n_ctx=64, n_threads=1)
    big = runtime.load(MODEL, n_ctx=512, n_threads=1)
    try:
        big.eval(_ids(big, 100, 6))
        with pytest.raises(StateMismatch, match="state holds 100 tokens, more than this model's context of 64|layout"):
            small.load_state(big.save_state())
        assert small.n_past == 0
    finally:
        small.close()
        big.close()


def test_a_damaged_state_is_refused_before_anything_is_written(tmp_path):
    """A truncated block was written partway (a raw ValueError), and the cache then reused
    positions it no longer held (a review)."""
    import dataclasses
    import os

    m = runtime.load(MODEL, n_ctx=512, n_threads=1)
    try:
        m.eval(_ids(m, 50, 1))
        state = m.save_state()
        m.reset()
        m.eval(_ids(m, 30, 2))
        slots = list(state.slots)
        slots[-1] = tuple(a[:10] for a in slots[-1])
        for bad in (dataclasses.replace(state, slots=tuple(slots)), dataclasses.replace(state, tokens=state.tokens[:-1])):
            with pytest.raises(StateMismatch, match="damaged"):
                m.load_state(bad)
            assert m.n_past == 30 and all(layer.n == 30 for layer in m.cache.layers)
    finally:
        m.close()
    copy = tmp_path / "moved.gguf"
    shutil.copyfile(MODEL, copy)
    m = runtime.load(copy, n_ctx=256, n_threads=1)
    try:  # the file renamed after loading: a raw FileNotFoundError
        m.eval(_ids(m, 8, 3))
        os.rename(copy, tmp_path / "elsewhere.gguf")
        m.load_state(m.save_state())
        assert m.n_past == 8
    finally:
        m.close()
