"""JSON mode (`response_format: {"type": "json_object"}`), which agents use for structured
replies and which was refused: the recognizer of runtime.text.json_constraint against Python's
`json` module (strict: no NaN or Infinity), and replies through the sampler, the Python API and
a live server with the `openai` client. The models are copies of the shipped one whose greedy
decoding writes a chosen text (tests/helpers/scripted_model.py): a valid object passes
untouched; text around it, or an object the model gets wrong, is steered into one."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime.base.errors import StepstreamError
from runtime.text import json_constraint as J
from tests.helpers.scripted_model import write_scripted_model

SHIPPED = Path(__file__).resolve().parent.parent / "runtime" / "data" / "step35-mini-q4_k_m.gguf"


def _strict(text: bytes):
    """RFC 8259's JSON text: UTF-8 (json.loads of bytes passes encoded surrogates), no NaN or Infinity."""
    return json.loads(text.decode("utf-8"), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


def _ours(data: bytes) -> bool:
    s = J.feed(J.start(), data)
    return s is not None and J.complete(s)


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.choice(["obj", "arr", "str", "int", "float", "lit"] if depth < 4 else ["str", "int", "float", "lit"])
    if kind == "obj":
        return {_random_string(rng): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    if kind == "arr":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if kind == "str":
        return _random_string(rng)
    if kind == "int":
        return rng.choice([0, -1, 7, 10**20, -(10**12)])
    if kind == "float":
        return rng.choice([0.5, -1.25e-7, 3e300, 1e-300, 12.0])
    return rng.choice([True, False, None])


def _random_string(rng: random.Random) -> str:
    alphabet = ["a", "Z", " ", '"', "\\", "/", "\n", "\t", "\x01", "é", "中", "😀", "\u2028", "\ud7ff", "\ue000"]
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))


def _documents(n: int):
    rng = random.Random(0)
    for i in range(n):
        value = {_random_string(rng): _random_value(rng) for _ in range(rng.randint(0, 4))}
        style = i % 3
        text = json.dumps(value, ensure_ascii=bool(i % 2), indent=2 if style == 0 else None,
                          separators=(",", ":") if style == 1 else None)
        yield text.encode()


def test_every_prefix_of_a_json_object_continues_and_the_whole_completes():
    for doc in _documents(300):
        s = J.start()
        for i, c in enumerate(doc):
            assert not J.complete(s), doc[:i]
            s = J.step(s, c)
            assert s is not None, (doc, i)
        assert J.complete(s), doc


def test_the_recognizer_agrees_with_pythons_json_on_edited_documents():
    """Sound (what it completes, json.loads reads as an object) and complete (what json.loads
    reads as an object, within the whitespace bounds, it completes), on 6,000 byte edits."""
    rng = random.Random(1)
    docs = list(_documents(200)) + [b'{"a": [1, 2.5e-3, -0, true, null, "x\\u00e9"]}', b'{"k": {"n": -12.0E+5}}']
    pieces = [b"", b",", b":", b"{", b"}", b"[", b"]", b'"', b"\\", b"\\u12", b"-", b"0", b"01", b"1.", b".5", b"e5",
              b"tru", b"nul", b"NaN", b"Infinity", b"\x00", b"\x7f", b"\xc3", b"\xa9", b"\xed\xa0\x80", b"\xe0\x80\x80",
              b"\xf4\x90\x80\x80", b"\xf0\x9f\x98\x80", b" ", b"\n"]
    seen_ok = seen_bad = 0
    for _ in range(6000):
        doc = bytearray(rng.choice(docs))
        for _ in range(rng.randint(1, 3)):
            at = rng.randint(0, len(doc))
            cut = rng.randint(0, 2)
            doc[at:at + cut] = rng.choice(pieces)
        doc = bytes(doc)
        try:
            ok = isinstance(_strict(doc), dict)
        except ValueError:
            ok = False
        mine = _ours(doc)
        if mine:
            assert ok, doc
        bounded = (doc == doc.strip() and not re.search(rb"[ \t\r\n]{%d}" % (J.MAX_WS + 1), doc))
        if ok and bounded:
            assert mine, doc
        seen_ok += ok
        seen_bad += not ok
    assert seen_ok > 300 and seen_bad > 3000  # both kinds were tried


def test_whitespace_is_bounded_and_nothing_follows_the_object():
    assert J.feed(J.start(), b"  {") is not None and J.feed(J.start(), b"   {") is None
    assert J.feed(J.start(), b"{" + b" " * J.MAX_WS + b"}") is not None
    assert J.feed(J.start(), b"{" + b" " * (J.MAX_WS + 1)) is None
    assert J.feed(J.start(), b'{"a": " ' + b" " * 200 + b'"}') is not None  # inside a string: text
    assert J.feed(J.start(), b"{} ") is None and J.feed(J.start(), b"{}{") is None
    assert J.feed(J.start(), b"[1]") is None and J.feed(J.start(), b'"x"') is None  # an object, as the mode says
    deep = b'{"a":' * J.MAX_DEPTH
    assert J.feed(J.start(), deep + b"1") is not None and J.feed(J.start(), deep + b"{") is None


def test_reasoning_comes_first_when_the_prompt_opened_it():
    s = J.feed(J.start(in_reasoning=True), b"I think {not json} here\n</thi")
    assert s is not None and s[0] == J.THINK
    s = J.feed(s, b'nk>\n\n{"a": 1}')
    assert s is not None and J.complete(s)
    assert J.feed(J.start(in_reasoning=True), b"x</think>\nnope") is None


def test_the_mask_is_the_set_of_tokens_that_continue():
    """Vocabulary.mask, found by walking a trie, equals checking every token alone."""
    m = runtime.load(SHIPPED, n_threads=1, n_ctx=64)
    vocab = J.vocabulary(m.tokenizer)
    for prefix in [b"", b"{", b'{"ke', b'{"key": ', b'{"key": 12', b'{"key": [tr', b'{"a": {"b": "\\u00', b'{"a": 1}',
                   b'{"a": "\xe4']:
        s = J.feed(J.start(), prefix)
        want = np.array([(not vocab.silent[t] and J.feed(s, vocab.pieces[t]) is not None) or
                         (t in vocab.eog and J.complete(s)) for t in range(len(vocab.pieces))])
        assert (vocab.mask(s) == want).all(), prefix
        assert want.any()


REPLIES = {
    "valid": '{"name": "Tom", "age": 3, "tags": ["a", "b"], "ok": true, "x": null, "v": -1.5e3}',
    "chatty": '{"name": "Tom", "age": 3} Thanks, and more text',  # the object, then words: it ends at the object
    "broken": '{"name": "Tom", "age": 3,} done',  # a trailing comma: steered elsewhere
}
WANT = {"valid": REPLIES["valid"], "chatty": '{"name": "Tom", "age": 3}'}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("json-mode")
    return {name: write_scripted_model(SHIPPED, root / f"{name}.gguf", text) for name, text in REPLIES.items()}


MSGS = [{"role": "user", "content": "Describe the cat as JSON."}]


@pytest.mark.parametrize("name", list(REPLIES))
def test_replies_in_json_mode_are_json_objects(files, name):
    m = runtime.load(files[name], n_threads=1, n_ctx=512)
    free = m.create_chat_completion(MSGS, max_tokens=100, temperature=0)["choices"][0]["message"]["content"]
    assert free == REPLIES[name]  # the script, unconstrained
    for temperature in (0, 0.7):
        r = m.create_chat_completion(MSGS, max_tokens=100, temperature=temperature, seed=5,
                                     response_format={"type": "json_object"})
        c = r["choices"][0]
        text = c["message"]["content"].encode()
        if name in WANT:
            assert c["message"]["content"] == WANT[name] and c["finish_reason"] == "stop", c
        # a bigram model steered off its script wanders (its other tokens tie), so this one may
        # run to the limit; what it wrote is still where some JSON object goes on
        assert J.feed(J.start(), text) is not None, text
        if c["finish_reason"] == "stop":
            assert isinstance(_strict(text), dict)
    chunks = list(m.create_chat_completion(MSGS, max_tokens=100, temperature=0, stream=True,
                                           response_format={"type": "json_object"}))
    streamed = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks)
    assert streamed == m.create_chat_completion(MSGS, max_tokens=100, temperature=0,
                                                response_format={"type": "json_object"})["choices"][0]["message"]["content"]


def test_json_mode_refusals_are_named(files):
    m = runtime.load(files["valid"], n_threads=1, n_ctx=512)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for kw, words in (({"response_format": {"type": "xml"}}, "not supported"),
                      ({"response_format": {"type": "json_object"}, "tools": tools}, "goes without tools")):
        with pytest.raises(StepstreamError, match=words):
            m.create_chat_completion(MSGS, max_tokens=4, **kw)
    r = m.create_chat_completion(MSGS, max_tokens=100, temperature=0, tools=tools, tool_choice="none",
                                 response_format={"type": "json_object"})
    assert _strict(r["choices"][0]["message"]["content"].encode()) is not None


def test_json_mode_through_the_server(files):
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from tests.helpers.live_server import live_server

    with live_server(files["chatty"], "--alias", "m") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="m", messages=MSGS, max_tokens=100, temperature=0,
                                           response_format={"type": "json_object"})
        assert r.choices[0].message.content == WANT["chatty"] and r.choices[0].finish_reason == "stop"
        free = client.chat.completions.create(model="m", messages=MSGS, max_tokens=100, temperature=0)
        assert free.choices[0].message.content == REPLIES["chatty"]
        stream = client.chat.completions.create(model="m", messages=MSGS, max_tokens=100, temperature=0, stream=True,
                                                response_format={"type": "json_object"})
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == r.choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="'response_format' with \"xml\" is not supported"):
            client.chat.completions.create(model="m", messages=MSGS, max_tokens=4, extra_body={
                "response_format": {"type": "xml"}})


class _OnlyOne:
    """A constraint that allows one token, as JSON mode allows only EOG once the object closed."""

    def __init__(self, tok: int, n: int):
        self.tok, self.n = tok, n

    def allows(self, t):
        return t == self.tok

    def candidates(self):
        m = np.zeros(self.n, bool)
        m[self.tok] = True
        return m

    def take(self, t):
        pass


@pytest.mark.parametrize("penalty", [1e300, 1e-300, 1.3])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_the_constrained_draw_ends_whatever_the_penalty_did(penalty, temperature):
    """A repetition penalty that took every allowed token's logit to -inf made the redraw loop
    pick a refused token for ever (a review: greedy hung with the model's lock held)."""
    from runtime.generation.sampling import Sampler, SamplingParams

    logits = np.linspace(1.0, -1.0, 10).astype(np.float32)  # the allowed token's logit is negative
    s = Sampler(SamplingParams(temperature=temperature, repeat_penalty=penalty, seed=1), _OnlyOne(5, 10))
    assert s(logits, history=[5, 0]) == 5
    free = Sampler(SamplingParams(temperature=temperature, repeat_penalty=penalty, seed=1))
    assert 0 <= free(logits, history=[5, 0, 1]) < 10  # (no NaN probabilities from +-inf either)
