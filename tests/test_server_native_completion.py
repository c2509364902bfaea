"""llama-server's native completion route, POST /completion (runtime/server/native_completion.py):
the same tokens as /v1/completions under the same settings, llama-server's defaults where a
request sets none, its stream (events, then a summary with stop true, no [DONE]), its stop
types, token ids and probabilities against the OpenAI route's log-probabilities, json_schema
honoured, and one-line 400s."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from runtime.loader import load  # noqa: E402

SHIPPED = Path(__file__).resolve().parent.parent / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
PROMPT = "def fibonacci(n):\n"


@pytest.fixture(scope="module")
def served():
    from fastapi.testclient import TestClient

    from runtime.server.app import create_app
    from runtime.server.engine import Engine

    model = load(SHIPPED, n_ctx=1024)
    engine = Engine(model)
    engine.start()
    with TestClient(create_app(engine, model_name="m", api_key="k"), headers={"Authorization": "Bearer k"}) as client:
        yield model, client
    engine.close()


def _oai(http, **kw):
    r = http.post("/v1/completions", json={"prompt": PROMPT, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_greedy_text_and_tokens_are_the_openai_routes(served):
    model, http = served
    r = http.post("/completion", json={"prompt": PROMPT, "n_predict": 16, "temperature": 0, "return_tokens": True,
                                       "n_probs": 3})
    assert r.status_code == 200, r.text
    got = r.json()
    want = _oai(http, max_tokens=16, temperature=0, logprobs=3)
    lp = want["choices"][0]["logprobs"]
    assert got["content"] == want["choices"][0]["text"] and got["stop"] is True and got["stop_type"] == "limit"
    assert [p["id"] for p in got["completion_probabilities"]] == got["tokens"]
    assert model.detokenize(got["tokens"]).decode() == got["content"]
    assert [p["logprob"] for p in got["completion_probabilities"]] == pytest.approx(lp["token_logprobs"], abs=1e-6)
    assert all(len(p["top_logprobs"]) == 3 for p in got["completion_probabilities"])
    assert got["tokens_predicted"] == 16 and got["tokens_evaluated"] == len(model.tokenize(PROMPT))
    assert got["timings"]["predicted_n"] == 16 and got["prompt"] == PROMPT


def test_llama_servers_defaults_apply_where_a_request_sets_none(served):
    _, http = served
    got = http.post("/completion", json={"prompt": PROMPT, "n_predict": 24, "seed": 7}).json()
    s = got["generation_settings"]
    assert (s["temperature"], s["top_k"], s["top_p"], s["min_p"]) == (0.8, 40, 0.95, 0.05)
    want = _oai(http, max_tokens=24, seed=7, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)
    assert got["content"] == want["choices"][0]["text"]
    until_end = http.post("/completion", json={"prompt": PROMPT, "temperature": 0}).json()  # n_predict -1
    assert until_end["stop_type"] in ("eos", "limit") and until_end["generation_settings"]["n_predict"] == -1


def test_the_stream_is_llama_servers(served):
    _, http = served
    body = {"prompt": PROMPT, "n_predict": 20, "temperature": 0, "return_tokens": True}
    whole = http.post("/completion", json=body).json()
    with http.stream("POST", "/completion", json={**body, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and "[DONE]" not in lines[-1]
    events = [json.loads(line[6:]) for line in lines]
    assert all(e["stop"] is False for e in events[:-1]) and events[-1]["stop"] is True
    assert "".join(e["content"] for e in events) == whole["content"]
    assert [t for e in events[:-1] for t in e["tokens"]] == whole["tokens"]
    assert events[-1]["timings"]["predicted_n"] == 20 and events[-1]["tokens_predicted"] == 20


def test_stop_types(served):
    model, http = served
    text = http.post("/completion", json={"prompt": PROMPT, "n_predict": 16, "temperature": 0}).json()["content"]
    word = text.strip().split()[1]
    got = http.post("/completion", json={"prompt": PROMPT, "n_predict": 16, "temperature": 0, "stop": [word]}).json()
    assert got["stop_type"] == "word" and got["stopping_word"] == word and got["content"] == text[: text.index(word)]
    eos = model.token_eos()
    got = http.post("/completion", json={"prompt": PROMPT, "n_predict": 16, "temperature": 0,
                                         "logit_bias": {str(eos): 100}}).json()
    assert got["stop_type"] == "eos" and got["content"] == "" and got["tokens_predicted"] == 1


def test_json_schema_is_honoured(served):
    _, http = served
    got = http.post("/completion", json={"prompt": "n = ", "n_predict": 40, "temperature": 0,
                                         "json_schema": {"type": "integer"}}).json()
    assert isinstance(json.loads(got["content"]), int), got["content"]


@pytest.mark.parametrize("body, param", [
    ({"prompt": ["a", 5]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "a", "id_slot": 1}, "id_slot"),
    ({"prompt": "a", "n_probs": 101}, "n_probs"),
    ({"prompt": "a", "post_sampling_probs": True}, "post_sampling_probs"),
    ({"prompt": "a", "response_fields": ["content"]}, "response_fields"),
    ({"prompt": "a", "json_schema": {"type": "integer", "multipleOf": 3}}, "json_schema"),
    ({"prompt": "a", "grammar": "root ::= x"}, "grammar"),  # (a grammar is honoured: tests/test_gbnf_generation.py)
    ({"prompt": "a", "cache_prompt": "yes"}, "cache_prompt"),
])
def test_bad_bodies_are_one_line_400s(served, body, param):
    _, http = served
    r = http.post("/completion", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 10**400),  # (review 96) float() of it overflowed: a 500
    ("logit_bias", [[[1], 2]]),  # an unhashable id in the list form: a 500
    ("logit_bias", [[{"a": 1}, 2]]),
    ("logit_bias", {"5": 10, "05": 10}),  # one token twice: one of its biases was dropped
    ("logit_bias", [[-5, 1]]),  # (a token named twice in the list form gets both biases, as llama-server adds them)
])
def test_penalty_and_bias_values_that_were_500s_or_lost_are_400s(served, field, value):
    _, http = served
    for path in ("/v1/completions", "/completion"):
        r = http.post(path, json={"prompt": "a", "max_tokens" if path.startswith("/v1") else "n_predict": 2,
                                  field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (path, r.text)


def test_llama_servers_json_schema_field_is_honoured_on_the_openai_routes_too(served):
    """llama-server takes `json_schema` on /v1/completions and /v1/chat/completions as well: the
    reply is the one response_format json_schema gives (it was refused as unsupported)."""
    _, http = served
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    messages = [{"role": "user", "content": "a number"}]
    base = {"messages": messages, "max_tokens": 60, "temperature": 0}
    got = http.post("/v1/chat/completions", json={**base, "json_schema": schema}).json()
    want = http.post("/v1/chat/completions", json={
        **base, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}).json()
    assert got["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]
    got = http.post("/v1/completions", json={"prompt": "n = ", "max_tokens": 30, "temperature": 0,
                                             "json_schema": {"type": "integer"}}).json()
    assert isinstance(json.loads(got["choices"][0]["text"]), int)
    both = http.post("/v1/chat/completions", json={**base, "json_schema": schema,
                                                   "response_format": {"type": "json_object"}})
    assert both.status_code == 400 and both.json()["error"]["param"] == "json_schema"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert http.post("/v1/chat/completions", json={**base, "json_schema": schema, "tools": tools}).status_code == 400


def test_llama_servers_own_values_are_taken(served):
    """(review 97) max_tokens was dropped (the reply ran to the context's end); n_predict 0, five
    stop strings and a negative temperature were refused; a stream's events had no token ids and
    an empty event before the last; `json_schema: {}` constrained nothing."""
    model, http = served
    got = http.post("/completion", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0}).json()
    assert got["tokens_predicted"] == 3 and got["generation_settings"]["n_predict"] == 3
    got = http.post("/completion", json={"prompt": PROMPT, "n_predict": 2, "max_tokens": 9, "temperature": 0}).json()
    assert got["tokens_predicted"] == 2  # n_predict first, as llama-server reads them
    got = http.post("/completion", json={"prompt": PROMPT + "x = 1\n", "n_predict": 0}).json()
    assert got["content"] == "" and got["tokens_predicted"] == 0 and got["timings"]["prompt_n"] > 0
    again = http.post("/completion", json={"prompt": PROMPT + "x = 1\n", "n_predict": 1, "temperature": 0}).json()
    assert again["timings"]["cache_n"] == got["tokens_evaluated"] - 1  # the prompt was left in the cache
    stops = ["", "zz1", "zz2", "zz3", "zz4", "\n"]
    got = http.post("/completion", json={"prompt": PROMPT, "n_predict": 30, "temperature": 0, "stop": stops}).json()
    assert got["stop_type"] in ("word", "eos") and "\n" not in got["content"]
    greedy = http.post("/completion", json={"prompt": PROMPT, "n_predict": 12, "temperature": 0}).json()["content"]
    assert http.post("/completion", json={"prompt": PROMPT, "n_predict": 12, "temperature": -1}).json()["content"] \
        == greedy
    t = greedy and http.post("/completion", json={"prompt": PROMPT, "n_predict": 4}).json()["timings"]
    assert {"prompt_per_second", "prompt_per_token_ms", "predicted_per_token_ms"} <= set(t)
    with http.stream("POST", "/completion", json={"prompt": PROMPT, "n_predict": 6, "temperature": 0,
                                                  "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line]
    assert all(e["tokens"] and (e["content"] or e["tokens"]) for e in events[:-1]) and events[-1]["stop"] is True
    assert sum(len(e["tokens"]) for e in events[:-1]) == 6
    anything = http.post("/completion", json={"prompt": "value = ", "n_predict": 40, "temperature": 0,
                                              "json_schema": {}}).json()
    json.loads(anything["content"])  # any JSON value, as llama-server reads {}


def test_the_responses_api_refuses_json_schema_beside_a_json_text_format(served):
    _, http = served
    base = {"input": "a number", "max_output_tokens": 40, "temperature": 0, "json_schema": {"type": "integer"}}
    r = http.post("/v1/responses", json={**base, "text": {"format": {"type": "json_object"}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "json_schema"
    r = http.post("/v1/responses", json={**base, "text": {"format": {"type": "text"}}})  # a client's default
    assert r.status_code == 200, r.text
    text = next(c["text"] for item in r.json()["output"] if item["type"] == "message" for c in item["content"])
    assert isinstance(json.loads(text), int)
