"""A generator owns the model's cache only while nothing else changes it. Found by a review:
- dropping a half-read MTP generator (closed later by the garbage collector) trimmed the cache of
  the generation running at that moment, whose text then went wrong without an error;
- resuming a generator after another generate call continued the other prompt's text;
- max_tokens=0 with MTP drafting generated until the context was full.

Reference: the same generation run alone on a fresh model (the greedy tokens)."""

from __future__ import annotations

import gc
import itertools
from pathlib import Path

import pytest

import runtime
from runtime.base.errors import StepstreamError

MODEL = Path(runtime.__file__).parent / "data" / "step35-mini-q4_k_m.gguf"


@pytest.fixture(scope="module")
def model():
    return runtime.load(MODEL, n_threads=1, n_ctx=512)


def _prompts(m):
    return m.tokenize("def fib(n):"), m.tokenize("import os\nimport sys\n\n\nclass Foo:")


@pytest.mark.parametrize("mtp", [0, 3])
def test_closing_an_old_generator_leaves_the_running_one_alone(model, mtp):
    pa, pb = _prompts(model)
    ref = list(model.generate(pb, max_tokens=30, temperature=0))
    a = model.generate(pa, max_tokens=30, temperature=0, mtp=mtp)
    list(itertools.islice(a, 5))
    b = model.generate(pb, max_tokens=30, temperature=0)
    got = list(itertools.islice(b, 20))
    a.close()  # what the garbage collector does to a dropped generator, at any moment
    del a
    gc.collect()
    got += list(b)
    assert got == ref


@pytest.mark.parametrize("mtp", [0, 3])
def test_a_stale_generator_says_so(model, mtp):
    pa, pb = _prompts(model)
    a = model.generate(pa, max_tokens=12, temperature=0, mtp=mtp)
    next(a)
    list(model.generate(pb, max_tokens=5, temperature=0))
    with pytest.raises(StepstreamError, match="this generation is stale"):
        list(a)
    for change in (lambda: model.eval([5]), lambda: model.trim(1), model.reset):
        a = model.generate(pa, max_tokens=12, temperature=0, mtp=mtp)
        next(a)
        change()
        with pytest.raises(StepstreamError, match="stale"):
            next(a)


@pytest.mark.parametrize("mtp", [0, 2, "auto"])
@pytest.mark.parametrize("max_tokens", [0, -1])
def test_no_token_wanted_gives_none(model, mtp, max_tokens):
    pa, _ = _prompts(model)
    assert list(model.generate(pa, max_tokens=max_tokens, temperature=0, mtp=mtp)) == []


def test_a_generation_read_to_the_end_after_another_finished_is_still_exact(model):
    """Reading generators one after the other (the common case) never trips the check."""
    pa, pb = _prompts(model)
    ra = list(model.generate(pa, max_tokens=10, temperature=0, mtp=3))
    rb = list(model.generate(pb, max_tokens=10, temperature=0, mtp=3))
    assert ra == list(model.generate(pa, max_tokens=10, temperature=0))
    assert rb == list(model.generate(pb, max_tokens=10, temperature=0))
