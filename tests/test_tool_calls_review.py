"""A review of tool calling against OpenAI's contract and llama-server's behaviour:

- a call naming a function the request did not offer (or, with a named tool_choice, another
  function than that one) is no tool call: llama-server's grammar has one rule per offered
  function, and an agent looks the name up in its tools. It comes back as the text it was;
- `arguments` is always JSON: NaN and infinities (`1e999` overflows to one) were written as
  `NaN`/`Infinity`, which JSON.parse and strict parsers refuse;
- tool schemas OpenAI refuses (a `parameters` that is no object schema, two tools of one name)
  are refused in one line; `parameters: null` is no parameters, as OpenAI and llama.cpp take it.

Each case is checked whole and fed one character at a time (the streaming parser)."""

from __future__ import annotations

import json

import pytest

import runtime
from runtime.base.errors import StepstreamError
from runtime.text.tool_calls import ReplyStream, ToolSpecError, callable_tools, check_tools, parse_reply

MODEL = "runtime/data/step35-mini-q4_k_m.gguf"


def _tool(name, **props):
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": props}}}


TOOLS = [_tool("add", a={"type": "number"}, b={"type": "number"}), _tool("get_weather", city={"type": "string"})]


def _call(name, **args):
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in args.items())
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


def _both(text, tools, **kw):
    """(content, [(name, arguments)]) whole, after checking the stream fed a character at a time agrees."""
    whole = parse_reply(text, tools=tools, **kw)
    stream = ReplyStream(tools=tools, **kw)
    deltas = [d for ch in text for d in stream.push(ch)] + stream.finish()
    assert "".join(d.get("content", "") for d in deltas) == (whole.content or "")
    streamed = [(c["function"]["name"], c["function"]["arguments"]) for d in deltas for c in d.get("tool_calls", ())]
    assert streamed == [(c.name, c.arguments) for c in whole.tool_calls]
    return whole.content, streamed


def test_a_call_to_a_function_not_offered_is_text():
    text = _call("rm_rf", path="/") + "\n" + _call("get_weather", city="Oslo")
    content, calls = _both(text, TOOLS)
    assert calls == [("get_weather", '{"city": "Oslo"}')]
    assert content == _call("rm_rf", path="/")
    assert _both(text, None)[1] == [("rm_rf", '{"path": "/"}'), ("get_weather", '{"city": "Oslo"}')]  # no tools said


def test_a_named_tool_choice_keeps_only_calls_to_that_function():
    named = {"type": "function", "function": {"name": "add"}}
    text = _call("get_weather", city="Paris") + "\n" + _call("add", a=1, b=2)
    content, calls = _both(text, callable_tools(TOOLS, named))
    assert calls == [("add", '{"a": 1, "b": 2}')] and content == _call("get_weather", city="Paris")
    assert callable_tools(TOOLS, "none") is None and callable_tools(TOOLS, "required") == TOOLS
    assert callable_tools(None, "auto") is None


@pytest.mark.parametrize("text, want", [
    (_call("add", a=1, b="1e999"), ("add", {"a": 1, "b": "1e999"})),  # overflows to inf: kept as its text
    (_call("add", a="-1e999", b="[1, 1e400]"), ("add", {"a": "-1e999", "b": "[1, 1e400]"})),
    (_call("add", a="NaN", b="Infinity"), ("add", {"a": "NaN", "b": "Infinity"})),
    ('<tool_call>\n{"name": "add", "arguments": {"a": NaN, "b": 1}}\n</tool_call>', None),  # no JSON: not a call
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1e999, "b": 1}}\n</tool_call>', None),
    ('<tool_call>\n{"name": "add", "arguments": "{\\"a\\": -Infinity}"}\n</tool_call>', None),
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1.5, "b": -2e300}}\n</tool_call>', ("add", {"a": 1.5, "b": -2e300})),
])
def test_arguments_are_always_json(text, want):
    content, calls = _both(text, TOOLS)

    def strict(s):
        return json.loads(s, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))

    if want is None:
        assert calls == [] and content == text
    else:
        assert [(n, strict(a)) for n, a in calls] == [want] and content is None


@pytest.mark.parametrize("tools, words", [
    ([{"type": "function", "function": {"name": "a", "parameters": {"type": "wat"}}}],
     r'tools\[0\].function.parameters must be a JSON Schema of type "object", got type "wat"'),
    ([{"type": "function", "function": {"name": "a", "parameters": {"type": "object", "properties": 5}}}],
     r"tools\[0\].function.parameters.properties must be an object of JSON Schemas, got 5"),
    ([{"type": "function", "function": {"name": "a", "parameters": {"properties": {"x": 3}}}}],
     r"properties must be an object of JSON Schemas"),
    ([{"type": "function", "function": {"name": "a", "parameters": []}}],
     r"tools\[0\].function.parameters must be a JSON Schema object, got list"),
    ([_tool("a"), _tool("b"), _tool("a")], r'tools\[2\] and tools\[0\] both name the function "a"'),
    # review 88: definitions that are not an object of schemas were a 500 when the grammar was built
    ([{"type": "function", "function": {"name": "a", "parameters": {"type": "object", "$defs": 5}}}],
     r"tools\[0\].function.parameters.\$defs must be an object of JSON Schemas, got 5"),
    ([{"type": "function", "function": {"name": "a", "parameters": {"definitions": {"x": []}}}}],
     r"parameters.definitions must be an object of JSON Schemas"),
])
def test_schemas_openai_refuses_are_refused(tools, words):
    with pytest.raises(ToolSpecError, match=words):
        check_tools(tools, "auto")


def test_null_parameters_are_no_parameters_and_the_api_takes_them():
    tools = [{"type": "function", "function": {"name": "now", "parameters": None}},
             {"type": "function", "function": {"name": "later"}}]
    check_tools(tools, "auto")
    m = runtime.load(MODEL, n_threads=1, n_ctx=256)
    msgs = [{"role": "user", "content": "What time is it?"}]
    r = m.create_chat_completion(msgs, tools=tools, max_tokens=4, temperature=0)
    assert r["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    with pytest.raises(StepstreamError, match="both name the function"):
        m.create_chat_completion(msgs, tools=tools + tools[:1], max_tokens=1)


def test_tool_choice_none_still_shows_the_tools_as_llama_server_and_vllm_do():
    m = runtime.load(MODEL, n_threads=1, n_ctx=512)
    msgs = [{"role": "user", "content": "What is 1 + 2?"}]
    n = {choice: m.create_chat_completion(msgs, tools=TOOLS, tool_choice=choice, max_tokens=1,
                                          temperature=0)["usage"]["prompt_tokens"] for choice in ("auto", "none")}
    bare = m.create_chat_completion(msgs, max_tokens=1, temperature=0)["usage"]["prompt_tokens"]
    assert n["none"] == n["auto"] > bare


def test_a_lone_surrogate_in_arguments_is_escaped_so_the_reply_can_be_sent():
    """JSON's `\\ud800` alone reads as a character no UTF-8 text holds: `arguments` kept it raw,
    and encoding the response failed (a 500, or a broken stream). It is escaped now, with the
    rest of the non-ASCII characters, and reads back the same."""
    for body in ('{"name": "get_weather", "arguments": {"city": "\\ud800 é"}}',
                 '<function=get_weather>\n<parameter=city>\n["\\udc00", "é"]\n</parameter>\n</function>'):
        reply = parse_reply(f"<tool_call>\n{body}\n</tool_call>", tools=[_tool("get_weather", city={})])
        (call,) = reply.tool_calls
        json.dumps({"arguments": call.arguments}, ensure_ascii=False).encode("utf-8")
        assert "\\u00e9" in call.arguments
        assert json.loads(call.arguments)["city"] in ("\ud800 é", ["\udc00", "é"])
    plain = parse_reply('<tool_call>\n{"name": "get_weather", "arguments": {"city": "é"}}\n</tool_call>', tools=TOOLS)
    assert plain.tool_calls[0].arguments == '{"city": "é"}'  # characters as they are otherwise


def _cut(text, tools=TOOLS):
    """(content, reasoning, calls) of a reply cut short at `text`'s end, whole and streamed a
    character at a time (which must agree)."""
    whole = parse_reply(text, tools=tools, cut=True)
    stream = ReplyStream(tools=tools)
    deltas = [d for ch in text for d in stream.push(ch)] + stream.finish(cut=True)
    assert "".join(d.get("content", "") for d in deltas) == (whole.content or "")
    assert "".join(d.get("reasoning_content", "") for d in deltas) == (whole.reasoning or "")
    return whole.content, whole.reasoning, [(c.name, c.arguments) for c in whole.tool_calls]


@pytest.mark.parametrize("cut_at, kept", [("<tool_call>\n<function=get_weather>\n<parameter=city>\nPar", ""),
                                          ("<tool_call>\n<function=get_we", ""), ("<tool_call>", ""),
                                          ("<tool_ca", ""), ("\n<tool_c", "\n"),
                                          ("<", "<")])  # (a lone "<" may be the text's: kept)
def test_a_reply_cut_inside_a_call_keeps_its_words_and_drops_the_markup(cut_at, kept):
    """A reply cut by max_tokens inside a call gave the call's markup as the reply's text, which
    agent clients showed (or sent back as the assistant's words). Cut, the unfinished call and a
    tag's start are dropped; the words before them stay, and a whole call before them too."""
    assert _cut("Sure, let me check." + cut_at) == ("Sure, let me check." + kept, None, [])
    done = _call("add", a=1, b=2)
    content, _, calls = _cut("Adding." + done + cut_at)
    assert calls == [("add", '{"a": 1, "b": 2}')] and content == "Adding." + (kept if kept.strip() else "")
    # not cut (an end-of-text token ended it): the unfinished markup is the reply's text, as before
    assert parse_reply("Sure." + cut_at, tools=TOOLS).content == "Sure." + cut_at


def test_a_reply_cut_elsewhere_is_unchanged():
    for text in ("Plain words cut mid wo", "<think>reasoning cut", "Text with a < sign and more"):
        assert _cut(text)[:2] == (parse_reply(text, tools=TOOLS).content, parse_reply(text, tools=TOOLS).reasoning)
    assert _cut("<think>weighing it</thi") == (None, "weighing it", [])  # the closing tag's start goes


def test_the_servers_chat_reply_cut_inside_a_call_streamed_and_whole():
    """The chat endpoint's reply builder (runtime/generation/replies.py), streamed and whole, for a
    reply that max_tokens cut inside a call: content without the markup, finish_reason length."""
    from runtime.generation.replies import ChatReply
    from runtime.generation.request import Step, Timings

    pieces = ["Let me ", "check.", "\n<tool_call>\n<function=get_", "weather>\n<parameter=city>\nPa"]
    steps = [Step(p, tokens=1) for p in pieces[:-1]] + [Step(pieces[-1], (), "length", 1)]
    streamed = ChatReply("m", 5, in_reasoning=False, tools=TOOLS)
    chunks = [c for s in steps for c in streamed.chunks(s, False)]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "Let me check." and not any(c["choices"][0]["delta"].get("tool_calls") for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    whole = ChatReply("m", 5, in_reasoning=False, tools=TOOLS)
    for s in steps:
        whole.collect(s)
    msg = whole.whole(Timings(), False)["choices"][0]
    assert msg["message"]["content"] == "Let me check." and "tool_calls" not in msg["message"]
    assert msg["finish_reason"] == "length"


def test_cut_replies_stream_as_they_parse_whole_and_keep_what_may_be_words():
    """(review 98) Cut at the start of a `<think>` after words, the stream dropped it and the
    whole parse kept it; a lone `<` or a closing newline was dropped though it may be the text's.
    Random markup, random pushes, with and without calls and tools, cut or not: the stream and
    the whole parse agree."""
    import random

    assert parse_reply("Write <think> then <th", tools=TOOLS, cut=True).content == "Write <think> then <th"
    assert parse_reply("I like <th", tools=TOOLS, calls=False, cut=True).content == "I like <th"
    assert parse_reply("if a <", tools=TOOLS, cut=True).content == "if a <"
    assert parse_reply("Line one\n", tools=TOOLS, cut=True).content == "Line one\n"
    assert parse_reply("<think>so x <", tools=TOOLS, cut=True).reasoning == "so x <"
    pieces = ["<think>", "</think>", "<tool_call>", "</tool_call>", "\n", " ", "x", "<function=add>", "<parameter=a>",
              "</parameter>", "</function>", '{"name": "add", "arguments": {}}', "1", "<", "<tool_c", "<th", "</thi",
              "<t", "\n\n", _call("add", a=1, b=2)]
    rng = random.Random(98)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 10)))
        kw = dict(in_reasoning=rng.random() < 0.3, tools=rng.choice([TOOLS, None]), calls=rng.random() < 0.85,
                  max_calls=rng.choice([None, None, 1]))
        cut = rng.random() < 0.7
        whole = parse_reply(text, cut=cut, **kw)
        stream, deltas, at = ReplyStream(**kw), [], 0
        for c in sorted(rng.sample(range(len(text) + 1), rng.randint(0, min(6, len(text))))) + [len(text)]:
            deltas += stream.push(text[at:c])
            at = c
        deltas += stream.finish(cut=cut)
        got = ("".join(d.get("content", "") for d in deltas) or None,
               "".join(d.get("reasoning_content", "") for d in deltas) or None,
               [(c["function"]["name"], c["function"]["arguments"]) for d in deltas for c in d.get("tool_calls", ())])
        assert got == (whole.content, whole.reasoning, [(c.name, c.arguments) for c in whole.tool_calls]), (text, kw, cut)
