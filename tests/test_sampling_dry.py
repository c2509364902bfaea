"""DRY (runtime/generation/dry.py): the logits it leaves are llama.cpp's DRY sampler's (through
llama-cpp-python's C API, its breakers processed from the same vocabulary), history after
history of a text that repeats itself across breakers, under four settings; the server, the CLI
and the Python API take it by llama-server's and llama.cpp's names."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

import runtime
from runtime.base.errors import StepstreamError
from runtime.generation import sampling_params
from runtime.generation.dry import DEFAULT_BREAKERS, dry, heads_for
from runtime.generation.loop import generate
from runtime.generation.sampling import Sampler, SamplingParams

lc = pytest.importorskip("llama_cpp")

TEXT = ('def f(x):\n    return x + 1\n\ndef g(x):\n    return x + 1 + f(x) if x else "a b c d e f" + "a b c d e f" * 2\n'
        'print(f(1), g(2)) print(f(1), g(2)) print(f(1), g: (2) * print(f(1), g(2)) print(f(1), g(2)) print(f(1')


@pytest.fixture(scope="module")
def vocabs():
    from runtime.base.gguf_file import GGUFModelFile
    from runtime.cli.demo import model_path
    from runtime.text.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(GGUFModelFile(model_path()))
    llm = lc.Llama(model_path=str(model_path()), vocab_only=True, verbose=False)
    yield tok, lc.llama_model_get_vocab(llm.model), llm.n_vocab()
    llm.close()


def _theirs(vocab, n, z, history, multiplier, base, allowed, last_n, breakers) -> np.ndarray:
    names = (ctypes.c_char_p * len(breakers))(*[b.encode() for b in breakers])
    s = lc.llama_sampler_init_dry(vocab, multiplier, base, allowed, last_n, names, len(breakers))
    for t in history:
        lc.llama_sampler_accept(s, t)
    data = (lc.llama_token_data * n)(*[lc.llama_token_data(i, float(z[i]), 0.0) for i in range(n)])
    lc.llama_sampler_apply(s, ctypes.byref(lc.llama_token_data_array(data, n, -1, False)))
    lc.llama_sampler_free(s)
    out = np.empty(n, np.float32)
    for i in range(n):
        out[data[i].id] = data[i].logit
    return out


@pytest.mark.parametrize("setting", [(0.8, 1.75, 2, 4096, DEFAULT_BREAKERS), (1.5, 2.0, 3, 40, DEFAULT_BREAKERS),
                                     (0.5, 1.1, 1, 16, ("\n", "print(")), (2.0, 1.75, 2, 200, ())])
def test_the_logits_are_llama_cpps(vocabs, setting):
    tok, vocab, n = vocabs
    multiplier, base, allowed, last_n, breakers = setting
    heads = heads_for(tok, breakers)
    history = tok.encode(TEXT, add_bos=False)
    rng = np.random.default_rng(0)
    penalized = 0
    for cut in range(len(history) // 3, len(history) + 1, 3):
        z = rng.normal(0, 2, n).astype(np.float32)
        ours = dry(z, history[:cut], heads, multiplier, base, allowed, last_n)
        np.testing.assert_allclose(ours, _theirs(vocab, n, z, history[:cut], *setting), rtol=1e-5, atol=1e-4)
        penalized += int(np.count_nonzero(ours != z))
    assert penalized > 10  # (repetitions were penalized)


def test_generation_repeats_less_and_drafting_gives_the_same_tokens():
    from runtime.cli.demo import model_path

    with runtime.load(model_path(), n_ctx=512, n_threads=1) as m:
        prompt = m.tokenize("x = 1\nx = 1\nx = 1\nx = 1\nx =")
        plain = list(generate(m, prompt, Sampler(sampling_params(temperature=0)), 40, stop_at_eog=False))
        params = sampling_params(temperature=0, dry_multiplier=2.0, dry_allowed_length=2)
        ours = list(generate(m, prompt, Sampler(params), 40, stop_at_eog=False, mtp=0))
        assert ours != plain
        for mtp in (3, "auto"):
            m.reset()
            assert list(generate(m, prompt, Sampler(params), 40, stop_at_eog=False, mtp=mtp)) == ours
        api = m.create_completion(m.detokenize(prompt).decode(), max_tokens=40, temperature=0, dry_multiplier=2.0)
        assert api["choices"][0]["text"] == m.detokenize(ours).decode("utf-8", "replace")[:len(api["choices"][0]["text"])]
    with pytest.raises(StepstreamError, match="dry_sequence_breakers must be a list of strings"):
        sampling_params(dry_sequence_breakers="\n")
    with pytest.raises(StepstreamError, match="dry_allowed_length must be an integer >= -1"):
        SamplingParams(dry_allowed_length=-3)


def test_the_server_and_the_cli_take_it(capsys):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from runtime.cli import main
    from runtime.cli.demo import model_path
    from runtime.server.app import create_app
    from runtime.server.engine import Engine

    args = ["run", "-m", str(model_path()), "-p", "x = 1\nx = 1\nx = 1\nx =", "-n", "24", "--temp", "0", "-t", "1",
            "--no-display-prompt"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--dry-multiplier", "2", "--dry-sequence-breaker", "\\n"]) == 0
    with_dry = capsys.readouterr().out
    import argparse

    from runtime.cli import run as run_cli
    from runtime.cli.common import sampling_kwargs

    p = argparse.ArgumentParser()
    run_cli.add_arguments(p)
    got = p.parse_args(["-m", str(model_path()), "--dry-sequence-breaker", ":", "--dry-sequence-breaker", "none",
                        "--dry-sequence-breaker", "\\n"])
    assert sampling_kwargs(got)["dry_sequence_breakers"] == ("\n",)  # ("none" drops those before it, as llama.cpp)
    assert with_dry != plain
    model = runtime.load(model_path(), n_ctx=256, n_threads=1)
    engine = Engine(model)
    engine.start()
    try:
        with TestClient(create_app(engine, model_name="m")) as http:
            body = {"prompt": "x = 1\nx = 1\nx = 1\nx =", "n_predict": 24, "temperature": 0, "top_k": 0, "top_p": 1,
                    "min_p": 0, "dry_multiplier": 2.0, "dry_sequence_breakers": ["\n"]}
            got = http.post("/completion", json=body).json()
            assert got["content"] + "\n" == with_dry
            assert got["generation_settings"]["dry_sequence_breakers"] == ["\n"]
            for bad in ([""], []):  # (an empty list is refused, as llama-server refuses it)
                r = http.post("/completion", json={**body, "dry_sequence_breakers": bad})
                assert r.status_code == 400 and r.json()["error"]["param"] == "dry_sequence_breakers"
            low = http.post("/completion", json={**body, "n_predict": 1, "dry_base": 0.5}).json()
            assert low["generation_settings"]["dry_base"] == 1.75  # (llama-server's reading of a base below 1)
    finally:
        engine.close()
        model.close()


def test_long_loops_are_llama_cpps_and_multi_byte_breakers_are_found(vocabs):
    """(review 101) A long loop (one token, or an 11-token cycle, 3,000 tokens) takes the linear
    way and gives llama.cpp's penalties. A breaker whose character tokens split ("’" is the
    tokens of its three bytes here) is found as the text's tokens hold it: the lead byte's token,
    then its other bytes' (it was taken for a whole breaker; llama.cpp tokenizes the broken rest
    as U+FFFD and never finds it)."""
    tok, vocab, n = vocabs
    rng = np.random.default_rng(1)
    cycle = tok.encode("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda", add_bos=False)
    for history in ([cycle[0]] * 3000, (cycle * (3000 // len(cycle) + 1))[:3000]):
        z = rng.normal(0, 2, n).astype(np.float32)
        np.testing.assert_allclose(dry(z, history, {}, 0.5, 1.1, 2, 3000),
                                   _theirs(vocab, n, z, history, 0.5, 1.1, 2, 3000, ()), rtol=1e-4, atol=1e-4)
        # (rtol 1e-4: the penalty reaches float32's top here, where llama.cpp's powf rounds in float32)
    quote = tok.encode("’", add_bos=False)
    assert len(quote) == 3  # (the miniature's vocabulary splits it into its bytes)
    heads = heads_for(tok, ("’",))
    assert heads[quote[0]] == (tuple(quote[1:]),) and () not in heads[quote[0]]
    # a repetition is not counted across the quote: " one two" after it, so " three" gets
    # base ** (its tokens - allowed length); without the breaker the repetition reaches back further
    history = tok.encode("one two three\u2019 one two three\u2019 one two", add_bos=False)
    after = len(tok.encode(" one two", add_bos=False))  # the tokens after the last quote
    following = tok.encode(" three", add_bos=False)[0]
    z = np.zeros(n, np.float32)
    assert dry(z, history, heads, 1.0, 2.0, 2, 100)[following] == -(2.0 ** (after - 2))
    assert dry(z, history, {}, 1.0, 2.0, 2, 100)[following] < -(2.0 ** (after - 2))


def test_corners_that_used_to_fail():
    """(review 101) An empty history with dry_allowed_length -1 (an error before); drafting under
    DRY whose window is longer than repeat_last_n (verify passes saw only repeat_last_n tokens)."""
    from runtime.cli.demo import model_path

    z = np.linspace(0, 1, 50).astype(np.float32)
    assert Sampler(SamplingParams(dry_multiplier=1, dry_allowed_length=-1, temperature=0))(z) == 49
    with runtime.load(model_path(), n_ctx=512, n_threads=1) as m:
        prompt = m.tokenize("import unittest\n\n\nclass T(unittest.TestCase):\n    def test_a(self):\n"
                            "        self.assertEqual(1, 1)\n\n    def test_b(self):\n")
        params = sampling_params(temperature=0, dry_multiplier=1.5, repeat_last_n=0)
        plain = list(generate(m, prompt, Sampler(params), 60, stop_at_eog=False, mtp=0))
        m.reset()
        assert list(generate(m, prompt, Sampler(params), 60, stop_at_eog=False, mtp=3)) == plain
