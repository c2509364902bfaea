"""The Python API as llama-cpp-python code uses it, against llama-cpp-python on the same GGUF (a
review's findings): load keywords, exception types, stream shapes, usage counts, and the
llama-cpp-python methods stepstream does not have."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import runtime
from runtime.base.errors import StepstreamError

llama_cpp = pytest.importorskip("llama_cpp")

MODEL = Path(runtime.__file__).parent / "data" / "step35-mini-q4_k_m.gguf"


@pytest.fixture(scope="module")
def ours():
    m = runtime.load(MODEL, n_ctx=256, n_threads=1)
    yield m
    m.close()


@pytest.fixture(scope="module")
def theirs():
    m = llama_cpp.Llama(model_path=str(MODEL), n_ctx=256, n_threads=1, verbose=False)
    yield m
    m.close()


def test_every_llama_init_keyword_at_its_default_is_taken():
    """27 of Llama.__init__'s keywords (n_ubatch, flash_attn, type_k, chat_format...) were refused as
    unknown at their defaults; and the path as model_path=."""
    defaults = {n: p.default for n, p in inspect.signature(llama_cpp.Llama.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    assert defaults.pop("n_threads") is None  # set below, as a test's threads are
    m = runtime.load(model_path=str(MODEL), n_threads=1, **defaults)
    try:
        assert m.create_completion("def", max_tokens=2, temperature=0)["choices"][0]["finish_reason"] == "length"
    finally:
        m.close()
    with pytest.raises(StepstreamError, match="n_ubatch=64 is not supported"):
        runtime.load(MODEL, n_ubatch=64)
    with pytest.raises(TypeError, match="give the model's path once"):
        runtime.load(MODEL, model_path=str(MODEL))


def test_errors_have_llama_cpp_pythons_types(ours, theirs):
    """`except ValueError` (a prompt past the context) and `except TypeError` (an unknown keyword)
    written for llama-cpp-python missed stepstream's errors."""
    long = "word " * 300
    for model in (theirs, ours):
        with pytest.raises(ValueError):
            model.create_completion(long, max_tokens=2)
        with pytest.raises(TypeError):
            model.create_completion("x", max_tokens=2, no_such_option=1)
    with pytest.raises(TypeError, match="not both"):
        ours.create_completion("x", max_tokens=2, temperature=1.0, temp=0.0)
    assert ours.create_completion("def", max_tokens=4, temperature=0)["choices"][0]["text"] == \
        theirs.create_completion("def", max_tokens=4, temperature=0)["choices"][0]["text"]  # sound after the errors


@pytest.mark.parametrize("kw", [dict(max_tokens=4), dict(max_tokens=32, stop=["ss"])], ids=["length", "stop"])
def test_streamed_chunks_are_llama_cpp_pythons(ours, theirs, kw):
    """A stop string's chunk carried the last text and the finish reason together: a loop that
    breaks on finish_reason before reading the text lost it."""
    def shape(model):
        return [(c["choices"][0]["text"], c["choices"][0]["finish_reason"], c["choices"][0]["logprobs"])
                for c in model.create_completion("def fib(n):", temperature=0, stream=True, **kw)]
    assert shape(ours) == shape(theirs)
    with_logprobs = list(ours.create_completion("def fib(n):", temperature=0, stream=True, logprobs=2, **kw))
    assert [c["choices"][0]["text"] for c in with_logprobs] == [t for t, _, _ in shape(theirs)]
    assert with_logprobs[-1]["choices"][0]["logprobs"] is None


def test_the_end_of_text_token_is_not_a_completion_token(ours):
    """usage.completion_tokens counted the end-of-generation token (llama-cpp-python does not); with
    logprobs it was one more than the tokens listed."""
    sampling = dict(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=25)
    ids = ours.tokenize("x")
    tokens = list(ours.generate(ids, max_tokens=32, **sampling))
    assert tokens[-1] in ours.tokenizer.eog_ids and len(tokens) < 32  # it ended on an end-of-text token
    r = ours.create_completion("x", max_tokens=32, **sampling)
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == len(tokens) - 1
    r = ours.create_completion("x", max_tokens=32, logprobs=0, **sampling)
    assert r["usage"]["completion_tokens"] == len(r["choices"][0]["logprobs"]["tokens"]) == len(tokens) - 1


def test_chat_replies_have_one_shape_whatever_path_makes_them(ours):
    """With logprobs or JSON mode the reply carried llama-server's `timings` and
    `prompt_tokens_details`, and its stream opened with content "" where the plain path (and
    llama-cpp-python) open with the role alone."""
    messages = [{"role": "user", "content": "hi"}]
    plain = ours.create_chat_completion(messages, max_tokens=4, temperature=0)
    json_mode = ours.create_chat_completion(messages, max_tokens=32, temperature=0, logprobs=True,
                                            response_format={"type": "json_object"})
    assert sorted(plain) == sorted(json_mode) and sorted(plain["usage"]) == sorted(json_mode["usage"])
    assert json_mode["usage"]["completion_tokens"] == len(json_mode["choices"][0]["logprobs"]["content"])
    for kw in ({}, {"logprobs": True}):
        first = next(iter(ours.create_chat_completion(messages, max_tokens=2, temperature=0, stream=True, **kw)))
        assert first["choices"][0]["delta"] == {"role": "assistant"}


def test_a_negative_temperature_draws_from_the_whole_distribution(ours):
    """llama-cpp-python's temp < 0 samples the unfiltered distribution; it was greedy here."""
    draws = {ours.create_completion("Once upon a time", max_tokens=8, temperature=-1, seed=s)["choices"][0]["text"]
             for s in (1, 2, 3)}
    assert len(draws) > 1
    text = ours.create_completion("Once upon a time", max_tokens=8, temperature=-1, seed=2)["choices"][0]["text"]
    assert text == ours.create_completion("Once upon a time", max_tokens=8, temperature=1.0, top_k=0, top_p=1.0,
                                          min_p=0.0, seed=2)["choices"][0]["text"]


def test_methods_stepstream_does_not_have_say_so(ours, theirs):
    for name in ("create_embedding", "embed"):
        assert hasattr(theirs, name) and not hasattr(ours, name)
        with pytest.raises(AttributeError, match=f"^{name}: "):
            getattr(ours, name)
    with pytest.raises(AttributeError, match="no attribute 'no_such_method'"):
        ours.no_such_method


def test_detokenize_takes_prev_tokens_and_tokenize_takes_0_or_1(ours, theirs):
    ids = ours.tokenize("one two three", add_bos=0)
    assert ids == theirs.tokenize(b"one two three", add_bos=False)
    assert ours.tokenize("one two three", add_bos=1) == theirs.tokenize(b"one two three", add_bos=True)
    whole = ours.detokenize(ids)
    assert ours.detokenize(ids[1:], prev_tokens=ids[:1]) == whole[len(ours.detokenize(ids[:1])):] == b" two three"
    with pytest.raises(Exception, match="add_bos must be True or False"):
        ours.tokenize("x", add_bos="no")


def test_n_ctx_is_a_number_and_a_method(ours, theirs):
    """llama-cpp-python code calls `llm.n_ctx()`: 'int' object is not callable."""
    assert ours.n_ctx() == theirs.n_ctx() == ours.n_ctx == 256 and ours.n_ctx + 0 == 256
    with pytest.raises(ValueError):  # a continuation past the context, as a prompt past it
        ours.eval(list(range(10, 300)))


def test_an_attribute_error_inside_a_property_is_not_hidden(ours, monkeypatch):
    """A __getattr__ for the methods stepstream lacks turned a bug inside the tokenizer's loading
    into "'Model' object has no attribute 'tokenizer'"."""
    from runtime.text import tokenizer

    saved = ours._tokenizer
    monkeypatch.setattr(ours, "_tokenizer", None)
    monkeypatch.setattr(tokenizer.Tokenizer, "from_gguf", staticmethod(lambda f: f.no_such_field))
    with pytest.raises(AttributeError, match="no_such_field"):
        ours.tokenizer
    monkeypatch.setattr(ours, "_tokenizer", saved)
