"""llama-server's forms of `logit_bias` (runtime/server/requests.py, app.model_request): a text
for a token id (each of the text's tokens biased, in the list form and as an object key), and
`false` for a bias (the token never drawn), against the same request written with token ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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

    model = load(SHIPPED, n_ctx=512, n_threads=1)
    engine = Engine(model)
    engine.start()
    with TestClient(create_app(engine, model_name="m")) as client:
        yield model, client
    engine.close()
    model.close()


def _text(http, path: str, bias) -> str:
    body = {"prompt": PROMPT, "temperature": 0, "logit_bias": bias}
    body["n_predict" if path == "/completion" else "max_tokens"] = 24
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()["content"] if path == "/completion" else r.json()["choices"][0]["text"]


def test_a_text_biases_its_tokens_and_false_bans(served):
    model, http = served
    plain = _text(http, "/v1/completions", None)
    first = model.tokenize(plain, add_bos=False)[:3]  # the greedy reply's first tokens
    word = model.detokenize(first[:1]).decode()
    for path in ("/v1/completions", "/completion"):
        by_ids = _text(http, path, [[t, False] for t in model.tokenize(word, add_bos=False)])
        assert by_ids != plain  # (its first token is banned)
        assert _text(http, path, [[word, False]]) == by_ids  # the list form's text
        assert _text(http, path, {word: False}) == by_ids  # a key that is no token id
        assert _text(http, path, [[word, -100]]) == _text(http, path, {str(t): -100 for t in
                                                                      model.tokenize(word, add_bos=False)})
    # a token a text repeats is biased once; one a text and an id (or two texts) name gets both biases
    # (llama.cpp adds them); the request's biases are in generation_settings, as llama-server's
    pair = model.detokenize(first[1:3]).decode()
    assert model.tokenize(pair, add_bos=False) == first[1:3]
    x = model.tokenize(" x x x", add_bos=False)
    assert len(set(x)) < len(x)  # (a text whose tokens repeat)
    r = http.post("/completion", json={"prompt": PROMPT, "n_predict": 1, "logit_bias": [
        [pair, -3], [first[1], -2.5], [" x x x", 1], [x[-1], False]]})
    got = {d["token"]: d["bias"] for d in r.json()["generation_settings"]["logit_bias"]}
    want = {first[1]: -5.5, first[2]: -3.0, **{t: 1.0 for t in x}}
    want[x[-1]] = -float(np.finfo(np.float32).max)  # (banned: no bias brings it back)
    assert got == want


def test_banned_tokens_are_never_drawn_when_sampling(served):
    model, http = served
    common = model.tokenize(" ", add_bos=False) + model.tokenize("\n", add_bos=False)
    for seed in range(3):
        r = http.post("/completion", json={"prompt": PROMPT, "n_predict": 40, "temperature": 1.5, "seed": seed,
                                           "return_tokens": True, "logit_bias": [[" ", False], ["\n", False]]})
        assert r.status_code == 200, r.text
        assert not set(r.json()["tokens"]) & set(common)
