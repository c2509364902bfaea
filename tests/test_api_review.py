"""The Python API's edges a review found: a closed model refuses at once (it hung 60 s streaming,
or raised KeyError in RAM), and detokenize checks its ids (a negative id wrapped to another
token, a large one raised IndexError).

Reference: the vocabulary size in the GGUF header (gguf-py)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
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
    for bad in (-1, vocab, 10**9):
        with pytest.raises(StepstreamError, match=f"token id {bad!r} is not in the vocabulary of {vocab} tokens"):
            m.detokenize([5, bad])
    with pytest.raises(StepstreamError, match=r"token ids must be integers, got 1.5 \(float\)"):  # named as its type now
        m.detokenize([5, 1.5])


def test_options_and_arguments_of_the_wrong_type_are_named():
    """They raised TypeError deep inside, or were taken: prefetch='no' left prefetch on."""
    for kw, words in ((dict(n_ctx="512"), "n_ctx must be an integer, got '512'"),
                      (dict(n_batch=8.0), "n_batch must be an integer, got 8.0"),
                      (dict(prefetch="no"), "prefetch must be True or False, got 'no'"),
                      (dict(ram_budget=-1), "ram_budget=-1 must be a positive size"),
                      (dict(ram_budget="3MiB", experts="ram"), "it cannot go with experts='ram'")):
        with pytest.raises(StepstreamError, match=words.replace("(", r"\(").replace(")", r"\)")):
            runtime.load(MODEL, **kw)
    m = runtime.load(MODEL, n_threads=1, n_ctx=np.int64(64))  # numpy integers are integers
    ids = m.tokenize("def f():")
    for kw, words in ((dict(max_tokens="5"), "max_tokens must be an integer"), (dict(max_tokens=2.5), "max_tokens"),
                      (dict(seed=1.5), "seed must be an integer")):
        with pytest.raises(StepstreamError, match=words):
            list(m.generate(ids, **kw))
    assert len(list(m.generate(ids, max_tokens=np.int64(3), seed=np.int64(1), temperature=0))) == 3


def test_tokenize_names_bytes_that_are_no_utf8():
    m = runtime.load(MODEL, n_threads=1)
    assert m.tokenize("café".encode()) == m.tokenize("café")
    with pytest.raises(StepstreamError, match=r"not UTF-8 \(byte 0xff at offset 2\)"):
        m.tokenize(b"ab\xff\xfe")


def test_stop_strings_and_text_of_the_wrong_type_are_named_and_the_model_stays_sound():
    """stop=[1, 2] raised TypeError deep inside, stop={"a": 1} was taken as ["a"], tokenize(12345)
    raised AttributeError (review 8); each is named, and the next completion is the same as before."""
    m = runtime.load(MODEL, n_threads=1, n_ctx=128)
    want = m.create_completion("def f(x):", max_tokens=6, temperature=0)["choices"][0]["text"]
    for stop in ([1, 2], {"a": 1}, b"x", ["ok", None], 7):
        with pytest.raises(StepstreamError, match="stop must be a string or a list of strings"):
            m.create_completion("def f(x):", max_tokens=6, temperature=0, stop=stop)
    for text in (12345, None, ["def"]):
        with pytest.raises(StepstreamError, match="the text to tokenize must be str or bytes"):
            m.tokenize(text)
    assert m.create_completion("def f(x):", max_tokens=6, temperature=0, stop=("zzz",))["choices"][0]["text"] == want
    assert m.create_completion("def f(x):", max_tokens=6, temperature=0)["choices"][0]["text"] == want


def test_chat_messages_are_checked_as_the_server_checks_them():
    m = runtime.load(MODEL, n_threads=1)
    with pytest.raises(StepstreamError, match="messages must hold at least one"):
        m.create_chat_completion([], max_tokens=1)
    with pytest.raises(StepstreamError, match=r"messages\[1\].role must be one of system, developer, user, assistant, "
                                              r"tool, got 'wizard'"):
        m.create_chat_completion([{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}], max_tokens=1)
    with pytest.raises(StepstreamError, match="'tool_choice' must be auto, none, required"):
        m.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=1, tool_choice="always")


def test_completions_take_mtp_and_name_unknown_options():
    m = runtime.load(MODEL, n_threads=1)
    plain = m.create_completion("def f():", max_tokens=8, temperature=0)["choices"][0]["text"]
    assert m.create_completion("def f():", max_tokens=8, temperature=0, mtp=3)["choices"][0]["text"] == plain
    msgs = [{"role": "user", "content": "hi"}]
    plain = m.create_chat_completion(msgs, max_tokens=8, temperature=0)["choices"][0]["message"]["content"]
    assert m.create_chat_completion(msgs, max_tokens=8, temp=0, mtp=2)["choices"][0]["message"]["content"] == plain
    # a llama-cpp-python keyword with a value that would change the output is named (it is taken
    # where it changes nothing: tests/test_hardening_api.py); log-probabilities are computed, chat
    # ones too (test_chat_logprobs_in_the_python_api)
    # (typical_p is honoured since: tests/test_sampling_llama_samplers.py)
    with pytest.raises(StepstreamError, match="tfs_z=0.5 is not supported by the Python API"):
        m.create_chat_completion(msgs, max_tokens=2, tfs_z=0.5)
    with pytest.raises(StepstreamError, match="unknown option.s. nonsense"):
        m.create_completion("def f():", max_tokens=2, nonsense=2)


@pytest.mark.parametrize("limit", [0, -1, -5])
def test_completion_calls_take_max_tokens_below_one_as_no_limit_like_llama_cpp_python(limit):
    """llama-cpp-python: "If max_tokens <= 0 or None, the maximum number of tokens to generate is
    unlimited and depends on n_ctx". They returned an empty completion ("length", 0 tokens)."""
    m = runtime.load(MODEL, n_threads=1, n_ctx=48)
    try:
        want = m.create_completion("def f():", max_tokens=None, temperature=0)
        got = m.create_completion("def f():", max_tokens=limit, temperature=0)
        assert got["choices"][0]["text"] == want["choices"][0]["text"] and got["usage"] == want["usage"]
        assert got["usage"]["completion_tokens"] > 16
        msgs = [{"role": "user", "content": "hi"}]
        want = m.create_chat_completion(msgs, max_tokens=None, temperature=0)
        got = m.create_chat_completion(msgs, max_tokens=limit, temperature=0)
        assert got["choices"][0]["message"] == want["choices"][0]["message"] and got["usage"] == want["usage"]
        assert got["usage"]["completion_tokens"] > 0
    finally:
        m.close()


def test_a_prompt_too_long_is_named_as_the_prompt_after_a_reused_prefix():
    """It was "207 tokens after 4 cached positions exceed the context of 64": the cache's words."""
    m = runtime.load(MODEL, n_threads=1, n_ctx=64)
    try:
        msgs = [{"role": "user", "content": "hi"}]
        m.create_chat_completion(msgs, max_tokens=2, temperature=0)
        long = [{"role": "user", "content": "hi " * 150}]
        n = len(m.chat_tokens(long))
        with pytest.raises(StepstreamError, match=rf"^the prompt is {n} tokens, more than the context of 64 "):
            m.create_chat_completion(long, max_tokens=2)
        assert m.create_chat_completion(msgs, max_tokens=2, temperature=0)["choices"][0]["message"]["content"] is not None
    finally:
        m.close()


def test_minus_one_means_random_seed_and_whole_context_as_on_the_command_line():
    """generate(seed=-1) and generate(repeat_last_n=-1) were refused, while the command line, the
    server and llama-cpp-python's callers use -1 for a fresh seed and the whole context."""
    from runtime.generation.sampling import SamplingParams

    assert SamplingParams(seed=-1).seed is None
    assert SamplingParams(repeat_last_n=-1) == SamplingParams(repeat_last_n=2**31 - 1)
    with pytest.raises(StepstreamError, match="or -1 for the whole context, got -2"):
        SamplingParams(repeat_last_n=-2)
    m = runtime.load(MODEL, n_threads=1, n_ctx=256)
    ids = m.tokenize("def parse(line):\n    parts = line.split()\n")
    whole = list(m.generate(ids, max_tokens=16, temperature=0, repeat_penalty=1.5, repeat_last_n=10**6))
    assert list(m.generate(ids, max_tokens=16, temperature=0, repeat_penalty=1.5, repeat_last_n=-1)) == whole
    assert len(list(m.generate(ids, max_tokens=4, temperature=1.0, seed=-1))) == 4


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), float("-inf")])
def test_a_budget_that_is_no_number_is_one_error(budget):
    """ram_budget=nan raised numpy's ValueError, inf an OverflowError."""
    with pytest.raises(StepstreamError, match="cannot read .* as a size"):
        runtime.load(MODEL, ram_budget=budget)


def test_gpu_budget_reads_as_the_command_line_reads_it():
    """The API took gpu_budget=True (1 byte) and refused 'AUTO', which --gpu-budget accepts."""
    from runtime.base.options import RuntimeOptions

    assert RuntimeOptions.from_kwargs(gpu_budget=" AUTO ").gpu_budget == "auto"
    with pytest.raises(StepstreamError, match="gpu_budget=True must be a size"):
        RuntimeOptions.from_kwargs(gpu_budget=True)


def test_a_q8_0_cache_with_the_gpu_tier_is_refused_not_ignored():
    """-ctk q8_0 --gpu-budget ran with the card's float32 cache and said nothing."""
    from runtime.base.options import RuntimeOptions

    with pytest.raises(StepstreamError, match=r"cache_type_k='q8_0'.*GPU tier keeps its KV cache in float32"):
        RuntimeOptions.from_kwargs(gpu_budget="auto", cache_type_k="q8_0")
    assert RuntimeOptions.from_kwargs(gpu_budget="auto", cache_type_k="f32").kv_types == ("f32", "f16")
