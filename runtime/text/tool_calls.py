"""The model's reply text -> OpenAI parts: `content`, `reasoning_content` and `tool_calls`.

The markup is Step-3.5-Flash's (see the chat template in convert/mini_tokenizer.py):

    <think>\\nREASONING\\n</think>\\nCONTENT\\n<tool_call>\\n<function=NAME>\\n
    <parameter=KEY>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>

A `<tool_call>` block may instead hold Hermes' JSON, `{"name": ..., "arguments": {...}}`.
The newlines the template writes around the tags are layout, not text, so they are dropped:
one after `<think>`, one before and one after `</think>`, one before a well-formed
`<tool_call>`, and whitespace-only text after a well-formed call (up to the next call or the
end). So a reply in the template's own layout, parsed and rendered back as an assistant
message, is the same text: the prompt-prefix reuse of the server depends on that.

Reasoning is the text of a `<think>` section anywhere in content (or from the start, when the
prompt left one open); an unclosed section runs to the end. Markup inside reasoning is text.

A block that is not a well-formed call (unterminated, JSON that does not parse, no name,
arguments that are not an object, stray text between parameters) stays in the content as the
text it was: a model's slip never becomes an error. Unless the reply was cut short (max_tokens,
`finish(cut=True)`): then an unfinished call, and a tag's start of two characters or more at
the end, are dropped; the words before them stay.

`ReplyStream` gives the same parts as OpenAI streaming deltas. Text that may still become a
tag (`<tool_c`, a `\\n` that a `<tool_call>` may follow) is held back until it cannot, and a
tool call is sent whole, in one delta, once its `</tool_call>` has come. Whatever way a reply
is cut into pushes, the deltas add up to `parse_reply` of the whole reply: `parse_reply` is
the same machine fed once.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import dataclass, field

from runtime.base.errors import StepstreamError

THINK, END_THINK = "<think>", "</think>"
CALL, END_CALL = "<tool_call>", "</tool_call>"
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]+")  # OpenAI's and Anthropic's rule for function names: 1 to 64 (128) of these
NAME_LIMIT = 64  # OpenAI's; Anthropic's is 128 (Claude Code's MCP tools' names pass 64)
TOOL_SHAPE = "{'type': 'function', 'function': {'name': ..., 'parameters': ...}}"  # a tool, for messages

_FUNCTION = re.compile(r"\s*<function=([^<>\n]+)>(.*)</function>\s*", re.S)
_PARAMETER = re.compile(r"\s*<parameter=([^<>\n]+)>(.*?)</parameter>", re.S)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object's text, as OpenAI returns it


@dataclass
class ParsedReply:
    content: str | None  # None when there is none (OpenAI's null beside tool calls)
    reasoning: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


class ToolSpecError(StepstreamError):
    """`tools` or `tool_choice` that no reply could honour; `param` names the field at fault."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def check_tools(tools, tool_choice, name_limit: int = NAME_LIMIT) -> None:
    """Refuse tool specs the chat template cannot render and a tool_choice that no reply could
    honour: "required" or a named function without `tools`, or a function not among them. The
    server and the Python API apply the same rules (name_limit: the longest name allowed)."""
    if tools is not None and not isinstance(tools, list):
        raise ToolSpecError(f"'tools' must be a list of {TOOL_SHAPE}, got {type(tools).__name__}", "tools")
    for i, t in enumerate(tools or []):
        if not (isinstance(t, dict) and t.get("type", "function") == "function" and isinstance(t.get("function"), dict)
                and isinstance(t["function"].get("name"), str)):
            raise ToolSpecError(f"tools[{i}] must be {TOOL_SHAPE}", f"tools[{i}]")
        if not TOOL_NAME.fullmatch(t["function"]["name"]) or len(t["function"]["name"]) > name_limit:
            raise ToolSpecError(f"tools[{i}].function.name must be 1 to {name_limit} letters, digits, _ or -, got "
                                f"{json.dumps(t['function']['name'])[:80]}", f"tools[{i}].function.name")
        _check_parameters(t["function"].get("parameters"), f"tools[{i}].function.parameters")
        first = next(j for j, u in enumerate(tools) if u["function"]["name"] == t["function"]["name"])
        if first != i:
            raise ToolSpecError(f"tools[{i}] and tools[{first}] both name the function "
                                f"{json.dumps(t['function']['name'])}; function names must be unique",
                                f"tools[{i}].function.name")
    if not isinstance(tool_choice, (str, dict)) or (isinstance(tool_choice, str)
                                                     and tool_choice not in ("auto", "none", "required")):
        raise ToolSpecError(f"'tool_choice' must be auto, none, required or {{'type': 'function', 'function': "
                            f"{{'name': ...}}}}, got {tool_choice!r}", "tool_choice")
    if tool_choice not in ("auto", "none") and not tools:
        raise ToolSpecError(f"'tool_choice' {json.dumps(tool_choice)[:80]} needs 'tools'", "tool_choice")
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type", "function") != "function" or not isinstance(name, str):
            raise ToolSpecError(f"'tool_choice' must be auto, none, required or {{'type': 'function', 'function': "
                                f"{{'name': ...}}}}, got {json.dumps(tool_choice)[:80]}", "tool_choice")
        if name not in {t["function"]["name"] for t in tools}:
            raise ToolSpecError(f"'tool_choice' names the function {name!r}, which is not among 'tools'", "tool_choice")


def _check_parameters(params, where: str) -> None:
    """A function's `parameters`: absent or null (no parameters, as OpenAI and llama.cpp take
    it), or a JSON Schema of an object, as OpenAI requires: `type` "object" where it says a
    type, `properties` an object of schemas. The parser types `<parameter>` values by it."""
    if params is None:
        return
    if not isinstance(params, dict):
        raise ToolSpecError(f"{where} must be a JSON Schema object, got {type(params).__name__}", where)
    if "type" in params and params["type"] != "object":
        raise ToolSpecError(f"{where} must be a JSON Schema of type \"object\", got type "
                            f"{json.dumps(params['type'])[:80]}", where)
    for key in ("properties", "$defs", "definitions"):
        schemas = params.get(key, {})
        if not isinstance(schemas, dict) or not all(isinstance(v, (dict, bool)) for v in schemas.values()):
            raise ToolSpecError(f"{where}.{key} must be an object of JSON Schemas, got {json.dumps(schemas)[:80]}",
                                f"{where}.{key}")


def callable_tools(tools: list[dict] | None, tool_choice) -> list[dict] | None:
    """The tools a reply's calls may name: all those offered, or only the one a tool_choice
    names (OpenAI: it "forces the model to call that function"); None when none may be called."""
    if tools is None or tool_choice == "none":
        return None
    if isinstance(tool_choice, dict):
        return [t for t in tools if t["function"]["name"] == tool_choice["function"]["name"]]
    return tools


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def starts_in_reasoning(prompt_text: str) -> bool:
    """Whether a rendered prompt leaves a `<think>` section open for the reply (the published
    Step-3.5-Flash template's generation prompt ends in `<think>\\n`; ours does not)."""
    tail = prompt_text[prompt_text.rfind("<|im_start|>") + 1:]
    return tail.rfind(THINK) > tail.rfind(END_THINK)


def forced_call(name: str | None) -> str:
    """The start of a reply that must call a tool: `tool_choice` "required" (name None: the model
    still chooses which) or one named function. The server appends it to the prompt and feeds
    it to the parser before the generated text, so the model can only continue a call, which
    its grammar (runtime.text.tool_grammar) finishes."""
    return f"{CALL}\n<function={name}>\n" if name is not None else f"{CALL}\n<function="


def parse_reply(text: str, *, in_reasoning: bool = False, tools: list[dict] | None = None,
                calls: bool = True, max_calls: int | None = None, cut: bool = False) -> ParsedReply:
    """The parts of a whole reply. `tools` (the request's function specs) let a parameter
    whose schema type is "string" stay text even where it reads as JSON (`42`, `[1, 2]`).
    `cut`: the reply was cut short (ReplyStream.finish)."""
    stream = ReplyStream(in_reasoning=in_reasoning, tools=tools, calls=calls, max_calls=max_calls)
    deltas = stream.push(text) + stream.finish(cut)
    content = "".join(d.get("content", "") for d in deltas)
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    calls = [ToolCall(c["id"], c["function"]["name"], c["function"]["arguments"])
             for d in deltas for c in d.get("tool_calls", ())]
    return ParsedReply(content or None, reasoning or None, calls)


class ReplyStream:
    """Reply text in, OpenAI `delta` dicts out. A state machine over three modes: CONTENT,
    REASONING (inside `<think>`) and CALL (inside `<tool_call>`, buffered until it closes).
    With `calls=False` (a request that offered no tools, or tool_choice "none") a `<tool_call>`
    block is content like any other text; reasoning is still separated. With `max_calls` (1 for
    OpenAI's `parallel_tool_calls: false`) the reply ends at that many well-formed calls: what
    the model writes after the last of them is dropped."""

    def __init__(self, *, in_reasoning: bool = False, tools: list[dict] | None = None, calls: bool = True,
                 max_calls: int | None = None):
        self._mode = "reasoning" if in_reasoning else "content"
        self._buf = ""             # text not yet turned into deltas
        self._drop_newline = in_reasoning  # one "\n" after <think> / </think> is layout
        # a reply to a prompt that opened <think> may open it again first: that tag is markup
        # (vLLM's reasoning parsers drop it too), not the start of the reasoning's text
        self._reopen = in_reasoning
        self._pre = ""             # held content before an open <tool_call>, resolved with it
        self._after_call = False   # only whitespace since the last well-formed call
        self._held_space = ""      # that whitespace, dropped if a call or the end comes next
        # text other than whitespace since the reply began, a reasoning section ended or a call
        # closed: a <think> after it is text, as llama.cpp reads reasoning only at such a start
        self._spoken = False
        self._n_calls = 0
        self._max_calls = max_calls
        self._types = _string_parameters(tools)
        # the functions a call may name (None: any): a call to another is not one, it is text
        self._names = None if tools is None else frozenset(
            t["function"]["name"] for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str))
        self._tags = (CALL, THINK) if calls else (THINK,)
        self._held_tags = ("\n" + CALL, CALL, THINK) if calls else (THINK,)
        self._done = False
        self._cut = False  # finish(cut=True): the reply was cut short

    def push(self, text: str) -> list[dict]:
        if self._done:
            raise ValueError("push() after finish()")
        self._buf += text
        return self._run(final=False)

    def finish(self, cut: bool = False) -> list[dict]:
        """The rest of the reply. `cut`: it was cut short (max_tokens): an unfinished call, or the
        start of a tag at its end, is markup no client can use, and is dropped rather than given as
        text (clients showed it as the reply's words)."""
        if self._done:
            return []
        self._cut = cut
        out = self._run(final=True)
        self._done = True
        return out

    @property
    def in_reasoning(self) -> bool:
        """Whether text pushed now continues a reasoning section."""
        return self._mode == "reasoning"

    @property
    def ended(self) -> bool:
        """Whether the reply has all the calls it may have (max_calls): later text is dropped."""
        return self._max_calls is not None and self._n_calls >= self._max_calls

    def _run(self, final: bool) -> list[dict]:
        out: list[dict] = []
        while True:
            if self.ended:
                self._buf = ""
                return _merge(out)
            step = {"content": self._content, "reasoning": self._reasoning, "call": self._call}[self._mode]
            if not step(out, final):
                return _merge(out)

    # Each step consumes from self._buf and returns True when it changed mode (so the loop
    # goes on), False when it needs more text (or, when final, has taken everything).

    def _skip_layout_newline(self, final: bool) -> bool:
        """Drops the "\\n" after a think tag; False while it cannot yet be told."""
        if self._drop_newline:
            if not self._buf and not final:
                return False
            if self._buf.startswith("\n"):
                self._buf = self._buf[1:]
            self._drop_newline = False
        return True

    def _content(self, out: list[dict], final: bool) -> bool:
        if not self._skip_layout_newline(final):
            return False
        tags, held = self._tags, self._held_tags
        at, tag = _first(self._buf, tags)
        if tag == THINK and (self._spoken or self._buf[:at].strip()):  # mid-text: a <think> is text
            tags, held = tuple(t for t in tags if t != THINK), tuple(t for t in held if t != THINK)
            at, tag = _first(self._buf, tags)
        if tag == THINK:
            self._emit_content(out, self._buf[:at])
            self._held_space = ""  # whitespace between a call and <think> is layout too
            self._buf = self._buf[at + len(THINK):]
            self._mode, self._drop_newline = "reasoning", True
            return True
        if tag == CALL:
            self._pre = self._held_space + self._buf[:at]
            self._held_space = ""
            self._buf = self._buf[at + len(CALL):]
            self._mode = "call"
            return True
        if not final:
            keep = _held_back(self._buf, held)
        elif self._cut:
            keep = _held_back(self._buf, held)
            if keep and THINK in held and (self._spoken or self._buf[:len(self._buf) - keep].strip()):
                keep = _held_back(self._buf, tuple(t for t in held if t != THINK))  # mid-text, <think> is text
            keep = _cut_tail(self._buf, keep)
        else:
            keep = 0
        text, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
        if final:
            self._buf = ""  # (cut: the start of a tag, dropped)
        if final and self._after_call and (self._held_space + text).isspace():
            self._held_space = ""  # whitespace after the last call is layout
            return False
        self._emit_content(out, text)
        return False

    def _emit_content(self, out: list[dict], text: str) -> None:
        if self._after_call:
            if not (self._held_space + text).strip():
                self._held_space += text
                return
            text, self._held_space, self._after_call = self._held_space + text, "", False
        if text:
            out.append({"content": text})
            self._spoken = self._spoken or bool(text.strip())

    def _reasoning(self, out: list[dict], final: bool) -> bool:
        if not self._skip_layout_newline(final):
            return False
        if self._reopen:
            if self._buf.startswith(THINK):
                self._buf, self._drop_newline, self._reopen = self._buf[len(THINK):], True, False
                return True
            if THINK.startswith(self._buf) and not final:
                return False  # it may yet be the tag
            self._reopen = False
        at = self._buf.find(END_THINK)
        if at >= 0:
            text = self._buf[:at]
            _add(out, "reasoning_content", text[:-1] if text.endswith("\n") else text)
            self._buf = self._buf[at + len(END_THINK):]
            self._mode, self._drop_newline, self._spoken = "content", True, False
            return True
        keep = _held_back(self._buf, ("\n" + END_THINK, END_THINK)) if not final or self._cut else 0
        if final:
            keep = _cut_tail(self._buf, keep)
        _add(out, "reasoning_content", self._buf[:len(self._buf) - keep])
        self._buf = "" if final else self._buf[len(self._buf) - keep:]  # (cut: the start of a tag, dropped)
        return False

    def _call(self, out: list[dict], final: bool) -> bool:
        at = self._buf.find(END_CALL)
        if at < 0:
            if not final:
                return False
            body, self._buf = self._buf, ""
            if self._cut:  # an unfinished call where the reply was cut: the text before it stays
                pre, self._pre = self._pre, ""
                self._emit_content(out, pre[:-1] if pre.endswith("\n") else pre)
            else:
                self._resolve(out, body, closed=False)
            self._mode = "content"
            return True
        body, self._buf = self._buf[:at], self._buf[at + len(END_CALL):]
        self._resolve(out, body, closed=True)
        self._mode = "content"
        return True

    def _resolve(self, out: list[dict], body: str, closed: bool) -> None:
        call = _parse_call(body, self._types) if closed else None
        if call is not None and self._names is not None and call[0] not in self._names:
            call = None  # a function the request did not offer (or, tool_choice named, not that one)
        pre, self._pre = self._pre, ""
        if call is None:  # not a call: the text it was
            self._emit_content(out, pre + CALL + body + (END_CALL if closed else ""))
            return
        pre = pre[:-1] if pre.endswith("\n") else pre
        if not (self._after_call and not pre.strip()):
            self._after_call = False
            _add(out, "content", pre)
        name, arguments = call
        out.append({"tool_calls": [{"index": self._n_calls, "id": new_call_id(), "type": "function",
                                    "function": {"name": name, "arguments": arguments}}]})
        self._n_calls += 1
        self._after_call, self._held_space, self._spoken = True, "", False


def _add(out: list[dict], key: str, text: str) -> None:
    if text:
        out.append({key: text})


def _merge(deltas: list[dict]) -> list[dict]:
    """Neighbouring text deltas of one kind joined: fewer, larger SSE events."""
    out: list[dict] = []
    for d in deltas:
        if out and "tool_calls" not in d and d.keys() == out[-1].keys() and "tool_calls" not in out[-1]:
            key = next(iter(d))
            out[-1] = {key: out[-1][key] + d[key]}
        else:
            out.append(d)
    return out


def _first(text: str, tags: tuple[str, ...]) -> tuple[int, str | None]:
    """The earliest of `tags` in `text`: (position, tag), or (-1, None)."""
    best = (-1, None)
    for tag in tags:
        at = text.find(tag)
        if at >= 0 and (best[1] is None or at < best[0]):
            best = (at, tag)
    return best


def _cut_tail(text: str, keep: int) -> int:
    """Of a held-back tail at the end of a cut reply, what to drop as a tag's start: not its
    leading newline (the text's own), and nothing shorter than two characters (a lone `<` may be
    a word's)."""
    tail = text[len(text) - keep:] if keep else ""
    if tail.startswith("\n"):
        keep -= 1
    return keep if keep >= 2 else 0


def _held_back(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the start of one of `tags` (it may become one)."""
    for n in range(min(len(text), max(map(len, tags), default=1) - 1), 0, -1):
        end = text[-n:]
        if any(t.startswith(end) for t in tags):
            return n
    return 0


def _string_parameters(tools) -> dict[str, dict[str, frozenset[str] | None]]:
    """function name -> {parameter: the JSON types its schema allows (None: any)}, from OpenAI specs."""
    out: dict[str, dict[str, frozenset[str] | None]] = {}
    for tool in tools or ():
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            continue
        params = fn.get("parameters")
        props = params.get("properties") if isinstance(params, dict) else None
        if isinstance(props, dict):
            refs: dict = {}  # each $ref resolved once per tool
            out[fn["name"]] = {k: _allowed_types(v, params, refs) for k, v in props.items()}
    return out


_JSON_TYPES = frozenset(("string", "number", "integer", "boolean", "null", "array", "object"))


_RESOLVING = object()  # a $ref being resolved: met again, it is a cycle (any type)


def _allowed_types(schema, root: dict, refs: dict, depth: int = 0) -> frozenset[str] | None:
    """The JSON types a parameter's schema allows: `type` (one or a list), `enum`/`const`, the union
    of `anyOf`/`oneOf` branches (pydantic writes `str | None` so), a local `$ref` followed into
    `$defs`/`definitions`; None when the schema does not say (any type). `refs` memoizes each
    $ref, and a $ref that leads back to itself allows any type: a schema of a few hundred bytes
    with nested branches to one $ref took seconds to minutes, walked path by path."""
    if not isinstance(schema, dict) or depth > 64:
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        if ref in refs:
            known = refs[ref]
            return None if known is _RESOLVING else known
        refs[ref] = _RESOLVING
        target = root
        for part in ref[2:].split("/"):
            target = target.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(target, dict) else None
        refs[ref] = _allowed_types(target, root, refs, depth + 1)
        return refs[ref]
    kind = schema.get("type")
    if isinstance(kind, str):
        return frozenset((kind,)) if kind in _JSON_TYPES else None
    if isinstance(kind, list) and kind and all(k in _JSON_TYPES for k in kind):
        return frozenset(kind)
    values = schema["enum"] if isinstance(schema.get("enum"), list) else [schema["const"]] if "const" in schema else None
    if values:
        return frozenset(_json_type(v) for v in values)
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and branches:
            types = []
            for b in branches:
                t = _allowed_types(b, root, refs, depth + 1)
                if t is None:  # one branch of any type: the union is any type
                    return None
                types.append(t)
            return frozenset().union(*types)
    if isinstance(schema.get("allOf"), list):
        for branch in schema["allOf"]:
            if (types := _allowed_types(branch, root, refs, depth + 1)) is not None:
                return types
    return None


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}.get(type(value), "object")


def _argument(value: str, types: frozenset[str] | None):
    """A parameter's value from the text the template wrote: as it is where the schema allows
    only a string; where it allows a string among others, the JSON value only when that value is
    of one of the others (`str | None`: "12345" stays text, "null" is null); else the JSON value,
    or the text where it is no JSON."""
    if types is None or "string" not in types:
        return _json_or_text(value)
    if types == {"string"}:
        return value
    parsed = _json_or_text(value)
    kind = _json_type(parsed)
    others = types - {"string"}
    if parsed is not value and (kind in others or (kind == "integer" and "number" in others)):
        return parsed
    return value


def _parse_call(body: str, param_types: dict[str, dict[str, frozenset[str] | None]]) -> tuple[str, str] | None:
    """(name, arguments JSON text) of a `<tool_call>` block's body, or None if it is not one."""
    if body.strip().startswith("{"):
        return _parse_json_call(body)
    m = _FUNCTION.fullmatch(body)
    if m is None:
        return None
    name, inner = m.group(1).strip(), m.group(2)
    if not name:
        return None
    args: dict = {}
    at = 0
    for p in _PARAMETER.finditer(inner):
        if p.start() != at:
            return None  # stray text between parameters
        key, value = p.group(1).strip(), p.group(2)
        value = value[1:] if value.startswith("\n") else value
        value = value[:-1] if value.endswith("\n") else value
        if not key or key in args:
            return None
        args[key] = _argument(value, param_types.get(name, {}).get(key))
        at = p.end()
    if inner[at:].strip():
        return None
    return name, _arguments_text(args)


def _arguments_text(args: dict) -> str:
    """`arguments` as JSON text: characters as they are, unless a value holds a lone surrogate
    (JSON's `\ud800` read alone), which no UTF-8 response can carry: then every non-ASCII
    character is escaped, as JSON allows."""
    text = json.dumps(args, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(args)
    return text


def _json_or_text(value: str):
    """A value the template wrote as JSON (not a string), or else the text itself. NaN and
    Infinity are text, written so or overflowing (`1e999`): they are not JSON, and `arguments`
    must be."""
    try:
        parsed = json.loads(value, parse_constant=_not_json)
    except ValueError:
        return value
    return parsed if _finite(parsed) else value


def _finite(value) -> bool:
    """Whether a parsed JSON value holds no infinite number (json.loads reads 1e999 as inf)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def _not_json(name: str):
    raise ValueError(name)


def _parse_json_call(body: str) -> tuple[str, str] | None:
    try:
        obj = json.loads(body, parse_constant=_not_json)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"].strip():
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args, parse_constant=_not_json)
        except ValueError:
            return None
    if not isinstance(args, dict) or not _finite(args):  # NaN or an infinity: no JSON `arguments`
        return None
    return obj["name"].strip(), _arguments_text(args)
