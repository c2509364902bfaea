"""llama-server's own routes (runtime/server/llama_routes.py): /tokenize and /detokenize against
llama.cpp's tokenizer on the same file, /apply-template against the prompt the chat endpoint
evaluates, /props, and /metrics' counters against the requests' own `timings`."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from runtime.loader import load  # noqa: E402

SHIPPED = Path(__file__).resolve().parent.parent / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
TEXTS = ["def f(x):\n    return x * 2\n", "héllo wörld ünïcode 😀", "<|im_start|>user\nhi<|im_end|>", "   spaces\t\ttabs"]


@pytest.fixture(scope="module")
def served():
    from fastapi.testclient import TestClient

    from runtime.server.app import create_app
    from runtime.server.engine import Engine

    engine = Engine(load(SHIPPED, n_ctx=1024))
    engine.start()
    with TestClient(create_app(engine, model_name="m", api_key="k", metrics=True),
                    headers={"Authorization": "Bearer k"}) as client:
        yield engine, client
    engine.close()


@pytest.fixture(scope="module")
def llama():
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(SHIPPED), vocab_only=True, verbose=False)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("add_special, parse_special", [(False, True), (True, True), (False, False)])
def test_tokenize_is_llama_cpps(served, llama, text, add_special, parse_special):
    _, http = served
    r = http.post("/tokenize", json={"content": text, "add_special": add_special, "parse_special": parse_special})
    want = llama.tokenize(text.encode(), add_bos=add_special, special=parse_special)
    assert r.status_code == 200 and r.json()["tokens"] == want
    back = http.post("/detokenize", json={"tokens": want}).json()["content"]
    assert back == llama.detokenize(want, special=True).decode("utf-8", "replace")


def test_defaults_and_pieces(served, llama):
    _, http = served
    text = TEXTS[1]
    assert http.post("/tokenize", json={"content": text}).json()["tokens"] == llama.tokenize(
        text.encode(), add_bos=False, special=True)
    pieces = http.post("/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    for p in pieces:  # a piece is its text, or its bytes where it holds part of a character
        b = llama.detokenize([p["id"]], special=True)
        try:
            assert p["piece"] == b.decode()
        except UnicodeDecodeError:
            assert p["piece"] == list(b)
    assert [p["id"] for p in pieces] == llama.tokenize(text.encode(), add_bos=False, special=True)
    assert any(isinstance(p["piece"], list) for p in pieces)  # the emoji's bytes are split over tokens


@pytest.mark.parametrize("path, body, problem", [
    ("/tokenize", {}, "'content' is required"),
    ("/tokenize", {"content": 5}, "'content' must be string"),
    ("/tokenize", {"content": "a", "add_special": "yes"}, "'add_special' must be boolean"),
    ("/detokenize", {"tokens": [1, -1]}, "tokens[1]"),
    ("/detokenize", {"tokens": [10**9]}, "not a token id"),
    ("/apply-template", {"messages": [{"role": "wizard", "content": "x"}]}, "role"),
])
def test_bad_bodies_are_400s_naming_the_field(served, path, body, problem):
    _, http = served
    r = http.post(path, json=body)
    assert r.status_code == 400 and problem in r.json()["error"]["message"], r.text


def test_the_key_guards_them(served):
    _, http = served
    wrong = {"Authorization": "Bearer wrong"}
    for path in ("/tokenize", "/detokenize", "/apply-template"):
        assert http.post(path, headers=wrong, json={}).status_code == 401
    for path in ("/props", "/metrics"):
        assert http.get(path, headers=wrong).status_code == 401


def test_apply_template_is_the_prompt_chat_evaluates(served):
    engine, http = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort a list."}]
    prompt = http.post("/apply-template", json={"messages": messages}).json()["prompt"]
    ids = engine.model.chat_tokens(messages)
    assert prompt == engine.model.detokenize(ids, special=True).decode()
    chat = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == len(ids)
    # and as text through /completion it is the same prompt, token for token
    again = http.post("/tokenize", json={"content": prompt}).json()["tokens"]
    assert again == ids


def test_props(served):
    engine, http = served
    p = http.get("/props").json()
    assert p["default_generation_settings"]["n_ctx"] == 1024 == engine.model.n_ctx
    assert p["total_slots"] == 1 and p["model_path"].endswith("step35-mini-q4_k_m.gguf") and p["model_alias"] == "m"
    assert "<|im_start|>" in p["chat_template"] and p["build_info"].startswith("stepstream ")


def _metrics(http) -> dict[str, float]:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {line.split()[0]: float(line.split()[1]) for line in r.text.splitlines() if not line.startswith("#")}


def test_metrics_count_what_the_requests_report(served):
    _, http = served
    before = _metrics(http)
    timings = [http.post("/v1/completions", json={"prompt": f"def f{i}(x):", "max_tokens": 5 + i,
                                                  "temperature": 0}).json()["timings"] for i in range(3)]
    after = _metrics(http)

    def grew(name):
        return after[f"llamacpp:{name}"] - before[f"llamacpp:{name}"]

    assert grew("prompt_tokens_total") == sum(t["prompt_n"] for t in timings)
    assert grew("tokens_predicted_total") == sum(t["predicted_n"] for t in timings)
    assert grew("requests_total") == 3
    assert grew("tokens_predicted_seconds_total") == pytest.approx(sum(t["predicted_ms"] for t in timings) / 1000,
                                                                   rel=1e-3, abs=1e-3)
    assert after["llamacpp:requests_processing"] == 0 and after["llamacpp:requests_deferred"] == 0
    assert after["llamacpp:n_tokens_max"] >= max(t["prompt_n"] + t["cache_n"] + t["predicted_n"] for t in timings)


def test_metrics_are_off_unless_asked(served):
    from fastapi.testclient import TestClient

    from runtime.server.app import create_app

    engine, _ = served
    with TestClient(create_app(engine, model_name="m")) as http:
        assert http.get("/metrics").status_code == 404
        assert http.get("/props").status_code == 200


def test_texts_no_prompt_could_hold_are_refused_before_tokenizing(served):
    """Review 92: a 6.9 MiB /tokenize held the HTTP loop for 8.8 s; the content is bounded at
    4 x the context (a document to count), refused without tokenizing, and the work runs off
    the loop."""
    engine, http = served
    limit = 4 * engine.model.n_ctx
    r = http.post("/tokenize", json={"content": "word " * (200 * limit)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_too_long"
    r = http.post("/detokenize", json={"tokens": [1] * (limit + 1)})
    assert r.status_code == 400 and str(limit) in r.json()["error"]["message"]
    assert http.post("/detokenize", json={"tokens": [1] * limit}).status_code == 200


def test_metrics_print_every_digit():
    from runtime.server.metrics import Metrics

    m = Metrics(prompt_seconds=1234567.891)
    assert "llamacpp:prompt_seconds_total 1234567.891\n" in m.text(0, 0)
