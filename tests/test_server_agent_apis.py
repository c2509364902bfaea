"""The agent-facing APIs on a live `stepstream serve`: OpenAI's Responses API (POST
/v1/responses) through the official `openai` client, and Anthropic's Messages API (POST
/v1/messages, Claude Code's protocol) through the official `anthropic` client. Whole and
streamed replies (raw events, and each client's own accumulator), tool round trips, the stored
responses' routes, and refusals. The model is a copy of the shipped one scripted to write
reasoning, text and a tool call (tests/helpers/scripted_model.py); each answer is checked
against the chat completion of the same conversation on the same server, and against the
template's own rendering."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from runtime.loader import load  # noqa: E402
from runtime.text.tool_calls import forced_call  # noqa: E402
from tests.helpers.live_server import live_server  # noqa: E402
from tests.helpers.scripted_model import write_scripted_model  # noqa: E402

SHIPPED = Path(__file__).resolve().parent.parent / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
REASONING = "The user wants the weather in Oslo, so I call the tool."
CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
SCRIPT = f"<think>\n{REASONING}\n</think>\nLet me check.\n{CALL}"
AFTER = {forced_call("get_weather"): "<parameter=city>\nBergen\n</parameter>\n</function>\n</tool_call>",
         forced_call(None): "get_weather>\n<parameter=city>\nTromso\n</parameter>\n</function>\n</tool_call>"}
PARAMS = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}
FLAT = [{"type": "function", "name": "get_weather", "description": "The weather in a city.", "parameters": PARAMS}]
CHAT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                                "parameters": PARAMS}}]
SYSTEM = "You are a weather assistant."
QUESTION = "What is the weather in Oslo?"
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return write_scripted_model(SHIPPED, tmp_path_factory.mktemp("responses") / "m.gguf", SCRIPT, after=AFTER)


@pytest.fixture(scope="module")
def url(model_file):
    with live_server(model_file, "--alias", "m", "--ctx-size", "2048") as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)


def _ask(client, **kw):
    kw = {"model": "m", "instructions": SYSTEM, "input": QUESTION, "tools": FLAT, "temperature": 0,
          "max_output_tokens": 200, **kw}
    return client.responses.create(**kw)


def _parts(r):
    return [(o.type, o.content[0].text if o.type in ("reasoning", "message") else (o.name, json.loads(o.arguments)))
            for o in r.output]


def test_a_response_holds_the_chat_replys_parts_whole_and_streamed(client):
    chat = client.chat.completions.create(model="m", messages=MESSAGES, tools=CHAT_TOOLS, temperature=0,
                                          max_tokens=200)
    m = chat.choices[0].message
    want = [("reasoning", m.model_extra["reasoning_content"]), ("message", m.content),
            ("function_call", ("get_weather", json.loads(m.tool_calls[0].function.arguments)))]
    assert want == [("reasoning", REASONING), ("message", "Let me check."),
                    ("function_call", ("get_weather", {"city": "Oslo", "days": 3}))]
    r = _ask(client)
    assert r.status == "completed" and r.object == "response" and r.id.startswith("resp_") and r.error is None
    assert _parts(r) == want and r.output_text == "Let me check."
    assert r.output[2].call_id.startswith("call_") and all(o.status == "completed" for o in r.output)
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    # the reasoning's tokens: those the reply wrote before and with its </think> (the prompt opened <think>)
    local = load(SHIPPED)  # the scripted copy shares the tokenizer
    think = len(local.tokenize(SCRIPT[len("<think>\n"):SCRIPT.index("</think>") + len("</think>")], add_bos=False,
                               special=True))
    assert r.usage.output_tokens_details.reasoning_tokens == think
    assert [t.name for t in r.tools] == ["get_weather"] and r.instructions == SYSTEM and r.tool_choice == "auto"
    # streamed: the client's accumulator rebuilds the same output, and the raw events are in order
    with client.responses.stream(model="m", instructions=SYSTEM, input=QUESTION, tools=FLAT, temperature=0,
                                 max_output_tokens=200) as s:
        kinds = [e.type for e in s]
        final = s.get_final_response()
    assert _parts(final) == want and final.usage.output_tokens == r.usage.output_tokens
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert kinds.count("response.output_item.added") == kinds.count("response.output_item.done") == 3
    assert "response.reasoning_text.delta" in kinds and "response.function_call_arguments.done" in kinds
    events = list(_ask(client, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_tool_results_by_full_input_and_by_previous_response(client):
    first = _ask(client)
    call = first.output[2]
    output = {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"temp_c": 4})}
    full = _ask(client, input=[{"role": "user", "content": QUESTION}] + [o.model_dump(exclude_none=True)
                                                                        for o in first.output] + [output])
    chained = _ask(client, input=[output], previous_response_id=first.id)
    chat_call = {"id": call.call_id, "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}
    turn2 = MESSAGES + [{"role": "assistant", "content": "Let me check.", "reasoning_content": REASONING,
                         "tool_calls": [chat_call]},
                        {"role": "tool", "tool_call_id": call.call_id, "content": json.dumps({"temp_c": 4})}]
    chat = client.chat.completions.create(model="m", messages=turn2, tools=CHAT_TOOLS, temperature=0, max_tokens=1)
    assert full.usage.input_tokens == chained.usage.input_tokens == chat.usage.prompt_tokens
    text = load(SHIPPED).detokenize(load(SHIPPED).chat_tokens(turn2, tools=CHAT_TOOLS), special=True).decode()
    assert '<tool_response>{"temp_c": 4}</tool_response>' in text
    # the second turn starts with the first's prompt and reply: its prompt is reused from the cache
    assert full.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 1
    # what is stored: the response, and its own input items with ids, in either order
    assert client.responses.retrieve(chained.id).output_text == chained.output_text
    items = client.responses.input_items.list(chained.id).data
    assert [i.type for i in items] == ["function_call_output"] and items[0].id.startswith("fco_")
    page = client.responses.input_items.list(full.id, order="asc", limit=2)
    assert [i.type for i in page.data] == ["message", "reasoning"] and page.has_more
    ref = _ask(client, input=[{"type": "item_reference", "id": i.id} for i in
                              client.responses.input_items.list(full.id, order="asc", limit=20).data])
    assert ref.usage.input_tokens == full.usage.input_tokens


def test_tool_choice_limits_and_a_cut_reply(client):
    named = _ask(client, tool_choice={"type": "function", "name": "get_weather"})
    assert [p for p in _parts(named) if p[0] == "function_call"] == [("function_call", ("get_weather", {"city": "Bergen"}))]
    required = _ask(client, tool_choice="required")
    assert _parts(required)[-1] == ("function_call", ("get_weather", {"city": "Tromso"}))
    none = _ask(client, tool_choice="none")  # the markup is the message's text
    assert [o.type for o in none.output] == ["reasoning", "message"] and none.output_text.endswith(CALL)
    cut = _ask(client, max_output_tokens=12)  # (this vocabulary writes <think> in 5 tokens)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 12 and [(o.type, o.status) for o in cut.output] == [("reasoning", "incomplete")]
    assert REASONING.startswith(cut.output[0].content[0].text) and cut.output[0].content[0].text
    raw = httpx.post(str(client.base_url) + "responses", json={"model": "m", "input": QUESTION, "max_output_tokens": 12,
                                                                "stream": True}, timeout=60)
    names = [line[7:] for line in raw.text.splitlines() if line.startswith("event: ")]
    assert names[-1] == "response.incomplete" and "data: [DONE]" not in raw.text


def test_logprobs_are_the_chat_completions(client):
    chat = client.chat.completions.create(model="m", messages=MESSAGES, temperature=0, max_tokens=200, logprobs=True,
                                          top_logprobs=2)
    r = _ask(client, tools=None, include=["message.output_text.logprobs"], top_logprobs=2)
    part = r.output[1].content[0]
    assert r.output[1].type == "message" and part.text == chat.choices[0].message.content
    by_chat = [(t.token, t.logprob) for t in chat.choices[0].logprobs.content]
    ours = [(t.token, t.logprob) for t in part.logprobs]
    assert "".join(t for t, _ in ours) == part.text  # the content's tokens, in order
    assert ours == by_chat[len(by_chat) - len(ours):]  # the last tokens of the chat reply
    assert all(len(t.top_logprobs) == 2 for t in part.logprobs)


def test_refusals_and_the_stores_routes(client, url):
    for kw, status, param in [({"tools": [{"type": "web_search"}]}, 400, "tools[0]"),
                              ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, 400,
                               "input[0].call_id"),
                              ({"previous_response_id": "resp_nope"}, 404, "previous_response_id"),
                              ({"input": [{"type": "item_reference", "id": "msg_nope"}]}, 404, "input[0]"),
                              ({"background": True}, 400, "background")]:
        with pytest.raises(openai.APIStatusError) as e:
            _ask(client, **kw)
        assert e.value.status_code == status and e.value.body["param"] == param, (kw, e.value.body)
    kept = _ask(client, store=False, max_output_tokens=3)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)
    stored = _ask(client, max_output_tokens=3)
    # review 88: a limit that is not an integer was FastAPI's own 422; a streamed retrieve got JSON
    bad = httpx.get(f"{url}/v1/responses/{stored.id}/input_items?limit=abc", timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"
    with pytest.raises(openai.BadRequestError):
        client.responses.retrieve(stored.id, stream=True)
    client.responses.delete(stored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(stored.id)
    # the routes answer OpenAI's errors for other methods and paths too
    assert httpx.get(url + "/v1/responses", timeout=10).status_code in (404, 405)


def test_structured_output_through_the_clients_parse(client):
    """`responses.parse(text_format=Model)` sends `text.format` json_schema: the scripted model,
    whose script is not JSON, is held to the schema and the client reads the model back."""
    pydantic = pytest.importorskip("pydantic")
    from typing import Literal

    class Answer(pydantic.BaseModel):
        verdict: Literal["rain", "sun"]
        days: int = pydantic.Field(ge=1, le=7)

    r = client.responses.parse(model="m", input=QUESTION, text_format=Answer, temperature=0, max_output_tokens=100)
    assert r.status == "completed" and isinstance(r.output_parsed, Answer)
    assert Answer.model_validate_json(r.output_text) == r.output_parsed
    with client.responses.stream(model="m", input=QUESTION, text_format=Answer, temperature=0,
                                 max_output_tokens=100) as s:
        assert s.get_final_response().output_parsed == r.output_parsed


@pytest.mark.parametrize("api", ["responses", "messages"])
def test_the_agent_example_runs_its_tool_over_the_agent_apis(url, api):
    """examples/agent_tool_loop.py --api responses / messages: the scripted model's call, held by
    the grammar to the one tool the example offers, runs the tool each round; each round sends the
    tool's result back (with the previous response's id, or in the conversation), until the
    rounds run out."""
    import subprocess
    import sys

    if api == "messages":
        pytest.importorskip("anthropic")
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "examples" / "agent_tool_loop.py"), "--api", api,
                        "--steps", "2", "--base-url", url + "/v1", "How many lines?"],
                       capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0, r.stderr
    assert [line.split("(")[0] for line in r.stdout.splitlines()] == ["[tool] count_lines", "[tool] count_lines", ""]
    assert r.stdout.endswith("(no answer after 2 tool rounds)\n")


# ------------------------------------------------------------------ Anthropic's Messages API

ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "The weather in a city.", "input_schema": PARAMS}]


@pytest.fixture(scope="module")
def claude(url):
    anthropic = pytest.importorskip("anthropic")
    return anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=60)


def _message(claude, **kw):
    kw = {"model": "claude-anything", "max_tokens": 200, "system": SYSTEM, "tools": ANTHROPIC_TOOLS,
          "messages": [{"role": "user", "content": QUESTION}], **kw}
    return claude.messages.create(**kw)


def _blocks(m):
    return [(b.type, b.thinking if b.type == "thinking" else b.text if b.type == "text" else (b.name, b.input))
            for b in m.content]


def test_a_message_holds_the_chat_replys_parts_whole_and_streamed(client, claude):
    chat = client.chat.completions.create(model="m", messages=MESSAGES, tools=CHAT_TOOLS, temperature=0,
                                          max_tokens=200)
    plain = _message(claude)  # thinking not enabled: no thinking blocks, as Anthropic answers
    assert _blocks(plain) == [("text", "Let me check."), ("tool_use", ("get_weather", {"city": "Oslo", "days": 3}))]
    assert plain.stop_reason == "tool_use" and plain.content[1].id.startswith("toolu_")
    assert plain.usage.input_tokens + plain.usage.cache_read_input_tokens == chat.usage.prompt_tokens
    assert plain.usage.output_tokens == chat.usage.completion_tokens and plain.model == "m"
    thinking = _message(claude, thinking={"type": "enabled", "budget_tokens": 1024})
    assert _blocks(thinking) == [("thinking", REASONING)] + _blocks(plain)
    assert 0 < thinking.usage.output_tokens_details.thinking_tokens < thinking.usage.output_tokens
    omitted = _message(claude, thinking={"type": "adaptive", "display": "omitted"})
    assert _blocks(omitted)[0] == ("thinking", "")
    with claude.messages.stream(model="m", max_tokens=200, system=SYSTEM, tools=ANTHROPIC_TOOLS,
                                messages=[{"role": "user", "content": QUESTION}],
                                thinking={"type": "enabled", "budget_tokens": 1024}) as s:
        kinds = [e.type for e in s]
        final = s.get_final_message()
    assert _blocks(final) == _blocks(thinking) and final.stop_reason == "tool_use"
    assert final.usage.output_tokens == thinking.usage.output_tokens
    assert final.usage.cache_read_input_tokens >= thinking.usage.input_tokens - 1  # the same prompt again
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 3


def test_a_tool_round_trip_renders_the_chat_conversation(client, claude):
    first = _message(claude, thinking={"type": "enabled", "budget_tokens": 1024})
    use = first.content[-1]
    second = _message(claude, max_tokens=1, messages=[
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": [{"type": "text", "text": json.dumps({"temp_c": 4})}]}]}])
    turn2 = MESSAGES + [{"role": "assistant", "content": "Let me check.", "reasoning_content": REASONING,
                         "tool_calls": [{"id": use.id, "type": "function", "function": {
                             "name": "get_weather", "arguments": json.dumps(use.input)}}]},
                        {"role": "tool", "tool_call_id": use.id, "content": json.dumps({"temp_c": 4})}]
    chat = client.chat.completions.create(model="m", messages=turn2, tools=CHAT_TOOLS, temperature=0, max_tokens=1)
    assert second.usage.input_tokens + second.usage.cache_read_input_tokens == chat.usage.prompt_tokens
    assert claude.messages.count_tokens(model="m", system=SYSTEM, tools=ANTHROPIC_TOOLS, messages=[
        {"role": "user", "content": QUESTION}]).input_tokens == first.usage.input_tokens + \
        first.usage.cache_read_input_tokens


def test_anthropic_limits_stops_and_refusals(claude, url):
    anthropic = pytest.importorskip("anthropic")
    named = _message(claude, tool_choice={"type": "tool", "name": "get_weather"})
    assert _blocks(named)[-1] == ("tool_use", ("get_weather", {"city": "Bergen"}))
    cut = _message(claude, max_tokens=20)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 20
    stopped = _message(claude, stop_sequences=["check"])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "check"
    assert _blocks(stopped) == [("text", "Let me ")]
    for kw, words in [({"messages": [{"role": "user", "content": [{"type": "image", "source": {
                          "type": "url", "url": "http://example.com/a.png"}}]}]}, '"image" block'),
                      ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tool"),
                      ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x",
                                                                   "content": "4"}]}]}, "no tool_use block"),
                      ({"max_tokens": 0}, "max_tokens")]:
        with pytest.raises(anthropic.BadRequestError) as e:
            _message(claude, **kw)
        assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
        assert words in e.value.body["error"]["message"], e.value.body
    # a prompt over the context is refused in the words Claude Code parses to compact its conversation
    # (Anthropic's "prompt is too long: N tokens > M maximum"); count_tokens counts it all the same
    long = [{"role": "user", "content": "word " * 3000}]
    with pytest.raises(anthropic.BadRequestError) as e:
        _message(claude, messages=long)
    n = int(re.match(r"prompt is too long[^0-9]*(\d+)\s*tokens?\s*>\s*2048\b", e.value.body["error"]["message"])[1])
    assert n > 2048 and claude.messages.count_tokens(model="m", system=SYSTEM, tools=ANTHROPIC_TOOLS,
                                                     messages=long).input_tokens >= n
    # a reply that reaches the context's end before max_tokens (Claude Code asks for 32,000) ends
    # with Anthropic's model_context_window_exceeded, not max_tokens

    def count(k: int) -> int:
        return claude.messages.count_tokens(model="m", system=SYSTEM, tools=ANTHROPIC_TOOLS, messages=[
            {"role": "user", "content": QUESTION + " word" * k}]).input_tokens

    base, per = count(0), (count(100) - count(0)) / 100
    k = int((2048 - 30 - base) / per)
    left = 2048 - count(k)
    assert 0 < left < 60
    cut = _message(claude, max_tokens=32000, messages=[{"role": "user", "content": QUESTION + " word" * k}])
    assert cut.stop_reason == "model_context_window_exceeded" and cut.usage.output_tokens == left + 1
    # the key goes as x-api-key (Anthropic's clients) or as a Bearer token
    assert httpx.post(url + "/v1/messages", json={"max_tokens": 1, "messages": [{"role": "user", "content": "a"}]},
                      timeout=60).status_code == 200


def test_a_stream_waiting_for_its_turn_sends_pings(model_file, monkeypatch):
    """Review 89: nothing was sent between message_start and the first token, so a long prompt's
    evaluation (or a wait in the queue) ran into Claude Code's stream idle timeout. In process: the
    worker starts only after two pings came, then the reply streams as usual."""
    from fastapi.testclient import TestClient

    from runtime.server import app as app_module
    from runtime.server.engine import Engine

    monkeypatch.setattr(app_module, "PING_S", 0.05)
    engine = Engine(load(model_file, n_ctx=1024))
    app = app_module.create_app(engine, model_name="m")
    events = []
    try:
        with TestClient(app) as http, http.stream("POST", "/v1/messages", json={
                "max_tokens": 200, "stream": True, "system": SYSTEM, "tools": ANTHROPIC_TOOLS,
                "messages": [{"role": "user", "content": QUESTION}]}) as r:
            for line in r.iter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
                    if events.count("ping") == 2:
                        engine.start()
    finally:
        engine.close()
    assert events[:3] == ["message_start", "ping", "ping"] and events[-1] == "message_stop"
    assert events.count("content_block_start") == 2  # the text and the call (thinking not enabled)


def test_claude_codes_billing_header_and_system_messages(client, claude):
    """Review 89: Claude Code's first system block carries a nonce per request, which made every
    prompt new (nothing reused from the cache); it is dropped. A system message among the
    messages (the client's type has one; Claude Code sends them) is a system message there."""
    def ask(nonce: str):
        return claude.messages.create(model="m", max_tokens=5, tools=ANTHROPIC_TOOLS, messages=[
            {"role": "user", "content": QUESTION}], system=[
            {"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1.45; cc_entrypoint=cli; cch={nonce};"},
            {"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}])

    first, second = ask("0a1b2"), ask("9f8e7")
    total = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert second.usage.cache_read_input_tokens >= total - 1
    plain = _message(claude, max_tokens=5)
    assert plain.usage.input_tokens + plain.usage.cache_read_input_tokens == total  # the header is not in the prompt
    mid = _message(claude, max_tokens=1, messages=[{"role": "user", "content": QUESTION},
                                                   {"role": "system", "content": "Answer in Norwegian."}])
    chat = client.chat.completions.create(model="m", tools=CHAT_TOOLS, max_tokens=1, messages=MESSAGES + [
        {"role": "system", "content": "Answer in Norwegian."}])
    assert mid.usage.input_tokens + mid.usage.cache_read_input_tokens == chat.usage.prompt_tokens


def test_a_background_request_between_turns_does_not_cost_the_next_turn_its_prompt(client, claude):
    """Claude Code sends small requests of its own between a conversation's turns (a title, a
    summary), with another system prompt: the server's one KV cache then held that request, and
    the next turn evaluated its whole prompt again. The prompt cache keeps the conversation's."""
    system = SYSTEM + " " + " ".join(f"Rule {i}: answer about the weather only." for i in range(60))
    first = _message(claude, system=system)
    claude.messages.create(model="claude-haiku", max_tokens=5, system="Write a title for this conversation.",
                           messages=[{"role": "user", "content": QUESTION + " " + "word " * 300}])
    second = _message(claude, system=system, max_tokens=1, messages=[
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": first.content[-1].id, "content": "4 C"}]}])
    prompt = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert prompt > 600 and second.usage.cache_read_input_tokens >= prompt - 1
