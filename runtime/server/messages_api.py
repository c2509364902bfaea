"""The body of POST /v1/messages (Anthropic's Messages API, what Claude Code and the `anthropic`
client send), checked field by field, in the chat endpoint's terms.

    system                       the system message (a string or text blocks)
    messages[].content blocks    text; an assistant's `thinking` (its reasoning) and `tool_use`
                                 (its calls); a user's `tool_result` (a "tool" message each,
                                 before the user's text)
    tools, tool_choice           chat tools (`input_schema` is the parameters); auto, any
                                 (required), tool (a named function), none;
                                 `disable_parallel_tool_use` ends the reply at its first call
    output_config.format         structured output (a JSON schema), as `response_format`
    thinking.budget_tokens,      the reply's reasoning bounded (runtime.generation.reasoning_budget)
    output_config.effort
    max_tokens, stop_sequences, temperature, top_p, top_k

A last assistant message is continued (Anthropic's prefill), as the chat endpoint continues it.
Images, documents, server tools and their blocks are refused with the place of the block;
`cache_control` anywhere is accepted and has nothing to do (the server reuses every prompt's
longest cached prefix by itself). Errors come back in Anthropic's shape (`AnthropicError`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace

from runtime.base.errors import StepstreamError
from runtime.server.requests import (MAX_STOPS, ApiError, Common, _common, _get, _range, _type_name, effort_request,
                                     response_format)
from runtime.text.chat_template import text_content
from runtime.text.tool_calls import ToolSpecError, check_tools

# ApiError kinds -> Anthropic's error types (https://docs.anthropic.com/en/api/errors)
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          405: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error"}
# the chat endpoint's names in the shared checks' messages -> this API's
_NAMES = ((".function.parameters", ".input_schema"), (".function.name", ".name"), ("'tool_choice' \"required\"",
          "tool_choice any"), ("response_format json_schema", "output_config.format"), ("'tool_choice'", "tool_choice"))
BILLING_HEADER = "x-anthropic-billing-header:"  # Claude Code's first system block, with a nonce per request
_REFUSED = {"mcp_servers": "MCP servers are not supported: run the tools in the client",
            "container": "containers (code execution) are not supported"}


class AnthropicError(ApiError):
    """An ApiError answered in Anthropic's shape: {"type": "error", "error": {"type", "message"}}."""

    def body(self) -> dict:
        return {"type": "error", "error": {"type": _TYPES.get(self.status, "api_error"), "message": self.message}}

    @classmethod
    def of(cls, e: ApiError) -> AnthropicError:
        if isinstance(e, AnthropicError):
            return e
        message, status = e.message, 529 if e.status == 503 else e.status  # 529: Anthropic's "overloaded"
        if e.code == "context_length_exceeded" and e.detail:
            # Anthropic's words, which Claude Code parses (N tokens > M) to compact its conversation
            message = f"prompt is too long: {e.detail['tokens']} tokens > {e.detail['limit']} maximum ({e.message})"
        for chat, ours in _NAMES:
            message = message.replace(chat, ours)
        return cls(status, message, e.param, e.code, e.kind, e.headers, e.detail)


@dataclass(frozen=True)
class MessagesBody:
    messages: list[dict]  # the chat endpoint's messages, the system prompt first
    tools: list[dict] | None  # the chat endpoint's tools
    tool_choice: str | dict
    common: Common
    max_calls: int | None
    thinking: str  # "hidden": no thinking blocks; "shown"; "omitted" (blocks without their text)


def _refuse(message: str) -> AnthropicError:
    return AnthropicError(400, message, code="invalid_value")


def _text_blocks(content, where: str) -> str | list[dict]:
    """A string, or text blocks: several go to the template as the chat endpoint's text parts
    (joined with newlines, as chat completions join them)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _refuse(f"{where} must be a string or a list of text blocks, got {_type_name(content)}")
    out = []
    for j, b in enumerate(content):
        kind = b.get("type") if isinstance(b, dict) else None
        if kind != "text" or not isinstance(b.get("text"), str):
            raise _refuse(f"{where}[{j}] must be a text block ({{'type': 'text', 'text': ...}}), got "
                          f"{json.dumps(kind)[:40] if kind else _type_name(b)}: this model reads text only")
        out.append(b["text"])
    return text_content(out)


def _text_block(b, at: str) -> str:
    if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str):
        return b["text"]
    raise _refuse(f"{at} must be a text block ({{'type': 'text', 'text': ...}}) in a system message")


def _tools(tools) -> list[dict] | None:
    if tools is None:
        return None
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise _refuse(f"tools.{i} must be an object, got {_type_name(t)}")
        if t.get("type") not in (None, "custom"):
            raise _refuse(f"tools.{i} is a {json.dumps(t.get('type'))[:60]} server tool: this server runs client tools "
                          "only ({'name': ..., 'input_schema': ...}); the client runs them")
        if not isinstance(t.get("input_schema"), dict):
            raise _refuse(f"tools.{i}.input_schema must be a JSON Schema object")
        spec = {"name": t.get("name")}  # in the order chat clients write a function's fields (the template shows them)
        if t.get("description") is not None:
            spec["description"] = t["description"]
        out.append({"type": "function", "function": {**spec, "parameters": t["input_schema"]}})
    return out


def _tool_choice(choice) -> tuple[str | dict, bool]:
    """(the chat endpoint's tool_choice, whether parallel calls are off)."""
    if choice is None:
        return "auto", False
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise _refuse(f"tool_choice must be {{'type': auto, any, tool or none}}, got {json.dumps(choice)[:80]}")
    kind = choice["type"]
    if kind == "tool" and not isinstance(choice.get("name"), str):
        raise _refuse("tool_choice of type tool needs the tool's 'name'")
    single = choice.get("disable_parallel_tool_use", False)
    if not isinstance(single, bool):
        raise _refuse("tool_choice.disable_parallel_tool_use must be a boolean")
    chat = {"auto": "auto", "any": "required", "none": "none"}.get(kind) or {"type": "function",
                                                                             "function": {"name": choice["name"]}}
    return chat, single


def _thinking(value) -> tuple[str, int | None]:
    """How thinking is shown, and the budget it sets (None: none set, thinking disabled or absent;
    -1: no limit, adaptive (or interleaved, between_tools) thinking's: the model decides how long
    to think)."""
    if value is None:
        return "hidden", None
    if not isinstance(value, dict) or value.get("type") not in ("enabled", "disabled", "adaptive", "between_tools"):
        raise _refuse(f"thinking must be {{'type': enabled, disabled, adaptive or between_tools}}, got "
                      f"{json.dumps(value)[:80]}")
    budget = None if value["type"] in ("enabled", "disabled") else -1
    if value["type"] == "enabled":
        budget = value.get("budget_tokens")
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
            raise _refuse(f"thinking.budget_tokens must be a positive integer, got {json.dumps(budget)[:40]}")
    if value["type"] == "disabled":
        return "hidden", None
    return "omitted" if value.get("display") == "omitted" else "shown", budget


def _budget(thinking_budget: int | None, effort) -> int | None:
    """Common.reasoning_budget from thinking.budget_tokens (-1: adaptive, no limit; None: no
    thinking asked for) and output_config.effort: the smaller limit of the two. An effort
    only caps: without thinking its default levels leave the server's --reasoning-budget as it
    is, so that a server's budget of 0 holds for every request that asks for no thinking."""
    try:
        by_effort = effort_request(effort)
    except StepstreamError as e:
        raise _refuse(f"output_config.effort: {e}") from None
    limits = [b for b in (thinking_budget, by_effort) if b is not None and b >= 0]
    if limits:
        return min(limits)
    return thinking_budget


def _system(system) -> list[dict]:
    """The system prompt, less Claude Code's billing header: a block whose nonce changes with every
    request would make every prompt differ from its first tokens, and no prefix be reused (as
    llama.cpp drops it)."""
    if isinstance(system, list):
        system = [b for b in system if not (isinstance(b, dict) and isinstance(b.get("text"), str)
                                            and b["text"].lstrip().startswith(BILLING_HEADER))]
    elif isinstance(system, str) and system.lstrip().startswith(BILLING_HEADER):
        system = system.split("\n", 1)[1] if "\n" in system else ""
    return [{"role": "system", "content": _text_blocks(system, "system")}] if system else []


def _blocks_of(m: dict, where: str) -> list:
    content = m.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _refuse(f"{where}.content must be a string or a list of content blocks, got {_type_name(content)}")
    return content


def _combined(messages: list) -> list[tuple[str, str, list]]:
    """(role, where, blocks) of the messages, consecutive ones of one role combined, as Anthropic
    combines them."""
    out: list[tuple[str, str, list]] = []
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system"):
            raise _refuse(f"{where} must be a message with role user, assistant or system, got "
                          f"{json.dumps(m.get('role') if isinstance(m, dict) else m)[:60]}")
        blocks = [(b, f"{where}.content.{j}") for j, b in enumerate(_blocks_of(m, where))]
        if out and out[-1][0] == m["role"] != "system":
            out[-1][2].extend(blocks)
        else:
            out.append((m["role"], where, blocks))
    return out


def to_messages(messages: list, system) -> list[dict]:
    """Chat messages of Anthropic's (this module's docstring). A system message among them (the
    client's type allows one; Claude Code sends them) is one there too."""
    out = _system(system)
    calls: set[str] = set()
    for role, where, blocks in _combined(messages):
        if role == "system":
            out.append({"role": "system", "content": text_content([_text_block(b, at) for b, at in blocks])})
            continue
        text, reasoning, tool_calls, results = [], [], [], 0
        for b, at in blocks:
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "text" and isinstance(b.get("text"), str):
                if b["text"]:  # an empty block adds nothing (after tool results: no empty user turn)
                    text.append(b["text"])
            elif kind == "thinking" and role == "assistant" and isinstance(b.get("thinking"), str):
                reasoning.append(b["thinking"])
            elif kind == "redacted_thinking" and role == "assistant":
                continue  # opaque: another model's reasoning, which this one cannot read
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str) or not isinstance(
                        b.get("input", {}), dict):
                    raise _refuse(f"{at} must be a tool_use block with string 'id' and 'name' and an object 'input'")
                tool_calls.append({"id": b["id"], "type": "function",
                                   "function": {"name": b["name"], "arguments": json.dumps(b.get("input", {}),
                                                                                           ensure_ascii=False)}})
                calls.add(b["id"])
            elif kind == "tool_result" and role == "user":
                if not isinstance(b.get("tool_use_id"), str) or b["tool_use_id"] not in calls:
                    raise _refuse(f"{at}: no tool_use block before it has the id "
                                  f"{json.dumps(b.get('tool_use_id'))[:80]}")
                result = _text_blocks(b.get("content", ""), f"{at}.content")
                if b.get("is_error") is True:
                    result = "Error: " + result if isinstance(result, str) else \
                        [{"type": "text", "text": "Error:"}] + result
                out.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": result})
                results += 1
            elif isinstance(kind, str) and kind not in ("text", "thinking", "tool_use", "tool_result"):
                raise _refuse(f"{at} is a {json.dumps(kind)[:40]} block: this server reads text, thinking, tool_use "
                              "and tool_result blocks (this model reads text only)")
            else:
                raise _refuse(f"{at} is not a well-formed content block for the {role}'s message")
        if role == "user":
            if text or not results:  # tool results alone are the tool's turn, not the user's
                out.append({"role": "user", "content": text_content(text)})
        else:
            turn: dict = {"role": "assistant", "content": text_content(text)}
            if reasoning:
                turn["reasoning_content"] = "\n".join(reasoning)
            if tool_calls:
                turn["tool_calls"] = tool_calls
            out.append(turn)
    return out


def messages_body(body: dict, *, count_only: bool = False) -> MessagesBody:
    """count_only: /v1/messages/count_tokens, which takes no max_tokens."""
    for name, why in _REFUSED.items():
        if body.get(name):
            raise _refuse(f"{name}: {why}")
    max_tokens = _get(body, "max_tokens", (int,), required=not count_only)
    if max_tokens is not None and max_tokens < 1:
        raise _refuse(f"max_tokens must be at least 1, got {max_tokens}" + (
            " (0, warming the cache without a reply, is not supported)" if max_tokens == 0 else ""))
    messages = _get(body, "messages", (list,), required=True)
    if not messages:
        raise _refuse("messages must hold at least one message")
    chat = to_messages(messages, body.get("system"))
    tools = _tools(_get(body, "tools", (list,)))
    tool_choice, single = _tool_choice(body.get("tool_choice"))
    try:
        check_tools(tools, tool_choice, name_limit=128)  # Anthropic's limit
    except ToolSpecError as e:
        message = str(e)
        for chat, ours in _NAMES:
            message = message.replace(chat, ours)
        raise _refuse(re.sub(r"tools\[(\d+)\]", r"tools.\1", message)) from None
    stops = _get(body, "stop_sequences", (list,), [])
    if not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise _refuse(f"stop_sequences must be a list of at most {MAX_STOPS} strings")
    temperature = _get(body, "temperature", (int, float))
    _range("temperature", temperature, 0, 1)  # Anthropic's range
    shared = {k: body[k] for k in ("temperature", "top_p", "top_k") if k in body}
    shared.update(stream=_get(body, "stream", (bool,), False), max_completion_tokens=max_tokens)
    common = replace(_common(shared, None), stop=tuple(stops))
    config = _get(body, "output_config", (dict,), {})
    if config.get("format") is not None:
        fmt = config["format"]
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            raise _refuse("output_config.format must be {'type': 'json_schema', 'schema': {...}}")
        try:
            json_object, grammar = response_format({"type": "json_schema", "json_schema": {"schema": fmt.get("schema")}})
        except ApiError as e:
            raise _refuse(e.message.replace("'response_format'", "output_config.format")) from None
        common = replace(common, json_object=json_object, grammar=grammar)
        if tools and tool_choice != "none":
            raise _refuse("output_config.format goes without tools (or with tool_choice none): the reply must be "
                          "JSON, with no room for a tool call's markup")
    shown, budget = _thinking(body.get("thinking"))
    common = replace(common, reasoning_budget=_budget(budget, config.get("effort")))
    return MessagesBody(chat, tools, tool_choice, common, 1 if single else None, shown)
