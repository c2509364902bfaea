"""Anthropic's Messages API without a server: request bodies, messages as chat messages, and the
content blocks and events built from a reply's steps. The references are the chat reply parser
(parse_reply), hand-written chat messages, and the `anthropic` client's own stream accumulator."""

from __future__ import annotations

import json
import random
import re

import pytest

from runtime.generation.message_events import MessageReply
from runtime.generation.request import Step, Timings
from runtime.server.messages_api import AnthropicError, messages_body, to_messages
from runtime.server.requests import ApiError
from runtime.text.tool_calls import parse_reply

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"a": {"type": "string"}, "n": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "g"}}]
PIECES = ["<think>", "</think>", "<tool_call>", "</tool_call>", "\n", "\n", " ", "x", "yz", "<function=f>",
          "<parameter=a>", "</parameter>", "</function>", '{"name": "g", "arguments": {}}', "1", "<", "<tool_c", "é"]


def _feed(text: str, cuts, finish="stop", stop=None, thinking="shown"):
    reply = MessageReply("msg_1", "m", 10, Timings(prompt_n=7, cached_n=3, predicted_n=11), in_reasoning=False,
                         tools=TOOLS, thinking=thinking)
    events, at = reply.start(), 0
    bounds = list(cuts) + [len(text)]
    for i, cut in enumerate(bounds):
        last = i == len(bounds) - 1
        events += reply.feed(Step(text[at:cut], (), finish if last else None, 1, stop if last else None))
        at = cut
    return reply, events


def _accumulated(events: list[dict]) -> dict:
    """The message the `anthropic` client's stream accumulator builds from the events."""
    pytest.importorskip("anthropic")
    from anthropic.lib.streaming._messages import accumulate_event

    snapshot, bufs = None, {}
    for e in events:
        snapshot = accumulate_event(event=e, current_snapshot=snapshot, json_bufs=bufs)
    return snapshot.model_dump(exclude_none=True)


def _strip(content):
    return [{k: v for k, v in b.items() if k != "id"} for b in content]


@pytest.mark.parametrize("seed", range(4))
def test_blocks_hold_the_chat_replys_parts_and_streams_rebuild_them(seed):
    rng = random.Random(seed)
    for _ in range(60):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 20)))
        finish = rng.choice(["stop", "length"])
        p = parse_reply(text, tools=TOOLS, cut=finish == "length")  # (cut: an unfinished call's markup dropped)
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(1, min(6, len(text) + 1))))
        reply, events = _feed(text, cuts, finish)
        m = reply.message()
        content = m["content"]
        assert "".join(b["text"] for b in content if b["type"] == "text") == (p.content or "")
        assert "".join(b["thinking"] for b in content if b["type"] == "thinking") == (p.reasoning or "")
        assert [(b["name"], b["input"]) for b in content if b["type"] == "tool_use"] == \
            [(c.name, json.loads(c.arguments)) for c in p.tool_calls]
        assert m["stop_reason"] == ("max_tokens" if events[-2]["delta"]["stop_reason"] == "max_tokens" else
                                    "tool_use" if p.tool_calls else "end_turn")
        got = _accumulated(events)
        assert _strip(got["content"]) == _strip([{k: v for k, v in b.items()} for b in content])
        assert [b["id"] for b in got["content"] if b["type"] == "tool_use"] == \
            [b["id"] for b in content if b["type"] == "tool_use"]
        assert got["stop_reason"] == m["stop_reason"] and got["usage"]["output_tokens"] == 11
        assert [e["index"] for e in events if e["type"] == "content_block_start"] == list(range(len(content)))


def test_thinking_hidden_or_omitted_and_the_stop_reasons():
    text = "<think>\nwhy\n</think>\nSo <tool_call>\n<function=g>\n</function>\n</tool_call>"
    hidden = MessageReply("m", "m", 1, Timings(), in_reasoning=False, tools=TOOLS, thinking="hidden")
    events = hidden.start() + hidden.feed(Step(text, (), "stop", 5))
    assert [b["type"] for b in hidden.message()["content"]] == ["text", "tool_use"]
    assert _strip(_accumulated(events)["content"]) == _strip(hidden.message()["content"])
    omitted, events = _feed(text, [5], thinking="omitted")
    assert omitted.message()["content"][0] == {"type": "thinking", "thinking": "", "signature": ""}
    stopped, _ = _feed("Hello", [], stop="lo")
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "lo")
    usage = stopped.message()["usage"]
    assert usage["input_tokens"] == 7 and usage["cache_read_input_tokens"] == 3  # of the prompt's 10
    assert _feed("Hello", [])[0].stop_reason == "end_turn"


def test_claude_codes_conversation_becomes_the_chat_messages():
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Fix the bug.", "cache_control": {"type": "ephemeral"}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Read it first.", "signature": "sig"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "text", "text": "Reading."},
            {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"path": "a.py"}},
            {"type": "tool_use", "id": "toolu_2", "name": "Read", "input": {"path": "b.py"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "x = 1"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "no"}],
             "is_error": True},
            {"type": "text", "text": "Go on."}]},
        {"role": "assistant", "content": "Done"},
    ]
    assert to_messages(messages, [{"type": "text", "text": "You code."}]) == [
        {"role": "system", "content": "You code."},
        {"role": "user", "content": "Fix the bug."},
        {"role": "assistant", "content": "Reading.", "reasoning_content": "Read it first.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "Read", "arguments": '{"path": "a.py"}'}},
            {"id": "toolu_2", "type": "function", "function": {"name": "Read", "arguments": '{"path": "b.py"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "x = 1"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no"},
        {"role": "user", "content": "Go on."},
        {"role": "assistant", "content": "Done"},
    ]
    # tool results alone are the tool's turn: no empty user message after them
    only = to_messages(messages[:2] + [{"role": "user", "content": messages[2]["content"][:1]}], None)
    assert [m["role"] for m in only] == ["user", "assistant", "tool"]


TOOL = {"name": "f", "input_schema": {"type": "object", "properties": {}}}
BASE = {"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("change, words", [
    ({"max_tokens": None}, "'max_tokens' is required"),
    ({"max_tokens": 0}, "at least 1"),
    ({"messages": []}, "at least one message"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "role user, assistant or system"),
    # review 89: a list as tool_use_id was a 500; names past Anthropic's 128 characters
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": ["t"], "content": "x"}]}]},
     "no tool_use block"),
    ({"tools": [{"name": "m" * 129, "input_schema": {"type": "object"}}]}, "tools.0.name must be 1 to 128"),
    ({"max_tokens": 0}, "warming the cache"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, '"document" block'),
    ({"messages": [{"role": "user", "content": [{"type": "thinking", "thinking": "x"}]}]}, "not a well-formed"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": 1, "name": "f", "input": {}}]}]},
     "string 'id'"),
    ({"system": [{"type": "image"}]}, "system[0] must be a text block"),
    ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "server tool"),
    ({"tools": [{"name": "f"}]}, "input_schema"),
    ({"tools": [TOOL], "tool_choice": {"type": "tool", "name": "h"}}, "'h'"),
    ({"tool_choice": {"type": "sometimes"}}, "tool_choice must be"),
    ({"temperature": 1.5}, "[0, 1]"),
    ({"stop_sequences": ["a", 1]}, "stop_sequences"),
    ({"thinking": {"type": "enabled"}}, "budget_tokens"),
    ({"output_config": {"format": {"type": "yaml"}}}, "output_config.format"),
    ({"tools": [TOOL], "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}},
     "goes without tools"),
    ({"mcp_servers": [{"url": "x"}]}, "MCP"),
])
def test_bodies_the_server_refuses_are_named(change, words):
    body = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(ApiError) as e:
        messages_body(body)
    err = AnthropicError.of(e.value)
    assert err.status == 400 and words in err.message, err.message
    assert err.body() == {"type": "error", "error": {"type": "invalid_request_error", "message": err.message}}


def test_a_body_in_the_chat_endpoints_terms():
    b = messages_body({**BASE, "system": "Be brief.", "tools": [TOOL], "stop_sequences": ["END"], "top_k": 5,
                       "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
                       "thinking": {"type": "enabled", "budget_tokens": 2048}})
    assert b.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert b.tools == [{"type": "function", "function": {"name": "f", "parameters": TOOL["input_schema"]}}]
    assert b.tool_choice == "required" and b.max_calls == 1 and b.thinking == "shown"
    assert b.common.stop == ("END",) and b.common.max_tokens == 10 and b.common.params.top_k == 5
    assert messages_body(BASE).thinking == "hidden" and messages_body(BASE, count_only=True).common.max_tokens == 10
    assert messages_body({"messages": BASE["messages"]}, count_only=True).common.max_tokens is None
    fmt = messages_body({**BASE, "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}})
    assert fmt.common.grammar is not None
    # Anthropic's wording, which Claude Code parses to compact (review 89: "N tokens > M" was missing)
    too_long = AnthropicError.of(ApiError(400, "the prompt is 9 tokens", code="context_length_exceeded",
                                          detail={"tokens": 9, "limit": 8}))
    assert re.match(r"prompt is too long[^0-9]*(\d+)\s*tokens?\s*>\s*(\d+)", too_long.message).groups() == ("9", "8")
    busy = AnthropicError.of(ApiError(503, "busy"))
    assert busy.status == 529 and busy.body()["error"]["type"] == "overloaded_error"
    long_name = "mcp__claude_ai_Atlassian_workspace__getConfluencePageDescendantsWithChildrenAndAttachments"
    assert messages_body({**BASE, "tools": [{**TOOL, "name": long_name}]}).tools[0]["function"]["name"] == long_name
    assert messages_body({**BASE, "thinking": {"type": "between_tools"}}).thinking == "shown"


def test_claude_codes_system_blocks_mid_conversation_system_and_combined_turns():
    """Review 89: Claude Code's billing header (a nonce per request) in the first system block
    made every prompt new; a system message among the messages was refused; consecutive messages
    of one role are combined, as Anthropic combines them."""
    system = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1; cch=1a2b;"},
              {"type": "text", "text": "You are Claude Code."}]
    assert to_messages([{"role": "user", "content": "hi"}], system)[0] == {"role": "system",
                                                                           "content": "You are Claude Code."}
    got = to_messages([{"role": "user", "content": "First"}, {"role": "user", "content": [
        {"type": "text", "text": "<system-reminder>r</system-reminder>"}, {"type": "text", "text": "Second"}]},
        {"role": "system", "content": "Be concise."},
        {"role": "assistant", "content": "Reading."},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Read", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "x"},
                                     {"type": "text", "text": ""}]}], None)
    assert got == [
        {"role": "user", "content": [{"type": "text", "text": "First"},
                                     {"type": "text", "text": "<system-reminder>r</system-reminder>"},
                                     {"type": "text", "text": "Second"}]},
        {"role": "system", "content": "Be concise."},
        {"role": "assistant", "content": "Reading.", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "Read", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "x"}]
