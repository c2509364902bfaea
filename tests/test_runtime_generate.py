"""Sampling functions, stop handling, the generate iterator and OpenAI-shaped completions."""

from __future__ import annotations

import numpy as np
import pytest

import runtime
from runtime.base.errors import StepstreamError
from runtime.generation import StopStrings, generate, greedy_tokens
from runtime.generation.sampling import Sampler, SamplingParams, min_p, repetition_penalty, softmax, temperature, top_k, top_p


@pytest.fixture(scope="module")
def f32_path(tiny_gguf):
    return tiny_gguf("f32")


@pytest.fixture(scope="module")
def model(f32_path):
    return runtime.load(f32_path, n_ctx=256)


# ------------------------------------------------------------------ filters

LOGITS = np.array([3.0, 1.0, 2.0, -1.0, 0.0], np.float32)


def kept(z):
    return sorted(np.flatnonzero(np.isfinite(z)).tolist())


def test_top_k():
    assert kept(top_k(LOGITS, 2)) == [0, 2]
    assert kept(top_k(LOGITS, 0)) == [0, 1, 2, 3, 4]


def test_top_p_keeps_the_smallest_set_reaching_p():
    p = softmax(LOGITS)
    assert kept(top_p(LOGITS, p[0] - 1e-6)) == [0]
    assert kept(top_p(LOGITS, p[0] + 1e-6)) == [0, 2]
    assert kept(top_p(LOGITS, 1.0)) == [0, 1, 2, 3, 4]


def test_min_p_is_relative_to_the_best_token():
    p = softmax(LOGITS)
    assert kept(min_p(LOGITS, p[2] / p[0] - 1e-4)) == [0, 2]
    assert kept(min_p(LOGITS, p[2] / p[0] + 1e-4)) == [0]


def test_repetition_penalty_pushes_seen_tokens_down():
    z = repetition_penalty(LOGITS, [0, 3, 3], 2.0)
    np.testing.assert_allclose(z, [1.5, 1.0, 2.0, -2.0, 0.0])
    np.testing.assert_array_equal(repetition_penalty(LOGITS, [0], 1.0), LOGITS)


def test_temperature_and_greedy():
    np.testing.assert_allclose(temperature(LOGITS, 0.5), LOGITS * 2)
    assert Sampler(SamplingParams(temperature=0))(LOGITS) == 0
    assert Sampler(SamplingParams(temperature=0, repeat_penalty=10.0))(LOGITS, [0]) == 2


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=5)
    a = [Sampler(params)(LOGITS) for _ in range(3)]
    s1, s2 = Sampler(params), Sampler(params)
    assert [s1(LOGITS) for _ in range(50)] == [s2(LOGITS) for _ in range(50)]
    counts = np.bincount([s1(LOGITS) for _ in range(4000)], minlength=5) / 4000
    np.testing.assert_allclose(counts, softmax(LOGITS), atol=0.03)
    assert len(set(a)) == 1  # same seed, same first draw


def test_filters_compose_in_the_sampler():
    s = Sampler(SamplingParams(temperature=5.0, top_k=2, top_p=1.0, min_p=0.0, seed=0))
    assert {s(LOGITS) for _ in range(200)} == {0, 2}


def test_bad_sampling_params():
    with pytest.raises(StepstreamError, match="top_p"):  # 0 is allowed: the most likely token alone (OpenAI's range)
        SamplingParams(top_p=-0.1)
    with pytest.raises(StepstreamError, match="min_p"):
        SamplingParams(min_p=2)


# ------------------------------------------------------------------ stop strings


def test_stop_strings_hold_back_a_possible_start():
    s = StopStrings(["STOP", "\n\n"])
    assert s.push("Hello S") == ("Hello ", False)
    assert s.push("T") == ("", False)
    assert s.push("x") == ("STx", False)
    assert s.push(" end\n") == (" end", False)
    assert s.push("\nmore") == ("", True)
    s = StopStrings(["STOP"])
    assert s.push("abc ST") == ("abc ", False)
    assert s.push("OP and more") == ("", True)


def test_stop_strings_name_the_one_that_ended_the_text():
    """The earliest match wins; of two at one place, the first given (Anthropic's stop_sequence).
    Pushed a character at a time, the shorter of two at one place completes first."""
    for stops, text, cut, hit, streamed in [(["b", "ab"], "xxab", "xx", "ab", "ab"), (["ab", "a"], "xxab", "xx", "ab", "a"),
                                            (["a", "ab"], "xxab", "xx", "a", "a"), (["", "zz", "c"], "abczz", "ab", "c", "c")]:
        s = StopStrings(stops)
        assert s.hit is None and s.push(text) == (cut, True) and s.hit == hit, (stops, text, s.hit)
        s, out = StopStrings(stops), []
        for ch in text:  # until the hit, as generation stops there
            out.append(s.push(ch))
            if out[-1][1]:
                break
        assert "".join(t for t, _ in out) == cut and out[-1][1] and s.hit == streamed, (stops, s.hit)


# ------------------------------------------------------------------ generation


def test_greedy_32_tokens_equal_llama_cpp(f32_path, model):
    import llama_cpp

    prompt = model.tokenize("def fibonacci(n):\n    return")
    ours = greedy_tokens(model, prompt, 32)
    llm = llama_cpp.Llama(model_path=str(f32_path), n_ctx=256, n_threads=2, verbose=False)
    theirs = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        theirs.append(t)
        if len(theirs) == 32:
            break
    llm.close()
    assert ours == theirs


def test_generate_reuses_the_cached_prefix(f32_path, model):
    prompt = model.tokenize("import os\nimport sys\n")
    first = greedy_tokens(model, prompt, 5)
    evaluated = []
    original = model._hidden_states  # what eval and hidden evaluate through
    model._hidden_states = lambda toks, last_only: (evaluated.append(len(toks)), original(toks, last_only))[1]
    try:
        again = greedy_tokens(model, prompt + first[:2], 3)
    finally:
        del model._hidden_states
    assert again == first[2:5]
    assert evaluated[0] == 1  # only the new last token: the rest was in the cache
    fresh = runtime.load(f32_path, n_ctx=256)
    assert greedy_tokens(fresh, prompt + first[:2], 3) == again


def test_llama_cpp_python_spellings(model):
    prompt = model.tokenize("x = ")
    a = list(model.generate(prompt, max_tokens=5, temp=0))
    assert a == list(model.generate(prompt, max_tokens=5, temperature=0)) == greedy_tokens(model, prompt, 5)
    assert model("x = ", max_tokens=3, temperature=0)["choices"][0]["text"] == \
        model.create_completion("x = ", max_tokens=3, temperature=0)["choices"][0]["text"]


def test_generate_stops_at_end_of_generation(model):
    eos = model.tokenizer.eos_id
    script = iter([5, 6, eos, 7])
    out = list(generate(model, model.tokenize("x"), lambda logits, history: next(script)))
    assert out == [5, 6, eos]
    script = iter([5, 6, eos, 7])
    assert list(generate(model, model.tokenize("x"), lambda l, h: next(script), stop_at_eog=False, max_tokens=4)) == [5, 6, eos, 7]


def test_generation_stops_when_the_context_is_full(f32_path):
    m = runtime.load(f32_path, n_ctx=20)
    out = m.create_completion("hello", max_tokens=None, temperature=0)
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["total_tokens"] == 21  # the last sampled token needs no cache slot


def test_create_completion_shape_and_limits(model):
    out = model.create_completion("def f(x):", max_tokens=12, temperature=0)
    assert out["object"] == "text_completion"
    choice = out["choices"][0]
    assert choice["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 12
    assert out["usage"]["prompt_tokens"] == len(model.tokenize("def f(x):"))
    text = choice["text"]
    # A stop string cuts the text before it.
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = model.create_completion("def f(x):", max_tokens=12, temperature=0, stop=[stop])
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["text"] == text[: text.find(stop)]


def test_chat_completion_and_streaming_agree(model):
    messages = [{"role": "user", "content": "Say something."}]
    out = model.create_chat_completion(messages, max_tokens=8, seed=3, temperature=0.9)
    assert out["object"] == "chat.completion"
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)
    chunks = list(model.create_chat_completion(messages, max_tokens=8, seed=3, temperature=0.9, stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == msg["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == out["choices"][0]["finish_reason"]


def test_prefix_reuse_falls_back_to_a_fresh_start(f32_path):
    """When the sliding ring cannot roll back to the common prefix, the prompt is evaluated anew."""
    m = runtime.load(f32_path, n_ctx=256, rollback=0)
    tokens = np.random.default_rng(2).integers(0, 700, 60).tolist()
    m.eval(tokens)
    other = tokens[:30] + [7, 8, 9]
    got = m.eval_reusing_prefix(other)
    assert m.history == other
    np.testing.assert_allclose(got, runtime.load(f32_path, n_ctx=256).eval(other), rtol=1e-4, atol=1e-4)
