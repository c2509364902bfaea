"""Tool calls and reasoning through a live `stepstream serve`, both directions, with the official
`openai` client. The model is a copy of the shipped one whose weights make greedy decoding write
a chosen reply (tests/helpers/scripted_model.py), so the reply's markup is known and the
expected OpenAI parts are written out here by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from runtime.loader import load  # noqa: E402
from runtime.text.tool_calls import forced_call  # noqa: E402
from tests.helpers.live_server import live_server  # noqa: E402
from tests.helpers.scripted_model import write_scripted_model  # noqa: E402

SHIPPED = Path(__file__).resolve().parent.parent / "runtime" / "data" / "step35-mini-q4_k_m.gguf"

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
REASONING = "The user wants the weather in Oslo, so I call the tool."
CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
REPLIES = {
    # reasoning, then a call in the template's own markup; after a forced call's opening (tool_choice)
    # the model writes the rest of a call
    "think_call": (f"<think>\n{REASONING}\n</think>\n\n{CALL}",
                   {forced_call("get_weather"): "<parameter=city>\nBergen\n</parameter>\n</function>\n</tool_call>",
                    forced_call(None): "get_weather>\n<parameter=city>\nTromso\n</parameter>\n</function>\n</tool_call>"}),
    "two_json_calls": ('Checking both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
                       '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Nice", "days": 2}}\n</tool_call>', {}),
    "malformed": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', {}),
}
USER = [{"role": "system", "content": "You are a weather assistant."},
        {"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripted-serve")
    return {name: write_scripted_model(SHIPPED, root / f"{name}.gguf", text, after=after)
            for name, (text, after) in REPLIES.items()}


@pytest.fixture(scope="module", params=list(REPLIES))
def served(request, files):
    with live_server(files[request.param], "--alias", "m") as url:
        yield request.param, openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)


def _ask(client, messages=USER, stream=False, **kw):
    return client.chat.completions.create(model="m", messages=messages, tools=TOOLS, temperature=0, max_tokens=200,
                                          stream=stream, **kw)


def _join_stream(chunks):
    """The parts a streaming client assembles from the deltas."""
    content, reasoning, calls, finish = "", "", {}, None
    for c in chunks:
        if not c.choices:
            continue
        d = c.choices[0].delta
        content += d.content or ""
        reasoning += getattr(d, "reasoning_content", None) or (d.model_extra or {}).get("reasoning_content") or ""
        for t in d.tool_calls or []:
            slot = calls.setdefault(t.index, {"id": None, "name": "", "arguments": ""})
            slot["id"] = t.id or slot["id"]
            slot["name"] += t.function.name or ""
            slot["arguments"] += t.function.arguments or ""
        finish = c.choices[0].finish_reason or finish
    return content, reasoning, [calls[i] for i in sorted(calls)], finish


EXPECTED = {  # content, reasoning, [(name, arguments)], finish_reason
    "think_call": (None, REASONING, [("get_weather", {"city": "Oslo", "days": 3})], "tool_calls"),
    "two_json_calls": ("Checking both.", None, [("get_weather", {"city": "Rome"}),
                                                ("get_weather", {"city": "Nice", "days": 2})], "tool_calls"),
    # under tool_choice "auto" a call the reply opens must be finished (runtime.text.tool_grammar):
    # a model that stops inside one is kept writing its string until max_tokens, and the cut call's
    # markup is dropped (it came back as the reply's text, which clients showed and sent back as
    # the assistant's words): no content, no call, finish_reason "length"
    "malformed": ("", None, [], "length"),
}


def _content_is(got: str | None, want: str | None, name: str) -> bool:
    return got == want


def test_reply_parts_whole_and_streamed(served):
    name, client = served
    content, reasoning, calls, finish = EXPECTED[name]
    r = _ask(client)
    m = r.choices[0].message
    assert _content_is(m.content, content if content is not None or calls else "", name)
    assert (m.model_extra or {}).get("reasoning_content") == reasoning
    assert [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls or []] == calls
    assert all(c.id.startswith("call_") and c.type == "function" for c in m.tool_calls or [])
    assert r.choices[0].finish_reason == finish
    s_content, s_reasoning, s_calls, s_finish = _join_stream(_ask(client, stream=True))
    assert _content_is(s_content, content or "", name) and s_reasoning == (reasoning or "")
    assert [(c["name"], json.loads(c["arguments"])) for c in s_calls] == calls and s_finish == finish


def test_tool_results_go_back_through_the_template(served, files):
    """The assistant's calls and the tool's results are rendered into the next prompt, which
    starts with the previous prompt and reply (so the cache is reused)."""
    name, client = served
    if not EXPECTED[name][2]:
        pytest.skip("no call to answer")
    first = _ask(client)
    m = first.choices[0].message
    turn2 = USER + [m.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": json.dumps({"temp_c": 4 + i})}
        for i, c in enumerate(m.tool_calls)]
    second = _ask(client, turn2)
    local = load(files[name])
    want = local.chat_tokens([{k: v for k, v in msg.items()} for msg in turn2], tools=TOOLS)
    assert second.usage.prompt_tokens == len(want)
    text = local.detokenize(want, special=True).decode()
    for i, c in enumerate(m.tool_calls):
        assert f"<tool_response>{json.dumps({'temp_c': 4 + i})}</tool_response>" in text
        assert f"<function={c.function.name}>" in text
    # at least up to the ring checkpoint, which sits before the first prompt's last token (this
    # script writes "\n\n" after </think>, where the template renders one "\n": the reply differs)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1


def test_tool_choice(served):
    name, client = served
    if name != "think_call":
        pytest.skip("one model is enough")
    named = _ask(client, tool_choice={"type": "function", "function": {"name": "get_weather"}}).choices[0]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in named.message.tool_calls] == \
        [("get_weather", {"city": "Bergen"})] and named.finish_reason == "tool_calls"
    required = _ask(client, tool_choice="required").choices[0]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in required.message.tool_calls] == \
        [("get_weather", {"city": "Tromso"})]
    streamed = _join_stream(_ask(client, stream=True, tool_choice="required"))
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed[2]] == [("get_weather", {"city": "Tromso"})]
    # "none": no call is parsed out of the reply; the model still wrote its markup, which comes
    # back as content. The template still shows the tools, as llama-server and vLLM render them
    # (the prompt is the one "auto" gets, longer than one without tools)
    r = _ask(client, tool_choice="none")
    none = r.choices[0]
    assert none.finish_reason == "stop" and not none.message.tool_calls
    bare = client.chat.completions.create(model="m", messages=USER, temperature=0, max_tokens=1)
    auto = client.chat.completions.create(model="m", messages=USER, tools=TOOLS, temperature=0, max_tokens=1)
    assert r.usage.prompt_tokens == auto.usage.prompt_tokens > bare.usage.prompt_tokens
    # (one "\n" after </think> is layout; the second, before the markup, is text here)
    assert none.message.content == "\n" + CALL and none.message.model_extra["reasoning_content"] == REASONING
    with pytest.raises(openai.BadRequestError):
        _ask(client, tool_choice={"type": "function", "function": {"name": "nope"}})
    # a call to a function the request did not offer cannot be written: the grammar of "auto",
    # as llama-server's, allows only the offered names, so the model's get_weather call becomes
    # one of get_time, with get_time's (absent) parameters (the parser reads a call to another
    # function as text: tests/test_tool_calls_review.py). The scripted model, off its script,
    # goes on calling until max_tokens.
    other = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    for stream in (False, True):
        r = client.chat.completions.create(model="m", messages=USER, tools=other, temperature=0, max_tokens=200,
                                           stream=stream)
        content, reasoning, calls, finish = _join_stream(r) if stream else (
            r.choices[0].message.content, r.choices[0].message.model_extra["reasoning_content"],
            r.choices[0].message.tool_calls or [], r.choices[0].finish_reason)
        names = [c["name"] if stream else c.function.name for c in calls]
        arguments = [c["arguments"] if stream else c.function.arguments for c in calls]
        assert reasoning == REASONING and names and set(names) == {"get_time"} and set(arguments) == {"{}"}
        assert "get_weather" not in (content or "")


def test_each_of_n_choices_ends_at_its_own_first_call(served):
    """With `n`, each choice's reply is read by a watcher of its own: one shared would have seen
    the first choice's call and ended the second at its first piece."""
    name, client = served
    if name != "two_json_calls":
        pytest.skip("one model with two calls is enough")
    r = _ask(client, parallel_tool_calls=False, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        assert c.message.content == "Checking both." and c.finish_reason == "tool_calls"
        assert [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls] == \
            [("get_weather", {"city": "Rome"})]


def test_parallel_tool_calls_false_ends_the_reply_at_its_first_call(served, files):
    """`parallel_tool_calls: false` was accepted and ignored: a reply with two calls returned both
    (OpenAI then returns at most one, as llama-server does)."""
    name, client = served
    if name != "two_json_calls":
        pytest.skip("one model with two calls is enough")
    one = _ask(client, parallel_tool_calls=False).choices[0]
    assert one.message.content == "Checking both." and one.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in one.message.tool_calls] == \
        [("get_weather", {"city": "Rome"})]
    streamed = _join_stream(_ask(client, stream=True, parallel_tool_calls=False))
    assert streamed[0] == "Checking both." and streamed[3] == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed[2]] == [("get_weather", {"city": "Rome"})]
    both = _ask(client, parallel_tool_calls=True)  # the default
    assert len(both.choices[0].message.tool_calls) == 2
    # and the generation ends there: it went on to the end of the reply, and the client waited
    # for it (a review counted 88 tokens where the call ended at the 59th)
    text = REPLIES[name][0]
    first = text[: text.index("</tool_call>") + len("</tool_call>")]
    want = len(load(files[name]).tokenize(first, add_bos=False, special=True))
    for stream in (False, True):
        r = _ask(client, stream=stream, parallel_tool_calls=False,
                 **({"stream_options": {"include_usage": True}} if stream else {}))
        usage = r.usage if not stream else [c for c in r if c.usage][-1].usage
        assert usage.completion_tokens == want < both.usage.completion_tokens, (usage, want)


def test_ignore_eos_generates_on_past_the_end_of_text(served):
    """vLLM's and llama-server's `ignore_eos` (their benchmark clients send it) was accepted and
    ignored. The scripted model's text ends with an end-of-text token, and every token after it
    is another: the reply's text stays the script's, and max_tokens tokens are generated."""
    name, client = served
    if name != "malformed":
        pytest.skip("one model without calls is enough")
    plain = client.chat.completions.create(model="m", messages=USER, temperature=0, max_tokens=200)
    n = plain.usage.completion_tokens
    plain = plain.choices[0]
    for stream in (False, True):
        r = client.chat.completions.create(model="m", messages=USER, temperature=0, max_tokens=n + 7,
                                           stream=stream, extra_body={"ignore_eos": True},
                                           **({"stream_options": {"include_usage": True}} if stream else {}))
        if stream:
            chunks = list(r)
            content, _, _, finish = _join_stream(chunks)
            usage = chunks[-1].usage
        else:
            content, finish, usage = r.choices[0].message.content, r.choices[0].finish_reason, r.usage
        assert (content, finish, usage.completion_tokens) == (plain.message.content, "length", n + 7)


def _join_api_stream(chunks):
    """_join_stream for the Python API's chunks (dicts)."""
    content, reasoning, calls, finish = "", "", {}, None
    for c in chunks:
        d = c["choices"][0]["delta"]
        content += d.get("content") or ""
        reasoning += d.get("reasoning_content") or ""
        for t in d.get("tool_calls") or []:
            slot = calls.setdefault(t["index"], {"name": "", "arguments": ""})
            slot["name"] += t["function"].get("name") or ""
            slot["arguments"] += t["function"].get("arguments") or ""
        finish = c["choices"][0]["finish_reason"] or finish
    return content, reasoning, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("name", list(REPLIES))
def test_the_python_api_parses_replies_as_the_server_does(files, name):
    """Model.create_chat_completion(tools=...) gave the raw markup as content, and refused `tools`."""
    content, reasoning, calls, finish = EXPECTED[name]
    m = load(files[name])
    r = m.create_chat_completion(USER, tools=TOOLS, temperature=0, max_tokens=200)
    msg = r["choices"][0]["message"]
    assert _content_is(msg["content"], content if content is not None or calls else "", name)
    assert msg.get("reasoning_content") == reasoning
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg.get("tool_calls", [])] == calls
    assert r["choices"][0]["finish_reason"] == finish
    s_content, s_reasoning, s_calls, s_finish = _join_api_stream(
        m.create_chat_completion(USER, tools=TOOLS, temperature=0, max_tokens=200, stream=True))
    assert _content_is(s_content, content or "", name) and s_reasoning == (reasoning or "")
    assert [(c["name"], json.loads(c["arguments"])) for c in s_calls] == calls and s_finish == finish
    if name == "think_call":  # tool_choice as the server takes it
        named = m.create_chat_completion(USER, tools=TOOLS, temperature=0, max_tokens=200,
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                for c in named["choices"][0]["message"]["tool_calls"]] == [("get_weather", {"city": "Bergen"})]
        none = m.create_chat_completion(USER, tools=TOOLS, temperature=0, max_tokens=200, tool_choice="none")
        assert "tool_calls" not in none["choices"][0]["message"]
