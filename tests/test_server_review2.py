"""Fixes from a second review of `stepstream serve`, against live servers on 127.0.0.1 with the
shipped model, through the official `openai` client: a prompt that fills the context, the
completions' `text_offset` (against llama-cpp-python on the same file), `top_p: 0` (and the
sampler's top-p against a numpy reference), and `--mtp`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.generation.sampling import Sampler, SamplingParams, top_p

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from runtime.cli import SubcommandParser, serve  # noqa: E402
from runtime.generation import complete  # noqa: E402
from runtime.loader import load  # noqa: E402
from tests.helpers.live_server import live_server  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
CTX = 128
HINT = "(start the server with a larger --ctx-size, or shorten the prompt)"
GREEDY = SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)


def _client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def plain():
    with live_server(MODEL, "-t", "1", "--ctx-size", str(CTX)) as u:  # no --mtp: the default
        yield _client(u)


@pytest.fixture(scope="module")
def drafting():
    with live_server(MODEL, "-t", "1", "--ctx-size", str(CTX), "--mtp", "3") as u:
        yield _client(u)


@pytest.fixture(scope="module")
def ref():
    return load(MODEL, n_ctx=CTX, n_threads=1)


def _model(client) -> str:
    return client.models.list().data[0].id


# ---- a prompt of exactly n_ctx tokens ---------------------------------------------------------------

@pytest.mark.parametrize("server", ["plain", "drafting"])
def test_a_prompt_that_fills_the_context_gets_one_token_as_the_library_gives(server, request, ref):
    client = request.getfixturevalue(server)
    ids = list(range(5, 5 + CTX))
    ref.reset()
    want = list(complete(ref, ids, GREEDY, None))  # the Python API at the limit: one token, "length"
    assert (want[-1].n_tokens, want[-1].finish_reason) == (1, "length")
    text = "".join(p.text for p in want)
    r = client.completions.create(model=_model(client), prompt=ids, max_tokens=10, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (text, "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (CTX, 1, CTX + 1)
    chunks = list(client.completions.create(model=_model(client), prompt=ids, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (CTX, 1, CTX + 1)
    # one short of the limit: two tokens fit (the first is evaluated, the second is not)
    r = client.completions.create(model=_model(client), prompt=ids[:-1], max_tokens=10, temperature=0)
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 2)


def test_a_prompt_past_the_context_is_refused_as_run_words_it(plain):
    with pytest.raises(openai.BadRequestError) as e:
        plain.completions.create(model=_model(plain), prompt=list(range(5, 6 + CTX)), max_tokens=1)
    assert e.value.body == {"message": f"the prompt is {CTX + 1} tokens, more than the context of {CTX} {HINT}",
                            "type": "invalid_request_error", "param": "prompt", "code": "context_length_exceeded"}


# ---- text_offset --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(MODEL), n_ctx=256, n_threads=1, logits_all=True, verbose=False)


@pytest.mark.parametrize("prompt", ["hi", "def main():\n"])
def test_text_offset_counts_the_prompt_first_as_llama_cpp_python_does(plain, llama, prompt):
    theirs = llama.create_completion(prompt, max_tokens=3, logprobs=2, temperature=0)["choices"][0]
    r = plain.completions.create(model=_model(plain), prompt=prompt, max_tokens=3, logprobs=2, temperature=0)
    ours = r.choices[0]
    assert ours.text == theirs["text"] and ours.logprobs.tokens == theirs["logprobs"]["tokens"]
    assert ours.logprobs.text_offset == theirs["logprobs"]["text_offset"]
    assert ours.logprobs.text_offset[0] == len(prompt)
    offsets = [o for c in plain.completions.create(model=_model(plain), prompt=prompt, max_tokens=3, logprobs=2,
                                                   temperature=0, stream=True)
               if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == theirs["logprobs"]["text_offset"]


def test_streamed_text_offset_follows_the_tokens_when_a_stop_string_holds_text_back(plain, llama):
    """The stream's offsets advanced by the text sent, which lags the tokens while a tail may
    start a stop string (a review: 13 of 48 streams differed from the whole reply's offsets)."""
    kw = dict(max_tokens=8, temperature=0, stop="self.", logprobs=1)
    want = [o for c in llama.create_completion("def fib(n):", stream=True, **kw)
            for o in (c["choices"][0]["logprobs"] or {}).get("text_offset", [])]
    got = [o for c in plain.completions.create(model=_model(plain), prompt="def fib(n):", stream=True, **kw)
           if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    whole = plain.completions.create(model=_model(plain), prompt="def fib(n):", **kw).choices[0].logprobs.text_offset
    assert got[:len(want)] == want and got == whole and len(want) > 2  # (ours also has the token completing the stop)


def test_text_offset_of_a_token_prompt_starts_after_its_text(plain, ref):
    ids = ref.tokenize("def main():\n", special=True)
    r = plain.completions.create(model=_model(plain), prompt=ids, max_tokens=3, logprobs=1, temperature=0)
    start = len(ref.detokenize(ids).decode())
    assert start > 0 and r.choices[0].logprobs.text_offset[0] == start


# ---- top_p 0 ------------------------------------------------------------------------------------

def test_top_p_zero_keeps_exactly_the_most_likely_token():
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.normal(0, 3, 1000).astype(np.float32)
        want = np.full_like(logits, -np.inf)  # numpy reference: the argmax alone
        want[np.argmax(logits)] = logits[np.argmax(logits)]
        np.testing.assert_array_equal(top_p(logits, 0.0), want)
        sampler = Sampler(SamplingParams(temperature=1.5, top_k=0, top_p=0.0, min_p=0.0, seed=int(rng.integers(99))))
        assert {sampler(logits) for _ in range(20)} == {int(np.argmax(logits))}
    tie = np.array([1.0, 3.0, 3.0, -2.0], np.float32)  # min keep 1: one token even when two tie
    assert np.isfinite(top_p(tie, 0.0)).sum() == 1


def test_a_negative_top_p_is_still_refused():
    with pytest.raises(Exception, match="top_p must be >= 0, got -0.1"):
        SamplingParams(top_p=-0.1)


def test_top_p_zero_is_accepted_and_answers_greedily(plain):
    kw = dict(model=_model(plain), prompt="def parse(line):\n", max_tokens=12)
    greedy = plain.completions.create(**kw, temperature=0).choices[0].text
    for seed in (1, 2, 3):
        assert plain.completions.create(**kw, temperature=1.0, top_p=0, seed=seed).choices[0].text == greedy
    with pytest.raises(openai.BadRequestError) as e:
        plain.completions.create(**kw, top_p=1.5)
    assert e.value.body["message"] == "'top_p' must be in [0, 1], got 1.5"


# ---- --mtp --------------------------------------------------------------------------------------

def test_serve_takes_run_s_mtp_flag():
    p = SubcommandParser(prog="stepstream serve")
    serve.add_arguments(p)
    assert p.parse_args(["-m", str(MODEL), "--mtp", "3"]).mtp == 3
    assert p.parse_args(["-m", str(MODEL)]).mtp == "auto"  # run's default


def test_drafting_server_answers_as_the_plain_one_and_drafts(plain, drafting):
    prompts = ["def parse_header(line):\n", "class Stack:\n", "import os\n"]
    drafted = 0
    for prompt in prompts:
        kw = dict(prompt=prompt, max_tokens=40, temperature=0, logprobs=2)
        a = plain.completions.create(model=_model(plain), **kw)
        b = drafting.completions.create(model=_model(drafting), **kw)
        assert b.choices[0].text == a.choices[0].text and b.choices[0].finish_reason == a.choices[0].finish_reason
        assert b.choices[0].logprobs.tokens == a.choices[0].logprobs.tokens
        assert b.choices[0].logprobs.token_logprobs == pytest.approx(a.choices[0].logprobs.token_logprobs, abs=1e-4)
        assert b.usage.completion_tokens == a.usage.completion_tokens
        t = b.model_extra["timings"]
        assert 0 <= t.get("draft_n_accepted", 0) <= t.get("draft_n", 0)
        drafted += t.get("draft_n", 0)
        streamed = drafting.completions.create(model=_model(drafting), prompt=prompt, max_tokens=40, temperature=0,
                                               stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == a.choices[0].text
    assert drafted > 0  # --mtp 3 forces drafting: the heads did draft


# ---- llama-server's sampling fields -------------------------------------------------------------

def test_top_k_min_p_and_repeat_penalty_are_honoured_as_the_library_samples(plain, ref):
    """They were accepted and ignored: `top_k: 1` at temperature 1 gave sampled text."""
    kw = dict(model=_model(plain), prompt="def parse(line):\n", max_tokens=16)
    greedy = plain.completions.create(**kw, temperature=0).choices[0].text
    ids = ref.tokenize(kw["prompt"])
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        assert plain.completions.create(**kw, temperature=1.0, seed=5, extra_body=extra).choices[0].text == greedy
    for extra in ({"top_k": 3, "min_p": 0.2}, {"repeat_penalty": 1.5, "repeat_last_n": 8}):
        got = plain.completions.create(**kw, temperature=1.0, seed=7, extra_body=extra).choices[0].text
        ref.reset()
        want = "".join(p.text for p in complete(ref, ids, SamplingParams(
            temperature=1.0, top_k=extra.get("top_k", 0), top_p=1.0, min_p=extra.get("min_p", 0.0),
            repeat_penalty=extra.get("repeat_penalty", 1.0), repeat_last_n=extra.get("repeat_last_n", 64), seed=7), 16))
        assert got == want, extra
    for extra, message in (({"top_k": 2**31}, "'top_k' must be in [-2147483648, 2147483647], got 2147483648"),
                           ({"min_p": 1.5}, "'min_p' must be in [0, 1], got 1.5"),
                           ({"repeat_penalty": 0}, "'repeat_penalty' must be in [0.01, 100], got 0"),
                           ({"top_k": 2.5}, "'top_k' must be integer, got number 2.5"),
                           ({"dry_allowed_length": -2}, "'dry_allowed_length' must be in [-1, 2147483647], got -2"),
                           ({"xtc_probability": 2}, "'xtc_probability' must be in [0, 1], got 2"),
                           ({"mirostat": 3}, "'mirostat' must be 0 (off), 1 or 2, got 3"),
                           ({"grammar": "root ::= \"a\" <t>"},  # (honoured since: tests/test_gbnf_generation.py)
                            "'grammar': line 1, column 14: token elements (<...>, !<...>) are not supported: write "
                            "the token's text as a literal")):
        with pytest.raises(openai.BadRequestError) as e:
            plain.completions.create(**kw, extra_body=extra)
        assert e.value.body["message"] == message
    # their "off" values are accepted, as llama-server's clients send them by default
    off = {"typical_p": 1.0, "mirostat": 0, "grammar": "", "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}
    assert plain.completions.create(**kw, temperature=0, extra_body=off).choices[0].text == greedy
