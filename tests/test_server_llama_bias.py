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
        [pair, -3], [first[1], -2.5], [" x x x", 1], [x[0], False], [7, 1.5], [7, 1.5]]})
    got = {d["token"]: d["bias"] for d in r.json()["generation_settings"]["logit_bias"]}
    want = {first[1]: -5.5, first[2]: -3.0, 7: 3.0}  # (the list form adds a token named twice, as llama-server)
    for t in x:  # each occurrence of a token in a text adds its bias, as llama.cpp pushes one per token
        want[t] = want.get(t, 0.0) + 1.0
    want[x[0]] = None  # banned (shown as llama-server shows its -inf: null); no bias brings it back
    assert got == want


def test_banned_tokens_are_never_drawn_when_sampling(served):
    model, http = served
    common = model.tokenize(" ", add_bos=False) + model.tokenize("\n", add_bos=False)
    for seed in range(3):
        r = http.post("/completion", json={"prompt": PROMPT, "n_predict": 40, "temperature": 1.5, "seed": seed,
                                           "return_tokens": True, "logit_bias": [[" ", False], ["\n", False]]})
        assert r.status_code == 200, r.text
        assert not set(r.json()["tokens"]) & set(common)


def test_llama_servers_key_and_value_corners(served):
    """(review 100) Biases that add up past float32 stay in it (a 500 before); object keys are ids
    where llama.cpp's strtol reads them whole (" 5" is token 5), else texts, held to OpenAI's
    range like the ids; a negative id is named."""
    model, http = served
    r = http.post("/completion", json={"prompt": PROMPT, "n_predict": 2, "logit_bias": [["a", 1e308], ["a", 1e308]]})
    assert r.status_code == 200, r.text
    top = float(np.finfo(np.float32).max)
    assert [d["bias"] for d in r.json()["generation_settings"]["logit_bias"]] == [top] * len(model.tokenize("a", add_bos=False))
    got = http.post("/completion", json={"prompt": PROMPT, "n_predict": 1, "logit_bias": {" 5": 2, "+6": 1}}).json()
    assert {d["token"]: d["bias"] for d in got["generation_settings"]["logit_bias"]} == {5: 2.0, 6: 1.0}
    for bias, words in (({"-1": 5}, "names -1, which is not a token id"), ([[-3, 1]], "names -3"),
                        ({"abc": 200}, 'value for "abc" must be a number from -100 to 100'),
                        ({"5": 1, "05": 1}, "names token 5 twice")):
        r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "logit_bias": bias})
        assert r.status_code == 400 and words in r.json()["error"]["message"], (bias, r.text)


def test_a_banned_token_stays_out_of_every_sampler():
    """(review 100) A ban used to be float32's lowest logit, which a repeat penalty below 1
    halved, XTC at threshold 0 kept as the least likely token, and a grammar's fallback drew:
    it is -inf now, as llama.cpp's `false`."""
    from runtime.base.errors import StepstreamError
    from runtime.generation.sampling import Sampler, SamplingParams
    from runtime.server.llama_fields import BANNED

    z = np.linspace(0, 3, 16).astype(np.float32)
    for kw in (dict(repeat_penalty=0.5), dict(xtc_probability=1.0, xtc_threshold=0.0),
               dict(top_n_sigma=1.0, repeat_penalty=0.5), dict(temperature=0)):
        for seed in range(8):
            s = Sampler(SamplingParams(logit_bias=((15, BANNED), (3, BANNED)), seed=seed, **kw))
            assert s(z, [15, 3, 15]) not in (15, 3), kw

    class OnlyBanned:  # a constraint that allows the banned tokens alone
        def allows(self, tok):
            return tok in (3, 15)

        def candidates(self):
            m = np.zeros(16, bool)
            m[[3, 15]] = True
            return m

        def take(self, tok):
            pass

    s = Sampler(SamplingParams(logit_bias=((15, BANNED), (3, BANNED)), seed=0), constraint=OnlyBanned())
    with pytest.raises(StepstreamError, match="no token of the vocabulary can continue"):
        s(z, [])
