"""Fixes from a third review of `stepstream serve`, against a live server on 127.0.0.1 with the
shipped model, through the official `openai` client and raw HTTP: the four shapes of a
completion's `prompt`, the "off" values llama-server's and vLLM's clients send (-1), llama-server's
`n_predict`, fields that were accepted and ignored, a last assistant message continued (as
llama-server does), and CORS for web pages."""

from __future__ import annotations

from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from runtime.generation import complete  # noqa: E402
from runtime.generation.sampling import SamplingParams  # noqa: E402
from runtime.loader import load  # noqa: E402
from runtime.text.chat_template import render_chat  # noqa: E402
from tests.helpers.live_server import live_server  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
CTX = 256


@pytest.fixture(scope="module")
def url():
    with live_server(MODEL, "-t", "1", "--ctx-size", str(CTX), "--alias", "m") as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ref():
    return load(MODEL, n_ctx=CTX, n_threads=1)


def _text(client, prompt, **kw):
    r = client.completions.create(model="m", prompt=prompt, max_tokens=8, temperature=0, **kw)
    return r


# ---- prompt: a string, strings, token ids, lists of token ids -------------------------------------

def test_every_shape_of_prompt_is_one_choice_per_prompt(client, ref):
    """A list of one string was refused, which failed every request of LangChain's OpenAI LLM
    and lm-eval's local-completions (they always send lists)."""
    a, b = "def parse(line):\n", "class Config:\n"
    alone = [_text(client, p).choices[0].text for p in (a, b)]
    one = _text(client, [a])
    assert [c.text for c in one.choices] == alone[:1] and one.choices[0].index == 0
    two = _text(client, [a, b])
    assert [(c.index, c.text) for c in two.choices] == [(0, alone[0]), (1, alone[1])]
    ids = [ref.tokenize(a, add_bos=True), ref.tokenize(b, add_bos=True)]
    assert [c.text for c in _text(client, ids).choices] == alone
    assert [c.text for c in _text(client, ids[0]).choices] == alone[:1]
    n_prompt = sum(len(i) for i in ids)
    assert (two.usage.prompt_tokens, two.usage.completion_tokens) == (n_prompt, 16)
    assert two.usage.total_tokens == n_prompt + 16
    for bad, message in (([a, ""], "'prompt[1]' must not be empty"), ([a, [1, 2]], "'prompt' must be a string"),
                         ([], "'prompt' must be a string")):
        with pytest.raises(openai.BadRequestError) as e:
            _text(client, bad)
        assert e.value.body["message"].startswith(message), e.value.body
    texts = ["", ""]  # streamed, each prompt's chunks carry its index (a stream carried one prompt)
    for chunk in _text(client, [a, b], stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == alone
    with pytest.raises(openai.BadRequestError) as e:  # a bad prompt is named before any is run
        _text(client, [[5, 6], [7, 10**6]])
    assert "token id 1000000 in 'prompt[1]'" in e.value.body["message"]


# ---- -1, llama-server's and vLLM's "off" ------------------------------------------------------------

def test_minus_one_means_off_as_llama_server_and_vllm_read_it(client, ref):
    """seed -1 (llama-server's default: a random seed), top_k -1 (vLLM's: all tokens) and
    repeat_last_n -1 (llama-server's: the whole context) were refused with a 400."""
    prompt = "def parse(line):\n"
    ids = ref.tokenize(prompt, add_bos=True)
    kw = dict(model="m", prompt=prompt, max_tokens=16, temperature=1.0)
    # top_k -1 samples as top_k 0 (off), with the same seed
    off = client.completions.create(**kw, seed=5).choices[0].text
    assert client.completions.create(**kw, seed=5, extra_body={"top_k": -1}).choices[0].text == off
    # repeat_last_n -1: the penalty looks at every token so far
    got = client.completions.create(**kw, seed=7, extra_body={"repeat_penalty": 1.5, "repeat_last_n": -1})
    ref.reset()
    want = "".join(p.text for p in complete(ref, ids, SamplingParams(
        temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.5, repeat_last_n=CTX, seed=7), 16))
    assert got.choices[0].text == want
    # seed -1: sampled with a seed of the server's choosing, as without one
    texts = {client.completions.create(**kw, seed=-1).choices[0].text for _ in range(3)}
    assert len(texts) > 1, texts
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**kw, extra_body={"repeat_last_n": -2})
    assert e.value.body["message"] == "'repeat_last_n' must be in [-1, 2147483647], got -2"


# ---- the length fields, and fields that were silently ignored ---------------------------------------

def test_n_predict_and_the_length_fields_are_named_as_sent(client, url):
    r = client.completions.create(model="m", prompt="def f(x):\n", temperature=0, extra_body={"n_predict": 3})
    assert r.usage.completion_tokens == 3  # llama-server's field: it gave the default 16
    whole = client.completions.create(model="m", prompt="def f(x):\n", temperature=0, max_tokens=3)
    assert r.choices[0].text == whole.choices[0].text
    for extra, message in (({"max_completion_tokens": 0}, "'max_completion_tokens' must be at least 1, got 0"),
                           ({"n_predict": -2}, "'n_predict' must be -1 (no limit), 0 (the prompt alone) or more, got -2"),
                           ({"best_of": 21}, "'best_of' must be in [1, 20], got 21"),
                           ({"min_tokens": 4}, "'min_tokens' is not supported (only 0)")):
        resp = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "x", **extra}, timeout=30)
        assert resp.status_code == 400 and resp.json()["error"]["message"] == message, resp.text
        assert resp.json()["error"]["param"] == next(iter(extra))


# ---- a last assistant message is continued ----------------------------------------------------------

def test_a_last_assistant_message_is_continued_as_llama_server_does(client, ref):
    """It was closed with the end-of-turn token and a new assistant turn opened after it, so a
    client that starts the reply ("prefill", Open WebUI's "continue") got an unrelated one. Now
    the prompt is the rendered conversation up to the end of that message's text: the reply is
    the completion of that text."""
    user = [{"role": "user", "content": "Write a function that parses a line."}]
    start = "def parse(line):\n    "
    tok = ref.tokenizer
    rendered = render_chat(tok.chat_template, user, add_generation_prompt=True)  # the BOS: completions adds it
    want = client.completions.create(model="m", prompt=rendered + start, max_tokens=12, temperature=0)
    got = client.chat.completions.create(model="m", messages=user + [{"role": "assistant", "content": start}],
                                         max_tokens=12, temperature=0)
    assert got.choices[0].message.content == want.choices[0].text
    assert got.usage.prompt_tokens == want.usage.prompt_tokens
    # as text parts too (joined with "\n", as llama-server and vLLM join them); and
    # continue_final_message false (vLLM's field) closes it as before
    parts = [{"type": "text", "text": part} for part in start.split("\n")]
    again = client.chat.completions.create(model="m", messages=user + [{"role": "assistant", "content": parts}],
                                           max_tokens=12, temperature=0)
    assert again.choices[0].message.content == want.choices[0].text
    closed = client.chat.completions.create(model="m", messages=user + [{"role": "assistant", "content": start}],
                                            max_tokens=12, temperature=0,
                                            extra_body={"continue_final_message": False})
    new_turn = render_chat(tok.chat_template, user + [{"role": "assistant", "content": start}],
                           add_generation_prompt=True)
    assert closed.usage.prompt_tokens == len(ref.tokenize(new_turn, add_bos=True, special=True))
    assert new_turn.endswith("<|im_end|>\n<|im_start|>assistant\n")


# ---- CORS and HEAD ----------------------------------------------------------------------------------

def test_web_pages_may_call_it_and_probes_may_use_head(url):
    """No CORS headers and 405 to OPTIONS: a browser UI on another origin could not call it."""
    pre = httpx.options(url + "/v1/chat/completions", timeout=30, headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200, pre.text
    assert pre.headers["access-control-allow-origin"] in ("*", "http://localhost:3000")
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    r = httpx.get(url + "/v1/models", headers={"Origin": "http://localhost:3000"}, timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    head = httpx.head(url + "/health", timeout=30)
    assert head.status_code == 200 and head.content == b""


# ---- a fourth review: legacy logprobs, deprecated function fields, the newer length field -------

def test_a_sampled_token_is_always_among_its_top_logprobs(client, ref):
    """Legacy completions: "the API will always return the logprob of the sampled token, so there
    may be up to logprobs+1 elements" (OpenAI; llama-cpp-python adds it too). Sampled at a high
    temperature, every token used to be missing from its own entry. The first position's values
    are the model's: a float64 log-softmax of the reference's logits after the prompt."""
    import numpy as np

    prompt = "def add(a, b):"
    r = client.completions.create(model="m", prompt=prompt, max_tokens=12, logprobs=1, temperature=1.5, seed=3)
    lp = r.choices[0].logprobs
    beside = 0
    for i, (tok, p, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)):
        assert top[tok] == p and 1 <= len(top) <= 2 and max(top.values()) >= p, (i, tok, top)
        beside += len(top) == 2
    assert beside > 0  # at temperature 1.5 some sampled tokens are not the most likely one
    ref.reset()
    z = ref.eval(ref.tokenize(prompt, special=True)).astype(np.float64)
    want = z - z.max() - np.log(np.exp(z - z.max()).sum())
    assert sorted(lp.top_logprobs[0].values()) == pytest.approx(sorted({want.max(), lp.token_logprobs[0]}), abs=1e-4)
    assert lp.token_logprobs[0] in [pytest.approx(v, abs=1e-4) for v in want]


def test_deprecated_function_fields_are_refused_not_ignored(url):
    """`functions` / `function_call` (OpenAI's form before `tools`) were accepted and dropped: the
    reply was plain text, the functions never rendered. Refused, naming the field to send."""
    fn = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    for extra, name in (({"functions": [fn]}, "functions"), ({"function_call": {"name": "get_weather"}}, "function_call")):
        resp = httpx.post(url + "/v1/chat/completions", timeout=30,
                          json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra})
        err = resp.json()["error"]
        assert resp.status_code == 400 and err["param"] == name and err["code"] == "unsupported", resp.text
        assert err["message"].startswith(f"'{name}' (deprecated by OpenAI) is not supported; send 'tool")


def test_audio_web_search_and_stray_stream_options_are_refused_not_ignored(url):
    """An audio reply (`modalities`, `audio`) and `web_search_options` came back as plain text
    with a 200; `stream_options` without a stream was taken where OpenAI and vLLM answer 400.
    `modalities: ["text"]` and `stream_options` on a stream stay fine."""
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for extra, name, code in (({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}},
                               "modalities", "unsupported"),
                              ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "unsupported"),
                              ({"web_search_options": {}}, "web_search_options", "unsupported"),
                              ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value")):
        for route, body in (("/v1/chat/completions", base), ("/v1/completions", {"model": "m", "prompt": "hi",
                                                                                 "max_tokens": 2})):
            resp = httpx.post(url + route, timeout=30, json={**body, **extra})
            err = resp.json()["error"]
            assert resp.status_code == 400 and err["param"] == name and err["code"] == code, (route, resp.text)
    assert httpx.post(url + "/v1/chat/completions", timeout=30, json={**base, "modalities": ["text"]}).status_code == 200
    # an image part is named as such (it was "content must be a string, null or a list of text parts")
    image = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    resp = httpx.post(url + "/v1/chat/completions", timeout=30,
                      json={**base, "messages": [{"role": "user", "content": image}]})
    err = resp.json()["error"]
    assert resp.status_code == 400 and err["param"] == "messages[0].content[1]" and err["code"] == "unsupported"
    assert err["message"] == 'messages[0].content[1] is a "image_url" part: this model reads text parts only'
    resp = httpx.post(url + "/v1/chat/completions", timeout=30,
                      json={**base, "messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages[0].content[0]"
    streamed = httpx.post(url + "/v1/chat/completions", timeout=30,
                          json={**base, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.status_code == 200 and '"usage"' in streamed.text


def test_max_completion_tokens_wins_over_max_tokens(client):
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "count to ten"}],
                                       max_tokens=20, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


@pytest.mark.parametrize("choice", [{"type": "function"}, {"type": "function", "function": {}},
                                    {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}])
def test_a_tool_choice_object_of_another_shape_is_named_as_malformed(url, choice):
    """It was refused as naming "the function None"."""
    resp = httpx.post(url + "/v1/chat/completions", timeout=30, json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": choice})
    err = resp.json()["error"]
    assert resp.status_code == 400 and err["param"] == "tool_choice", resp.text
    assert err["message"].startswith("'tool_choice' must be auto, none, required or {'type': 'function'") and "None" not in err["message"]
