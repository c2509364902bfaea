"""Fixes from a user review of `stepstream serve`, against a live server on 127.0.0.1 with the
shipped model, through the official `openai` client and raw HTTP: GET /v1/models/{id}, the
field a context overflow names, the message for a bad tool, and --max-body's units."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from runtime.bench.serve import chat_counter  # noqa: E402
from runtime.cli import SubcommandParser, serve  # noqa: E402
from tests.helpers.live_server import live_server  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
ALIAS = "stepfun/mini"  # a slash, as many served names have: the client sends it as %2F
KEY = "sk-review-key"
CTX = 256
MAX_BODY = 64 * 2**10
OVERFLOW_HINT = "(start the server with a larger --ctx-size, or shorten the prompt)"


@pytest.fixture(scope="module")
def url():
    with live_server(MODEL, "--alias", ALIAS, "--api-key", KEY, "--ctx-size", str(CTX), "--max-body", "64KiB") as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _post(url: str, path: str, content: bytes) -> httpx.Response:
    return httpx.post(url + path, content=content, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})


# ---- GET /v1/models/{id} ---------------------------------------------------------------------------

def test_the_served_model_is_retrieved_by_its_id(client):
    m = client.models.retrieve(ALIAS)
    assert (m.id, m.object, m.owned_by) == (ALIAS, "model", "stepstream")
    assert m.model_dump() == client.models.list().data[0].model_dump()
    assert m.model_dump()["meta"]["n_ctx"] == CTX


@pytest.mark.parametrize("unknown", ["gpt-4o", MODEL.name, "stepfun/other"])
def test_an_unknown_model_id_is_a_404_with_an_openai_error(client, unknown):
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve(unknown)
    assert e.value.body == {"message": f"the model '{unknown}' does not exist; this server serves '{ALIAS}'",
                            "type": "invalid_request_error", "param": "model", "code": "model_not_found"}


def test_retrieving_a_model_needs_the_key(url):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.retrieve(ALIAS)


# ---- the field a context overflow names ------------------------------------------------------------

def test_a_completion_prompt_over_the_context_names_prompt(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=ALIAS, prompt=[1] * 300, max_tokens=1)
    assert e.value.body == {"message": f"the prompt is 300 tokens, more than the context of {CTX} {OVERFLOW_HINT}",
                            "type": "invalid_request_error", "param": "prompt", "code": "context_length_exceeded"}


def test_a_chat_over_the_context_names_messages(client):
    messages = [{"role": "user", "content": "word " * 300}]
    n = chat_counter(str(MODEL))[0](messages)
    assert n > CTX
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=ALIAS, messages=messages, max_tokens=1)
    assert e.value.body == {"message": f"the prompt is {n} tokens, more than the context of {CTX} {OVERFLOW_HINT}",
                            "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}


def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(client):
    """A megabyte prompt was tokenized whole before its 400 (seconds of the server's time, and
    of every other client's). Its bytes alone show it cannot fit: no token of this vocabulary
    is longer than 32 bytes, so 40,000 bytes hold at least 1,250 tokens."""
    text = "é" * 20000  # 40,000 bytes
    for create, field, kw in ((client.completions.create, "prompt", {"prompt": text}),
                              (client.chat.completions.create, "messages",
                               {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": text}]})):
        with pytest.raises(openai.BadRequestError) as e:
            create(model=ALIAS, max_tokens=1, **kw)
        n_bytes = 40000 if field == "prompt" else None
        message = e.value.body["message"]
        assert e.value.body["param"] == field and e.value.body["code"] == "context_length_exceeded", e.value.body
        assert message.startswith("the prompt is at least ") and message.endswith(f"more than the context of {CTX} "
                                                                                   f"{OVERFLOW_HINT}"), message
        if n_bytes:
            assert message.startswith(f"the prompt is at least 1250 tokens (40000 bytes of text)"), message


# ---- a bad tool ---------------------------------------------------------------------------------

@pytest.mark.parametrize("tool", [{"type": "function"}, "get_weather", {"type": "function", "function": {}}])
def test_a_bad_tool_is_described_in_clean_text(url, tool):
    body = {"model": ALIAS, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "tools": [tool]}
    r = _post(url, "/v1/chat/completions", json.dumps(body).encode())
    assert r.status_code == 400
    assert r.json() == {"error": {
        "message": "tools[0] must be {'type': 'function', 'function': {'name': ..., 'parameters': ...}}",
        "type": "invalid_request_error", "param": "tools[0]", "code": "invalid_value"}}


# ---- --max-body with units ----------------------------------------------------------------------

def _body_of(n_bytes: int) -> bytes:
    body = json.dumps({"model": ALIAS, "prompt": "x", "max_tokens": 1}).encode()
    return body + b" " * (n_bytes - len(body))  # JSON allows the trailing white space


def test_max_body_given_in_kib_is_the_limit_to_the_byte(url):
    assert _post(url, "/v1/completions", _body_of(MAX_BODY)).status_code == 200
    r = _post(url, "/v1/completions", _body_of(MAX_BODY + 1))
    assert r.status_code == 413
    assert r.json()["error"]["message"] == f"the request body is {MAX_BODY + 1} bytes; the limit is {MAX_BODY}"


def _serve_args(*argv: str):
    parser = SubcommandParser(prog="stepstream serve")
    serve.add_arguments(parser)
    return parser.parse_args(["-m", str(MODEL), *argv])


@pytest.mark.parametrize("given,value", [("8MiB", 8 * 2**20), ("64KiB", 65536), ("1.5k", 1500), ("200000", 200000),
                                         ("2 MB", 2 * 10**6)])
def test_max_body_reads_the_size_units_of_the_other_flags(given, value):
    assert _serve_args("--max-body", given).max_body == value


def test_max_body_defaults_to_8_mib():
    assert _serve_args().max_body == 8 * 2**20


@pytest.mark.parametrize("given,message", [
    ("lots", "argument --max-body: cannot read 'lots' as a size; write e.g. 6GiB, 512MiB or 1.5GB"),
    ("0", "argument --max-body: must be at least 1 byte, got 0")])
def test_a_bad_max_body_is_one_line_and_exit_status_2(capsys, given, message):
    with pytest.raises(SystemExit) as e:
        _serve_args("--max-body", given)
    assert e.value.code == 2
    assert capsys.readouterr().err == f"stepstream serve: error: {message} (see stepstream serve --help)\n"


# ---- fields the server does not honour are refused, not ignored --------------------------------------

@pytest.mark.parametrize("field, value, message", [
    # (presence_penalty, frequency_penalty and logit_bias are honoured: test_penalties_and_logit_bias_are_honoured;
    # json_object and json_schema are honoured: tests/test_json_mode.py, tests/test_json_schema.py)
    ("response_format", {"type": "xml"},
     "'response_format' with \"xml\" is not supported (\"text\", \"json_object\" and \"json_schema\" are)"),
])
def test_an_unhonoured_field_is_a_400(client, field, value, message):
    for call in (lambda **kw: client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **kw),
                 lambda **kw: client.completions.create(prompt="def f():", **kw)):
        with pytest.raises(openai.BadRequestError) as e:
            call(model=ALIAS, max_tokens=2, extra_body={field: value})  # completions has no response_format
        assert e.value.body == {"message": message, "type": "invalid_request_error", "param": field,
                                "code": "unsupported"}


def test_penalties_and_logit_bias_are_honoured(client):
    """The server's greedy text under presence and frequency penalties and a logit bias is the
    Python API's with the same settings (whose sampler is checked against llama.cpp's chain:
    tests/test_sampling_penalties.py), and differs from the text without them."""
    import runtime

    prompt = "def fibonacci(n):\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\ndef"
    settings = dict(presence_penalty=0.6, frequency_penalty=0.9, logit_bias={"25": -100, "3": 4.5})
    got = client.completions.create(model=ALIAS, prompt=prompt, max_tokens=24, temperature=0, **settings)
    plain = client.completions.create(model=ALIAS, prompt=prompt, max_tokens=24, temperature=0)
    with runtime.load(str(MODEL), n_ctx=CTX) as m:
        want = m.create_completion(prompt, max_tokens=24, temperature=0, **settings)["choices"][0]["text"]
    assert got.choices[0].text == want != plain.choices[0].text
    chat = client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, **settings)
    assert chat.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("field, value, message", [
    ("logit_bias", {"999999": 1}, "'logit_bias' names token 999999, outside the vocabulary (0..2047)"),
    ("logit_bias", {"5": 101}, "'logit_bias' value for token 5 must be a number from -100 to 100, or false to ban "
                               "it, got 101"),
    # (a key that is no id is a text whose tokens are biased, as llama-server reads it: test_server_llama_bias.py)
    ("logit_bias", {"": 1}, "'logit_bias' names an empty text"),
    ("logit_bias", {"5": True}, "'logit_bias' value for token 5 must be a number from -100 to 100, or false to ban "
                                "it, got true"),
    ("presence_penalty", 2.5, "'presence_penalty' must be in [-2, 2], got 2.5"),
])
def test_bad_penalties_and_biases_are_a_400(client, field, value, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=ALIAS, prompt="def f():", max_tokens=2, extra_body={field: value})
    assert e.value.body["message"] == message and e.value.body["param"] == field


def test_the_defaults_of_those_fields_are_accepted(client):
    r = client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       presence_penalty=0, frequency_penalty=0.0, logit_bias={},
                                       response_format={"type": "text"})
    assert r.choices[0].finish_reason in ("length", "stop")
