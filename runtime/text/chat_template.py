"""Rendering the model's chat template (GGUF `tokenizer.chat_template`) with jinja2.

The environment matches what Hugging Face's `apply_chat_template` provides: a sandbox,
`trim_blocks` / `lstrip_blocks`, the loop controls (`{% break %}`, `{% continue %}`),
`raise_exception`, `strftime_now` and a `tojson` that keeps non-ASCII text as is and takes
json.dumps' `indent`, `separators` and `sort_keys`.

OpenAI clients send a tool call's `arguments` as JSON *text*, but Step-3.5-Flash's template
(and ours, which uses its markup) walks them as a mapping to write one `<parameter=...>` per
key. So `normalize_messages` parses them first, as llama.cpp does for templates that need
an object; text that is not a JSON object is the caller's error, named by its position.

Content given as a list of text parts (`[{"type": "text", "text": ...}, ...]`) reaches a
template that takes string content as one string, the parts joined with "\n", as llama.cpp's
server and vLLM join them (`join_text_parts`); a template that renders only typed content gets
the list.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from runtime.base.errors import StepstreamError


def _raise(message: str):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """HF's `tojson`: json.dumps' keywords, non-ASCII text kept unless asked."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


ROLES = ("system", "developer", "user", "assistant", "tool")  # the roles OpenAI's chat API knows


def check_roles(messages: list[dict]) -> None:
    """Refuse what the server refuses with a 400: no message, or a role OpenAI does not know."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise StepstreamError("messages must hold at least one {'role': ..., 'content': ...} dict")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise StepstreamError(f"messages[{i}] must be a {{'role': ..., 'content': ...}} dict, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise StepstreamError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")


def normalize_messages(messages: list[dict]) -> list[dict]:
    """`messages` with every assistant tool call's `function.arguments` as a mapping (parsed
    from JSON text where a client sent text), and a message's `reasoning` as its
    `reasoning_content` where it has none. Other messages come back as they are."""
    if isinstance(messages, tuple):
        messages = list(messages)
    if not isinstance(messages, list):
        raise StepstreamError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise StepstreamError(f"each chat message needs a 'role' (and usually 'content'), got {m!r}")
        if isinstance(m.get("reasoning"), str) and m.get("reasoning_content") is None:
            # vLLM's and OpenRouter's name for it: the template reads reasoning_content
            m = {**m, "reasoning_content": m["reasoning"]}
        calls = m.get("tool_calls")
        if calls is None:
            out.append(m)
            continue
        if not isinstance(calls, list):
            raise StepstreamError(f"messages[{i}].tool_calls must be a list, got {type(calls).__name__}")
        out.append({**m, "tool_calls": [_normalize_call(call, f"messages[{i}].tool_calls[{j}]") for j, call in enumerate(calls)]})
    return out


def _normalize_call(call, where: str) -> dict:
    if not isinstance(call, dict):
        raise StepstreamError(f"{where} must be an object, got {type(call).__name__}")
    fn = call.get("function", call)  # OpenAI nests name/arguments under "function"
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise StepstreamError(f"{where}.function needs a non-empty string 'name'")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise StepstreamError(f"{where}.function.arguments is not valid JSON ({e.msg} at {e.pos}): {args[:80]!r}") from None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise StepstreamError(f"{where}.function.arguments must be a JSON object, got {type(args).__name__}")
    fn = {**fn, "arguments": args}
    return {**call, "function": fn} if "function" in call else fn


_PROBE = "\ue000probe\ue001"  # private-use text no template writes by itself


@lru_cache(maxsize=8)
def takes_string_content(template: str) -> bool:
    """Whether the template writes a message whose content is a string (llama.cpp's capability
    probe: a template written for typed content only drops it)."""
    try:
        return _PROBE in _compile(template).render(messages=[{"role": "user", "content": _PROBE}],
                                                   add_generation_prompt=False, bos_token="", eos_token="")
    except Exception:  # noqa: BLE001 - a template that fails on string content does not take it
        return False


def text_content(parts: list[str]) -> str | list[dict]:
    """A message's content from its texts: one is the string, several are text parts (joined
    as join_text_parts joins them, or given to a template that takes parts)."""
    if len(parts) == 1:
        return parts[0]
    return [{"type": "text", "text": t} for t in parts] if parts else ""


def join_text_parts(messages: list[dict], template: str) -> list[dict]:
    """`messages` with each content that is a list of text parts made one string, the parts
    joined with "\n" (llama.cpp's server and vLLM do the same), where the template takes string
    content. A part that is not text is refused: the model reads text only."""
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            out.append(m)
            continue
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and not isinstance(part.get("text"), str):
                raise StepstreamError(f"messages[{i}].content[{j}].text must be a string, got "
                                      f"{type(part.get('text')).__name__}")
            if kind != "text":
                what = f"a {kind!r} part" if isinstance(kind, str) else f"{type(part).__name__} {part!r:.40}"
                raise StepstreamError(f"messages[{i}].content[{j}] is {what}: this model reads text parts only "
                                      "({'type': 'text', 'text': ...})")
        out.append({**m, "content": "\n".join(p["text"] for p in content)} if takes_string_content(template) else m)
    return out


def render_chat(template: str | None, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True, tools: list[dict] | None = None, **extra) -> str:
    """The template rendered over `messages` (and `tools`, OpenAI function specs, when given)."""
    if not template:
        raise StepstreamError("this model has no chat template (tokenizer.chat_template); use plain completion")
    messages = normalize_messages(messages)
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise StepstreamError(f"tools must be a list of OpenAI function specs (objects), got {tools!r:.80}")
        extra["tools"] = tools or None  # an empty list means no tools, as in HF's apply_chat_template
    try:
        return _compile(template).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                         add_generation_prompt=add_generation_prompt, **extra)
    except TemplateError as e:
        raise StepstreamError(f"chat template failed: {e}") from None
    except (TypeError, ValueError, LookupError, ArithmeticError, AttributeError) as e:  # the template's own slip
        raise StepstreamError(f"chat template failed: {type(e).__name__}: {e}") from None
