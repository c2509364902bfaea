"""A forced tool call (`tool_choice` "required" or named) is finished by a grammar, where the
model could write a malformed one that came back as content: random walks over the bytes it
allows always end in a call the reply parser reads, naming an offered function, whose
arguments the function's `parameters` schema accepts (the `jsonschema` library and its format
checker); and a model that writes a word for an integer is steered to a valid call."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jsonschema
import pytest

import runtime
from runtime.text.tool_calls import forced_call, parse_reply
from runtime.text.tool_grammar import AutoToolGrammar, ToolCallGrammar
from tests.helpers.scripted_model import write_scripted_model

SHIPPED = Path(__file__).resolve().parent.parent / "runtime" / "data" / "step35-mini-q4_k_m.gguf"

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1,
                                                                              "maximum": 7},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "book", "parameters": {
        "type": "object", "$defs": {"Guest": {"type": "object", "properties": {"name": {"type": "string"},
                                                                               "age": {"type": "integer"}},
                                              "required": ["name"], "additionalProperties": False}},
        "properties": {"guests": {"type": "array", "items": {"$ref": "#/$defs/Guest"}, "minItems": 1},
                       "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                       "when": {"type": "string", "format": "date"},
                       "confirm": {"type": "boolean"}},
        "required": ["guests", "confirm"]}}},
    {"type": "function", "function": {"name": "ping"}},
]


def _walk(g, rng: random.Random, bias: bytes) -> bytes | None:
    """Random bytes among those allowed until the call is closed; None at a dead end."""
    s, out = g.start(), bytearray()
    while not g.complete(s):
        allowed = [c for c in range(256) if g.step(s, c) is not None]
        if not allowed:
            return None
        if s[0] == "text" and rng.random() < 0.1:  # a free text value ends where the model closes it
            for c in b"\n</parameter>":
                s = g.step(s, c)
                out.append(c)
            continue
        favoured = [c for c in allowed if c in bias]
        c = rng.choice(favoured if favoured and rng.random() < 0.6 else allowed)
        s = g.step(s, c)
        out.append(c)
        if len(out) > 4000:
            raise AssertionError(bytes(out[-200:]))
    return bytes(out)


@pytest.mark.parametrize("name", [None, "get_weather", "book", "ping"])
def test_every_walk_ends_in_a_call_the_parser_reads_and_the_schema_accepts(name):
    g = ToolCallGrammar(TOOLS, name)
    specs = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in TOOLS}
    rng = random.Random(3)
    seen = set()
    for _ in range(15):
        body = _walk(g, rng, bias=b'<>/\n"{}[],:0123456789tf')
        assert body is not None
        text = forced_call(name) + body.decode("utf-8", "replace")  # (as replies are decoded)
        reply = parse_reply(text, tools=TOOLS)
        assert len(reply.tool_calls) == 1 and not reply.content, text
        call = reply.tool_calls[0]
        assert name is None or call.name == name
        jsonschema.Draft202012Validator(specs[call.name], format_checker=jsonschema.FormatChecker()).validate(
            json.loads(call.arguments))
        seen.add(call.name)
    assert name is not None or len(seen) > 1


def test_what_it_refuses():
    g = ToolCallGrammar(TOOLS, "get_weather")

    def feed(text: str):
        s = g.start()
        for c in text.encode():
            s = g.step(s, c)
            if s is None:
                return None
        return s

    assert feed("<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>") is not None
    assert feed("<parameter=town>") is None  # not a parameter of the function
    assert feed("</function>") is None  # city is required
    assert feed("<parameter=days>\nthree") is None  # an integer
    assert feed("<parameter=days>\n9") is None  # past its maximum
    assert feed("<parameter=city>\nA\n</parameter>\n<parameter=city>") is None  # once each
    assert feed("<parameter=unit>\nkelvin") is None
    assert ToolCallGrammar(TOOLS, None).step(ToolCallGrammar(TOOLS, None).start(), ord("x")) is None  # no such name


def test_a_model_that_writes_a_wrong_call_is_steered_to_a_valid_one(tmp_path):
    # (a scripted model off its script writes one token for ever, so a free text value it did not
    # close would never end: the name is right, the integer a word)
    wrong = "<parameter=city>\nOslo\n</parameter>\n<parameter=days>\nthree\n</parameter>\n</function>\n</tool_call>"
    path = write_scripted_model(SHIPPED, tmp_path / "wrong.gguf", "Sure.", after={forced_call("get_weather"): wrong})
    m = runtime.load(path, n_threads=1, n_ctx=512)
    try:
        for temperature in (0, 0.9):
            r = m.create_chat_completion([{"role": "user", "content": "Weather?"}], tools=TOOLS[:1],
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                         max_tokens=120, temperature=temperature, seed=5)
            msg = r["choices"][0]["message"]
            assert msg.get("tool_calls"), msg
            call = msg["tool_calls"][0]["function"]
            assert call["name"] == "get_weather"
            jsonschema.validate(json.loads(call["arguments"]), TOOLS[0]["function"]["parameters"])
    finally:
        m.close()


def _fn(parameters: dict) -> list[dict]:
    return [{"type": "function", "function": {"name": "f", "parameters": parameters}}]


def _feed(tools, body: str):
    g = ToolCallGrammar(tools, "f")
    s = g.start()
    for c in body.encode():
        s = g.step(s, c)
        if s is None:
            return None
    return s


def _call(tools, body: str) -> dict:
    """The arguments of a whole call the grammar takes, checked against the function's schema."""
    s = _feed(tools, body + "</function>\n</tool_call>")
    assert s is not None and ToolCallGrammar.complete(s), body
    reply = parse_reply(forced_call("f") + body + "</function>\n</tool_call>", tools=tools)
    assert len(reply.tool_calls) == 1, reply
    args = json.loads(reply.tool_calls[0].arguments)
    jsonschema.validate(args, tools[0]["function"]["parameters"])
    return args


def test_what_a_review_found_the_parser_would_read_otherwise():
    """Values holding what ends a value or the call, string schemas behind a $ref, required names
    missing from properties, enums of '<' texts, patterns that need '<', newlines in a text."""
    listing = _fn({"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "string"}}}})
    assert _feed(listing, '<parameter=xs>\n["a</parameter>') is None
    assert _call(listing, '<parameter=xs>\n["a\\u003c/parameter>"]\n</parameter>\n') == {"xs": ["a</parameter>"]}
    free = _fn({"type": "object", "properties": {"x": {"description": "anything"}}})
    assert _feed(free, "<parameter=x>\nhi </tool_call>") is None
    color = _fn({"type": "object", "$defs": {"Color": {"enum": ["red", "green"], "type": "string"}},
                 "properties": {"c": {"$ref": "#/$defs/Color"}}, "required": ["c"]})
    assert _feed(color, "<parameter=c>\npurple") is None and _call(color, "<parameter=c>\nred\n</parameter>\n")
    missing = _fn({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["b"]})
    assert _feed(missing, "</function>") is None and _call(missing, "<parameter=b>\n1\n</parameter>\n") == {"b": 1}
    tags = _fn({"type": "object", "properties": {"a": {"enum": ["<b>", "<i>"]}}, "required": ["a"]})
    assert _call(tags, "<parameter=a>\n<i>\n</parameter>\n") == {"a": "<i>"}
    angle = _fn({"type": "object", "properties": {"a": {"type": "string", "pattern": "^<"}}, "required": ["a"]})
    assert _call(angle, "<parameter=a>\n<x\n</parameter>\n") == {"a": "<x"}
    lines = _fn({"type": "object", "properties": {"t": {"type": "string", "maxLength": 40}}, "required": ["t"]})
    assert _call(lines, "<parameter=t>\nline one\nline two\n</parameter>\n") == {"t": "line one\nline two"}
    assert _call(_fn({"type": "object", "properties": {"t": {"type": "string"}}}),
                 "<parameter=t>\n<b>hi</b>\n</parameter>\n") == {"t": "<b>hi</b>"}
    nothing = _fn({"type": "object", "properties": {"z": {"enum": ["\0"]}, "no": False}})
    assert _feed(nothing, "<parameter=no>") is None and _call(nothing, "") == {}


# ------------------------------------------------------------ tool_choice "auto": a lazy grammar

_CHUNKS = ["Let me check. ", "ok", "\n", " ", "a <b>tag</b> ", "<tool_c", "</thin", "{", "x"]


def _auto_walk(g, rng: random.Random) -> tuple[bytes, int, int]:
    """A random reply the auto grammar allows: text chunks, calls opened in content and finished
    by random bytes among those allowed, reasoning sections where the parser reads them (at the
    start, or after a call with only whitespace since). Returns the reply, the calls opened in
    content, and the `<tool_call>` texts written inside reasoning."""
    s, out, calls, mentioned = g.start(), bytearray(), 0, 0
    fresh = True  # nothing but whitespace since the start or the last call: a <think> opens reasoning

    def feed(text: bytes):
        nonlocal s
        for c in text:
            s = g.step(s, c)
            assert s is not None, bytes(out + text)
        out.extend(text)

    for _ in range(rng.randrange(2, 9)):
        assert g.thinking(s) and g.complete(s)  # free text, and the reply may end here
        pick = rng.random()
        if pick < 0.35:
            feed(b"<tool_call>")
            calls += 1
            while not g.complete(s):
                allowed = [c for c in range(256) if g.step(s, c) is not None]
                assert allowed, bytes(out)  # no dead end
                if s[0] == "text" and rng.random() < 0.1:
                    feed(b"\n</parameter>")
                    continue
                favoured = [c for c in allowed if c in b'<>/\n"{}[],:0123456789tf']
                c = rng.choice(favoured if favoured and rng.random() < 0.6 else allowed)
                feed(bytes((c,)))
                assert len(out) < 20000
            fresh = True
        elif pick < 0.5 and fresh:
            feed(b"<think>\nI could write <tool_call> here")
            mentioned += 1
            feed(b" and it stays text.\n</think>\n")
        else:  # (a <think> after text is text, for the parser and the grammar alike)
            chunk = rng.choice(_CHUNKS + ([] if fresh else ["<think>"])).encode()
            feed(chunk)
            fresh = fresh and not chunk.strip()
    return bytes(out), calls, mentioned


@pytest.mark.parametrize("seed", range(3))
def test_auto_every_call_a_reply_opens_is_one_the_parser_reads_and_the_schema_accepts(seed):
    g = AutoToolGrammar(TOOLS)
    specs = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in TOOLS}
    rng = random.Random(seed)
    forms, total = set(), 0
    for _ in range(8):
        body, calls, mentioned = _auto_walk(g, rng)
        text = body.decode("utf-8", "replace")
        reply = parse_reply(text, tools=TOOLS)
        assert len(reply.tool_calls) == calls, text
        assert "<tool_call>" not in (reply.content or ""), text
        assert (reply.reasoning or "").count("<tool_call>") == mentioned, text
        for call in reply.tool_calls:
            jsonschema.Draft202012Validator(specs[call.name], format_checker=jsonschema.FormatChecker()).validate(
                json.loads(call.arguments))
        forms |= {"json" if "<tool_call>\n{" in text else None, "markup" if "<tool_call>\n<f" in text else None}
        total += calls
    assert total and {"json", "markup"} <= forms


def feed_all(g, s, data: bytes):
    for c in data:
        s = g.step(s, c)
        if s is None:
            return None
    return s


def test_auto_what_it_refuses():
    g = AutoToolGrammar(TOOLS)

    def feed(text: str, in_reasoning: bool = False):
        s = g.start(in_reasoning)
        for c in text.encode():
            s = g.step(s, c)
            if s is None:
                return None
        return s

    assert g.complete(feed("Any text at all, <b>even tags</b> and </tool_call>."))
    assert feed("<tool_call>\nSure") is None  # a call, in either form
    assert feed("<tool_call><function=get_weather>") is None  # the template's newline
    assert feed("<tool_call>\n<function=nowcast>") is None  # an offered function
    assert feed('<tool_call>\n{"name": "nowcast"') is None
    assert feed('<tool_call>\n{"name": "get_weather", "arguments": {"days": 3}}') is None  # city is required
    assert feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "a</tool_call>') is None
    assert feed("<tool_call>\n<function=get_weather>\n<parameter=days>\nthree") is None
    inside = feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}')
    assert inside is not None and not g.complete(inside)  # the end of text waits for the call's end
    assert g.complete(feed('<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>\nDone.'))
    # markup in reasoning is text, whether the prompt opened it or the reply did
    assert g.complete(feed("I may <tool_call>\nSure", in_reasoning=True))
    assert g.complete(feed("<think>\n<tool_call>\nSure\n</think>\nOk"))
    assert feed("<think>\nplan\n</think>\n<tool_call>\nSure") is None
    # a <think> after text is text, as the parser reads it: a call after it is held (review 87)
    assert feed("Hi <think><tool_call>\n<function=get_weather>\n<parameter=days>\nthree") is None
    assert g.complete(feed(" \n<think>\n<tool_call>\nSure"))  # after blanks, reasoning
    assert g.complete(feed('<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>\n<think><tool_call>x'))
    # after a forced call, a further call is held too
    forced = ToolCallGrammar(TOOLS[:1], "get_weather")
    s = forced.start()
    for c in b"<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>\nAnd <tool_call>\n":
        s = forced.step(s, c)
    assert forced.complete(forced.step(forced.step(s, ord("{")), ord(" "))) is False
    assert forced.step(s, ord("S")) is None and forced.step(feed_all(forced, s, b"<function="), ord("p")) is None


def test_auto_a_model_that_writes_a_wrong_call_is_steered_to_a_valid_one(tmp_path):
    """A call whose integer is a word comes back as a valid call, in either form; a reply with no
    call is left as it was."""
    wrong = {"markup": "Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n"
                       "<parameter=days>\nthree\n</parameter>\n</function>\n</tool_call>",
             "json": 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": '
                     '"three"}}\n</tool_call>',
             "none": "It is sunny in Oslo <b>today</b>."}
    for form, text in wrong.items():
        path = write_scripted_model(SHIPPED, tmp_path / f"{form}.gguf", text)
        m = runtime.load(path, n_threads=1, n_ctx=512)
        try:
            r = m.create_chat_completion([{"role": "user", "content": "Weather?"}], tools=TOOLS[:1],
                                         max_tokens=120, temperature=0, seed=5)
        finally:
            m.close()
        msg = r["choices"][0]["message"]
        if form == "none":
            assert msg["content"] == text and not msg.get("tool_calls")
            continue
        assert msg["content"] == "Checking." and len(msg["tool_calls"]) == 1, msg
        call = msg["tool_calls"][0]["function"]
        assert call["name"] == "get_weather"
        args = json.loads(call["arguments"])
        jsonschema.validate(args, TOOLS[0]["function"]["parameters"])
        assert args["city"] == "Oslo" and isinstance(args["days"], int)


def test_drafting_under_a_grammar_gives_the_plain_tokens(tmp_path):
    """A constrained reply decoded without drafts; now the MTP heads draft under it. A verify pass
    samples its positions in order and stops at the first token that differs from its draft, so
    the grammar takes exactly the tokens emitted: with the same seed, the tokens are the plain
    ones, greedy or sampled, and the heads (which follow the scripted model's text) are accepted."""
    from runtime.generation.request import Request, run
    from runtime.generation.sampling import SamplingParams
    from runtime.text.json_schema import JsonSchemaGrammar
    from tests.test_server_tools import REPLIES, TOOLS as WEATHER, USER

    text, after = REPLIES["think_call"]
    scripted = runtime.load(write_scripted_model(SHIPPED, tmp_path / "call.gguf", text, after=after),
                            n_threads=1, n_ctx=1024)
    shipped = runtime.load(SHIPPED, n_threads=1, n_ctx=1024)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "size": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "size"]}
    cases = [(scripted, scripted.chat_tokens(USER, tools=WEATHER), lambda: AutoToolGrammar(WEATHER), 0.0),
             (shipped, shipped.chat_tokens([{"role": "user", "content": "A file as JSON."}]),
              lambda: JsonSchemaGrammar(schema), 0.9)]
    try:
        for model, ids, grammar, temperature in cases:
            replies = []
            for mtp in (0, 3):
                req = Request(ids, SamplingParams(temperature=temperature, seed=11), 160, grammar=grammar(), mtp=mtp)
                replies.append(("".join(s.text for s in run(model, req)), req.timings))
            (plain, _), (drafted, timings) = replies
            assert drafted == plain and timings.draft_n > 0
            if model is scripted:
                assert parse_reply(drafted, tools=WEATHER).tool_calls and timings.draft_n_accepted > 0
            else:
                jsonschema.validate(json.loads(drafted), schema)
    finally:
        scripted.close()
        shipped.close()


def test_auto_json_calls_read_refs_inside_the_parameters():
    """A $ref into the parameters (not into $defs) pointed into the Hermes call's own schema, so
    `{"x": {}}` passed for an integer (review 87)."""
    params = {"type": "object", "properties": {"arguments": {"type": "integer"},
                                               "x": {"$ref": "#/properties/arguments"}}}
    g = AutoToolGrammar([{"type": "function", "function": {"name": "f", "parameters": params}}])
    assert feed_all(g, g.start(), b'<tool_call>\n{"name": "f", "arguments": {"x": {') is None
    s = feed_all(g, g.start(), b'<tool_call>\n{"name": "f", "arguments": {"x": 5}}\n</tool_call>')
    assert g.complete(s)
    jsonschema.validate({"x": 5}, params)


def test_numbers_in_calls_are_ones_python_reads_as_finite():
    """`1e999` (or an integer past Python's 4,300 digits) passed the grammar, and the parser, which
    cannot write it back as JSON `arguments`, made the whole call text (review 87): a call's
    numbers are now held within +-10^300, written without an exponent."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "number"}, "n": {"type": "integer", "minimum": 1}}}}}]
    g = AutoToolGrammar(tools)
    for refused in ('<tool_call>\n{"name": "f", "arguments": {"x": 1e', "<tool_call>\n<function=f>\n<parameter=x>\n1e",
                    "<tool_call>\n<function=f>\n<parameter=n>\n" + "9" * 301):
        assert feed_all(g, g.start(), refused.encode()) is None, refused[-20:]
    for body in ('{"name": "f", "arguments": {"x": -2.5, "n": ' + "9" * 299 + "}}",
                 "<function=f>\n<parameter=x>\n0.001\n</parameter>\n</function>"):
        text = f"<tool_call>\n{body}\n</tool_call>"
        assert g.complete(feed_all(g, g.start(), text.encode()))
        (call,) = parse_reply(text, tools=tools).tool_calls
        jsonschema.validate(json.loads(call.arguments), tools[0]["function"]["parameters"])
