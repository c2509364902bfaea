"""The body of POST /v1/responses (OpenAI's Responses API), checked field by field, and its
input items as the chat messages the template renders.

A request is read into the chat endpoint's terms: `input` items become messages, the flat
function tools (`{"type": "function", "name": ...}`) become chat tools, `text.format` becomes
a `response_format`, `max_output_tokens` the token limit. So a response is generated exactly
as a chat completion of the same conversation is, and the two share the prompt cache.

Input items and the messages they become:

    message (user, system, developer)   a message of that role (developer is the system prompt)
    message (assistant), reasoning,     one assistant turn: content, `reasoning_content`,
    function_call ...                   `tool_calls`, in the order a response writes them
    function_call_output                a "tool" message answering the call with its call_id
    item_reference                      the stored item it names (runtime.server.response_store)

Items of the hosted tools (web search, file search, computer use, ...) and parts other than
text (images, files, audio) are refused with the index of the item, as is a function call
output whose call_id no earlier function call has.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from runtime.generation.reasoning_budget import OPENAI_EFFORTS
from runtime.server.requests import (MAX_TOP_LOGPROBS, ApiError, Common, _common, _get, _range, _type_name,
                                     effort_request, response_format)
from runtime.text.chat_template import text_content
from runtime.text.tool_calls import TOOL_SHAPE, ToolSpecError, check_tools

# reasoning.effort bounds the reasoning (runtime.generation.reasoning_budget); the summary hints at a
# model's behaviour but changes nothing a reply must hold: read, echoed, not applied
REASONING_EFFORTS = (None, *OPENAI_EFFORTS)
REASONING_SUMMARIES = (None, "auto", "concise", "detailed")
# what `include` may ask for, as OpenAI lists them: the log-probabilities are given; the rest are
# outputs of tools or of encryption this server does not have, so there is nothing to add
INCLUDABLE = ("message.output_text.logprobs", "reasoning.encrypted_content", "file_search_call.results",
              "web_search_call.results", "web_search_call.action.sources", "message.input_image.image_url",
              "computer_call_output.output.image_url", "code_interpreter_call.outputs")
MAX_METADATA = 16  # key-value pairs, as OpenAI: keys up to 64 characters, values up to 512
# fields of the chat endpoint a Responses body shares (the samplers, llama-server's extensions)
_SHARED = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n", "seed", "stop", "ignore_eos",
           "typical_p", "mirostat", "mirostat_tau", "mirostat_eta", "dynatemp_range", "dynatemp_exponent", "xtc_probability",
           "xtc_threshold", "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n",
           "dry_sequence_breakers", "top_n_sigma", "grammar",
           "json_schema", "logit_bias", "presence_penalty", "frequency_penalty", "min_tokens")
# what a request may not ask for, with what this server offers instead
_REFUSED = {"background": "background responses are not supported: send the request and wait for it (or stream it)",
            "conversation": "conversations are not supported: chain responses with 'previous_response_id'",
            "prompt": "prompt templates are not supported: send 'instructions' and 'input'",
            "context_management": "context management (compaction) is not supported"}
_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")


@dataclass(frozen=True)
class ResponsesBody:
    input: list[dict]  # the request's own input items (a string input is one user message)
    instructions: str | None
    tools: list[dict] | None  # in the chat endpoint's shape
    tool_choice: str | dict  # in the chat endpoint's shape
    common: Common
    logprobs: int | None  # None, or how many alternatives (top_logprobs)
    max_calls: int | None
    store: bool
    previous_response_id: str | None
    echo: dict  # the request's settings as a response reports them


def _refuse(message: str, param: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _tools(tools: list | None) -> list[dict] | None:
    """Flat function tools -> the chat endpoint's, refused in the flat shape's own names."""
    if tools is None:
        return None
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise _refuse(f"tools[{i}] must be an object, got {_type_name(t)}", f"tools[{i}]", "invalid_type")
        kind = t.get("type")
        if kind == "function" and "name" not in t and isinstance(t.get("function"), dict):
            raise _refuse(f"tools[{i}] is in the chat completions' shape ({{'type': 'function', 'function': {{...}}}}): "
                          "the Responses API takes {'type': 'function', 'name': ..., 'parameters': ...}", f"tools[{i}]")
        if kind != "function":
            raise _refuse(f"tools[{i}] is a {json.dumps(kind)[:60]} tool: this server runs function tools only "
                          "({'type': 'function', 'name': ..., 'parameters': ...}); the client runs them", f"tools[{i}]",
                          "unsupported")
        for key, kinds, what in (("description", str, "a string"), ("strict", bool, "a boolean")):
            if t.get(key) is not None and not isinstance(t[key], kinds):
                raise _refuse(f"tools[{i}].{key} must be {what}, got {_type_name(t[key])}", f"tools[{i}].{key}",
                              "invalid_type")
        spec = {k: t[k] for k in ("name", "description", "parameters", "strict") if t.get(k) is not None}
        out.append({"type": "function", "function": spec})
    return out


def _tool_choice(choice) -> str | dict:
    if choice is None or isinstance(choice, str):
        return "auto" if choice is None else choice  # a bad string is named by check_tools
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _refuse(f"'tool_choice' must be auto, none, required or {{'type': 'function', 'name': ...}}, got "
                  f"{json.dumps(choice)[:80]}", "tool_choice", "unsupported")


def _flat(e: ToolSpecError) -> ApiError:
    """check_tools names the chat shape's fields (tools[0].function.name): these are tools[0].name."""
    return _refuse(str(e).replace("].function.", "].").replace(TOOL_SHAPE, "{'type': 'function', 'name': ..., "
                                                                            "'parameters': ...}")
                   .replace("{'type': 'function', 'function': {'name': ...}}", "{'type': 'function', 'name': ...}"),
                   e.param.replace("].function.", "]."))


def _text_format(text) -> dict | None:
    """`text.format` as the chat endpoint's `response_format`."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise _refuse(f"'text' must be an object, got {_type_name(text)}", "text", "invalid_type")
    fmt = text.get("format")
    verbosity = text.get("verbosity")
    if verbosity not in (None, "low", "medium", "high"):
        raise _refuse(f"'text.verbosity' must be low, medium or high, got {json.dumps(verbosity)[:40]}",
                      "text.verbosity")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise _refuse("'text.format' must be an object with a 'type' (text, json_object or json_schema), got "
                      f"{json.dumps(fmt)[:80]}", "text.format", "invalid_type")
    if fmt["type"] == "json_schema":
        if not isinstance(fmt.get("schema"), dict) or not isinstance(fmt.get("name", ""), str) or not isinstance(
                fmt.get("strict", False), (bool, type(None))):
            raise _refuse("'text.format' json_schema needs a 'schema' object (a string 'name', a boolean 'strict')",
                          "text.format")
        return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
    return fmt


def _metadata(meta) -> dict:
    if meta is None:
        return {}
    if not isinstance(meta, dict) or len(meta) > MAX_METADATA or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in meta.items()):
        raise _refuse(f"'metadata' must be an object of at most {MAX_METADATA} strings (keys up to 64 characters, "
                      "values up to 512)", "metadata")
    return meta


def responses_body(body: dict) -> ResponsesBody:
    for name, why in _REFUSED.items():
        if body.get(name) not in (None, False):
            raise _refuse(f"'{name}': {why}", name, "unsupported")
    given = _get(body, "input", (str, list), required=True)
    if not given:
        raise _refuse("'input' must be a non-empty string or list of items", "input")
    items = [{"type": "message", "role": "user", "content": given}] if isinstance(given, str) else given
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise _refuse(f"input[{i}] must be an object, got {_type_name(item)}", f"input[{i}]", "invalid_type")
    instructions = _get(body, "instructions", (str,))
    flat_tools = _get(body, "tools", (list,))
    tools = _tools(flat_tools)
    tool_choice = _tool_choice(body.get("tool_choice"))
    try:
        check_tools(tools, tool_choice)
    except ToolSpecError as e:
        raise _flat(e) from None
    max_output = _get(body, "max_output_tokens", (int,))
    if max_output is not None and max_output < 1:
        raise _refuse(f"'max_output_tokens' must be at least 1, got {max_output}", "max_output_tokens")
    fmt = _text_format(body.get("text"))
    shared = {k: body[k] for k in _SHARED if k in body}
    shared.update(stream=_get(body, "stream", (bool,), False), max_completion_tokens=max_output)
    common = _common(shared, None)  # (llama-server's json_schema field included)
    from_field = common.grammar is not None
    named = "grammar" if shared.get("grammar") else "json_schema"  # the llama-server field that set it
    if fmt is not None and fmt.get("type") != "text":  # ({"type": "text"}, a client's default, constrains nothing)
        if from_field:
            raise _refuse(f"give 'text.format' or llama-server's '{named}', not both", named)
        try:
            json_object, grammar = response_format(fmt)
        except ApiError as e:
            raise _refuse(e.message.replace("'response_format'", "'text.format'"), "text.format", e.code) from None
        common = replace(common, json_object=json_object, grammar=grammar)
    if common.structured and tools and tool_choice != "none":
        field = named if from_field else "text.format"
        what = "match the grammar" if field == "grammar" else "be JSON"
        raise _refuse(f"'{field}' goes without 'tools' (or with 'tool_choice': \"none\"): the reply must {what}, "
                      "with no room for a tool call's markup", field, "unsupported")
    _get(body, "stream_options", (dict,))
    include = _get(body, "include", (list,), [])
    unknown = [x for x in include if x not in INCLUDABLE]
    if unknown:
        raise _refuse(f"'include' may hold {', '.join(INCLUDABLE)}; got {json.dumps(unknown[0])[:60]}", "include")
    top = _get(body, "top_logprobs", (int,))
    _range("top_logprobs", top, 0, MAX_TOP_LOGPROBS)
    logprobs = top if top is not None else (0 if "message.output_text.logprobs" in include else None)
    parallel = _get(body, "parallel_tool_calls", (bool,), True)
    max_calls = None if parallel else 1
    most = _get(body, "max_tool_calls", (int,))
    if most is not None:
        if most < 1:
            raise _refuse(f"'max_tool_calls' must be at least 1, got {most}", "max_tool_calls")
        max_calls = min(most, max_calls or most)
    reasoning = _get(body, "reasoning", (dict,), {})
    if reasoning.get("effort") not in REASONING_EFFORTS:
        raise _refuse(f"'reasoning.effort' must be one of {', '.join(e for e in REASONING_EFFORTS if e)}, got "
                      f"{json.dumps(reasoning.get('effort'))[:40]}", "reasoning.effort")
    common = replace(common, reasoning_budget=effort_request(reasoning.get("effort"), OPENAI_EFFORTS))  # checked above
    summary = reasoning.get("summary", reasoning.get("generate_summary"))
    if summary not in REASONING_SUMMARIES:
        raise _refuse(f"'reasoning.summary' must be one of {', '.join(s for s in REASONING_SUMMARIES if s)}, got "
                      f"{json.dumps(summary)[:40]}", "reasoning.summary")
    if _get(body, "truncation", (str,), "disabled") != "disabled":
        raise _refuse("'truncation' must be \"disabled\": a conversation longer than the context is refused, "
                      "not cut", "truncation", "unsupported")
    store = _get(body, "store", (bool,), True)
    previous = _get(body, "previous_response_id", (str,))
    for name in ("user", "safety_identifier", "prompt_cache_key", "service_tier"):
        _get(body, name, (str,))
    echo = {"instructions": instructions, "max_output_tokens": max_output, "max_tool_calls": most,
            "metadata": _metadata(body.get("metadata")),
            "parallel_tool_calls": parallel, "previous_response_id": previous,
            "reasoning": {"effort": reasoning.get("effort"), "summary": summary}, "store": store,
            "temperature": common.params.temperature, "top_p": common.params.top_p,
            "text": {"format": body["text"]["format"] if fmt is not None else {"type": "text"},
                     **({"verbosity": body["text"]["verbosity"]} if "verbosity" in (body.get("text") or {}) else {})},
            "tool_choice": body.get("tool_choice") or "auto", "tools": [_echo_tool(t) for t in flat_tools or []],
            "top_logprobs": top, "truncation": "disabled", "user": body.get("user"),
            "safety_identifier": body.get("safety_identifier"), "prompt_cache_key": body.get("prompt_cache_key"),
            "service_tier": "default", "background": False}
    return ResponsesBody(items, instructions, tools, tool_choice, common, logprobs, max_calls, store, previous, echo)


def _echo_tool(t: dict) -> dict:
    return {"type": "function", "name": t["name"], "description": t.get("description"),
            "parameters": t.get("parameters"), "strict": t.get("strict", True)}


# ------------------------------------------------------------------ input items -> chat messages

def _texts(content, where: str) -> list[str]:
    """A message's or an output's content: a string or a list of text parts, each a text."""
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise _refuse(f"{where} must be a string or a list of text parts, got {_type_name(content)}", where,
                      "invalid_type")
    out = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in _TEXT_PARTS and isinstance(p.get("text"), str):
            out.append(p["text"])
        elif kind == "refusal" and isinstance(p.get("refusal"), str):
            out.append(p["refusal"])
        elif isinstance(kind, str) and kind not in _TEXT_PARTS:
            raise _refuse(f"{where}[{j}] is a {json.dumps(kind)[:40]} part: this model reads text parts only",
                          f"{where}[{j}]", "unsupported")
        else:
            raise _refuse(f"{where}[{j}] must be a text part ({{'type': 'input_text', 'text': ...}})", f"{where}[{j}]")
    return out


def _reasoning_text(item: dict, where: str) -> str:
    """A reasoning item's text: its `content` (reasoning_text parts), else its summary's."""
    for key in ("content", "summary"):
        parts = item.get(key)
        if parts:
            return "\n".join(_texts(parts, f"{where}.{key}"))
    return ""


def item_kind(item: dict) -> str:
    """An input item's type: EasyInputMessage may leave out "type" when it has a role, and an item
    reference when it has an id."""
    return item.get("type") or ("message" if "role" in item else "item_reference" if "id" in item else "")


def _call(item: dict, at: str) -> dict:
    name, call_id, args = item.get("name"), item.get("call_id"), item.get("arguments", "{}")
    if not isinstance(name, str) or not name or not isinstance(call_id, str) or not isinstance(args, str):
        raise _refuse(f"{at} must be a function call with a non-empty string 'name' and string 'call_id' and "
                      "'arguments'", at)
    try:
        ok = isinstance(json.loads(args), dict) if args.strip() else True
    except ValueError:
        ok = False
    if not ok:
        raise _refuse(f"{at}.arguments must be the text of a JSON object, got {args[:80]!r}", f"{at}.arguments")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def to_messages(items: list[dict], where: list[str] | None = None) -> list[dict]:
    """Chat messages of input items (this module's docstring). `where`: each item's name in a
    refusal (default input[i]). Several text parts are given to the template as parts, as the
    chat endpoint gives them (joined with newlines)."""
    where = where or [f"input[{i}]" for i in range(len(items))]
    messages: list[dict] = []
    turn: dict | None = None  # the assistant turn being built; its texts under "_parts"
    calls: set[str] = set()

    def new_turn() -> dict:
        messages.append({"role": "assistant", "_parts": []})
        return messages[-1]

    for item, at in zip(items, where):
        kind = item_kind(item)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise _refuse(f"{at}.role must be user, system, developer or assistant, got "
                              f"{json.dumps(role)[:40]}", f"{at}.role")
            texts = _texts(item.get("content", ""), f"{at}.content")
            if role != "assistant":
                messages.append({"role": "system" if role == "developer" else role, "content": text_content(texts)})
                turn = None
                continue
            if turn is None or turn["_parts"] or turn.get("tool_calls"):
                turn = new_turn()
            turn["_parts"] += texts
        elif kind == "reasoning":
            if turn is None or turn["_parts"] or turn.get("tool_calls"):
                turn = new_turn()
            text = _reasoning_text(item, at)
            turn["reasoning_content"] = turn["reasoning_content"] + "\n" + text if "reasoning_content" in turn else text
        elif kind == "function_call":
            call = _call(item, at)
            if turn is None:
                turn = new_turn()
            turn.setdefault("tool_calls", []).append(call)
            calls.add(call["id"])
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or call_id not in calls:
                raise _refuse(f"{at}: no function call before it has the call_id {json.dumps(call_id)[:80]}",
                              f"{at}.call_id")
            messages.append({"role": "tool", "tool_call_id": call_id,
                             "content": text_content(_texts(item.get("output", ""), f"{at}.output"))})
            turn = None
        else:
            raise _refuse(f"{at} is a {json.dumps(kind)[:60]} item: this server reads messages, reasoning, function "
                          "calls and their outputs, and item references", f"{at}.type", "unsupported")
    for m in messages:  # a turn of reasoning or calls alone has empty text (the template wants a string)
        if "_parts" in m:
            m["content"] = text_content(m.pop("_parts"))
    return messages
