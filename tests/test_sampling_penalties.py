"""Presence and frequency penalties and logit bias (runtime/generation/sampling.py), against
llama.cpp through llama-cpp-python on the same float32 file: greedy tokens under each setting
are llama.cpp's. A float64 reference of llama.cpp's penalties sampler checks the function."""

from __future__ import annotations

import numpy as np
import pytest

import runtime
from runtime.base.errors import StepstreamError
from runtime.generation import sampling_params
from runtime.generation.loop import generate
from runtime.generation.sampling import Sampler, SamplingParams, bias_arrays, biased, repetition_penalty


def _reference(logits, recent, repeat, frequency, presence):
    """llama.cpp's llama_sampler_penalties_apply, in float64."""
    out = logits.astype(np.float64)
    counts = {}
    for t in recent:
        counts[t] = counts.get(t, 0) + 1
    for t, c in counts.items():
        out[t] = out[t] * repeat if out[t] <= 0 else out[t] / repeat
        out[t] -= c * frequency + (c > 0) * presence
    return out


def test_the_penalties_are_llama_cpps():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, 500).astype(np.float32)
    recent = rng.integers(0, 60, 64).tolist()
    for repeat, frequency, presence in [(1.0, 0.5, 0.0), (1.0, 0.0, 1.5), (1.3, 0.7, -0.4), (0.8, -1.0, 2.0)]:
        got = repetition_penalty(logits, recent, repeat, frequency, presence)
        np.testing.assert_allclose(got, _reference(logits, recent, repeat, frequency, presence), rtol=1e-6, atol=1e-5)
    assert np.array_equal(repetition_penalty(logits, [], 1.3, 1.0, 1.0), logits)
    z = biased(logits, bias_arrays(((3, -100.0), (7, 2.5))))
    assert z[3] == np.float32(logits[3] - 100) and z[7] == np.float32(logits[7] + 2.5)
    with pytest.raises(StepstreamError, match="outside the vocabulary"):
        biased(logits, bias_arrays(((500, 1.0),)))


@pytest.fixture(scope="module")
def f32_path(tiny_gguf):
    return tiny_gguf("f32")


def _llama_cpp_greedy(path, prompt: list[int], n: int, last_n: int, repeat=1.0, frequency=0.0, presence=0.0,
                      bias=()) -> list[int]:
    """llama.cpp's chain as llama-server and llama-cli build it: logit bias, penalties, then
    greedy, with the prompt's tokens accepted into the penalties' window before sampling."""
    import ctypes

    import llama_cpp as lc

    llm = lc.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
    vocab = llm.n_vocab()
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    if bias:
        arr = (lc.llama_logit_bias * len(bias))(*[lc.llama_logit_bias(t, b) for t, b in bias])
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_logit_bias(vocab, len(bias), ctypes.cast(arr, ctypes.POINTER(lc.llama_logit_bias))))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_penalties(vocab, last_n, repeat, frequency, presence))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
    for t in prompt:
        lc.llama_sampler_accept(chain, t)
    out = []
    llm.eval(prompt)
    for _ in range(n):
        tok = lc.llama_sampler_sample(chain, llm._ctx.ctx, -1)  # (accepts it too)
        out.append(tok)
        llm.eval([tok])
    lc.llama_sampler_free(chain)
    llm.close()
    return out


@pytest.mark.parametrize("kw", [dict(frequency_penalty=0.8), dict(presence_penalty=1.5),
                                dict(frequency_penalty=0.5, presence_penalty=0.5, repeat_penalty=1.2, repeat_last_n=16),
                                dict(logit_bias={5: 3.0, 17: -100.0}, frequency_penalty=0.3)])
def test_greedy_tokens_under_penalties_equal_llama_cpp(f32_path, kw):
    model = runtime.load(str(f32_path), n_ctx=256)
    prompt = model.tokenize("def fibonacci(n):\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\ndef")
    params = sampling_params(temperature=0, **kw)
    ours = list(generate(model, prompt, Sampler(params), 48, stop_at_eog=False))
    plain = list(generate(model, prompt, Sampler(sampling_params(temperature=0)), 48, stop_at_eog=False))
    assert ours != plain  # the setting changes the text here
    model.close()
    theirs = _llama_cpp_greedy(f32_path, prompt, 48, params.repeat_last_n, params.repeat_penalty,
                               params.frequency_penalty, params.presence_penalty, params.logit_bias)
    assert ours == theirs


def test_bad_settings_are_named():
    with pytest.raises(StepstreamError, match="frequency_penalty must be a finite number"):
        SamplingParams(frequency_penalty=float("nan"))
    with pytest.raises(StepstreamError, match="is not a token id"):
        sampling_params(logit_bias={"x": 1.0})
    with pytest.raises(StepstreamError, match="names token 3 twice"):
        sampling_params(logit_bias={3: 1.0, "3": 2.0})
    assert sampling_params(logit_bias={"12": 1, 4: -2.5}).logit_bias == ((4, -2.5), (12, 1.0))


def test_drafting_gives_the_same_tokens_under_penalties():
    """MTP verify passes sample each drafted position with the penalties' window as plain decoding
    has it there (the shipped model's heads)."""
    from runtime.cli.demo import model_path

    with runtime.load(model_path(), n_ctx=1024) as m:
        prompt = m.tokenize("import os\nimport sys\n\n\ndef main(argv):\n")
        params = sampling_params(temperature=0, frequency_penalty=0.7, presence_penalty=0.4, logit_bias={"10": 2.0})
        plain = list(generate(m, prompt, Sampler(params), 64, stop_at_eog=False, mtp=0))
        for k in (3, "auto"):
            m.reset()
            assert list(generate(m, prompt, Sampler(params), 64, stop_at_eog=False, mtp=k)) == plain
        m.reset()
        assert plain != list(generate(m, prompt, Sampler(sampling_params(temperature=0)), 64, stop_at_eog=False))


def test_a_token_is_biased_once_and_large_biases_are_checked_quickly():
    """(review 96) A token named twice kept one of its biases; duplicate checks were quadratic
    (16,000 entries took 4 s); a non-ASCII digit was read as a token id."""
    import time

    with pytest.raises(StepstreamError, match="names a token twice"):
        SamplingParams(logit_bias=((5, 10.0), (5, 10.0)))
    with pytest.raises(StepstreamError, match="is not a token id"):
        sampling_params(logit_bias={"\u0665": 1.0})
    t0 = time.perf_counter()
    params = sampling_params(logit_bias={i: -1.0 for i in range(100_000)})
    assert time.perf_counter() - t0 < 5 and len(params.logit_bias) == 100_000


def test_the_python_api_refuses_a_bias_outside_the_vocabulary_before_evaluating(tiny_gguf):
    """(review 96) It was refused at the first token, after the whole prompt's evaluation."""
    model = runtime.load(str(tiny_gguf("f32")), n_ctx=256)
    with pytest.raises(StepstreamError, match="logit_bias names token 99999, outside the vocabulary"):
        model.create_completion("def f(x):", max_tokens=2, logit_bias={99999: 1.0})
    assert model.n_past == 0
    model.close()


def test_numbers_too_large_for_a_float_are_named():
    """(review 97) An integer of 400 digits raised OverflowError from the Python API."""
    for kw in (dict(presence_penalty=10**400), dict(temperature=10**400), dict(logit_bias={5: 10**400})):
        with pytest.raises(StepstreamError):
            sampling_params(**kw)
    with pytest.raises(StepstreamError):
        SamplingParams(logit_bias=((5, 10**400),))
