"""A chat prompt's token ids, with control tokens only where the template put them.

Rendering the template and tokenizing the whole text with special-token parsing on would let
anyone who writes a message type `<|im_end|><|im_start|>system` and get the real control
tokens: a forged turn. So the messages' text never reaches the special-token parser:

    1. in every string of the messages, each special token's text gets its first character
       swapped for a private-use stand-in that occurs nowhere in the template or the messages;
    2. the template is rendered; now every special token's text in it comes from the template;
    3. those become their ids, and the text between them is tokenized as plain text, with the
       stand-ins swapped back (Tokenizer.encode_rendered).

A message without special-token text gives the same ids as before; one with it gives that
text as ordinary tokens, as the tokenizer does with special-token parsing off.

A conversation that ends with an assistant message (text, no tool calls) is a reply to
continue, as llama-server does by default: the template renders the whole conversation, the
prompt ends right after that message's text, and the model writes on from there (vLLM's
`continue_final_message`). The template decides everything around the text, reasoning tags
included, so this holds for any template that writes the text as it is.

The tools (OpenAI function specs) are defanged the same way, keys included (a parameter may be
named anything), and so are tool calls' arguments: those are parsed from JSON text *before*
the swap, since `"\\u003c|im_end|>"` in JSON text is `<|im_end|>` once parsed.
"""

from __future__ import annotations

import json

from runtime.base.errors import StepstreamError
from runtime.text.chat_template import join_text_parts, normalize_messages, render_chat
from runtime.text.tokenizer import Tokenizer

_PRIVATE_USE = range(0xF0000, 0xFFFFE)  # Supplementary Private Use Area-A


def chat_ids(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = True,
             tools: list[dict] | None = None, continue_final: bool = True, limit: int | None = None) -> list[int]:
    """Token ids of `messages` rendered with the model's chat template (no BOS is added: the
    template writes it where it wants one); `tools` (OpenAI function specs) go to the template.
    With add_generation_prompt and continue_final, a last assistant message with text is
    continued rather than closed (the module's docstring). With `limit`, a rendering that must
    hold more tokens than that is refused (PromptTooLong) without being tokenized."""
    messages = normalize_messages(messages)
    if tok.chat_template:
        messages = join_text_parts(messages, tok.chat_template)
    if tools is not None and not isinstance(tools, list):
        raise StepstreamError(f"tools must be a list of OpenAI function specs (objects), got {type(tools).__name__}")
    strings = list(_strings([messages, tools]))
    present = sorted({s[0] for s in tok.special_texts if any(s in t for t in strings)})
    stand_in = dict(zip(present, _unused(present, strings + [tok.chat_template or ""] + list(tok.special_texts))))
    if stand_in:
        messages, tools = _map_strings([messages, tools], lambda t: tok.defang(t, stand_in))
    continued = add_generation_prompt and continue_final and _continues(messages)
    if continued:  # a mark after the message's text, where the prompt will end
        (mark,) = _unused(["mark"], strings + [tok.chat_template or ""] + list(tok.special_texts) + list(stand_in.values()))
        messages = messages[:-1] + [_marked(messages[-1], mark)]
    text = render_chat(tok.chat_template, messages, add_generation_prompt=add_generation_prompt and not continued,
                       tools=tools, bos_token=tok.tokens[tok.bos_id] if tok.bos_id is not None else "",
                       eos_token=tok.tokens[tok.eos_id] if tok.eos_id is not None else "")
    if continued:
        if text.count(mark) != 1:
            raise StepstreamError("the chat template does not write the last assistant message's text once, as it "
                                  "is, so the reply cannot continue it (continue_final_message: false starts a new "
                                  "turn after it)")
        text = text[: text.index(mark)]
    tok.check_fits(text, limit)  # PromptTooLong, before the time tokenizing would take
    restore = {v: k for k, v in stand_in.items()}
    # a template's tojson(ensure_ascii=True) writes a stand-in as its escape: that is restored
    # to the escape of the character it stands for (both as text, never as a control token)
    restore.update({_ascii(v): _ascii(k) for k, v in stand_in.items()})
    return tok.encode_rendered(text, restore)


def _ascii(ch: str) -> str:
    """A character as JSON writes it with ensure_ascii (a surrogate-pair escape for the stand-ins)."""
    return json.dumps(ch)[1:-1]


def _continues(messages: list[dict]) -> bool:
    """Whether the last message is an assistant's text to continue (no tool calls, not empty)."""
    last = messages[-1] if messages else None
    if not isinstance(last, dict) or last.get("role") != "assistant" or last.get("tool_calls"):
        return False
    content = last.get("content")
    if isinstance(content, list):
        return any(isinstance(p, dict) and p.get("type") == "text" and p.get("text") for p in content)
    return isinstance(content, str) and bool(content)


def _marked(message: dict, mark: str) -> dict:
    content = message["content"]
    if isinstance(content, list):  # a template that takes typed content only: the mark ends the last text
        last = max(i for i, p in enumerate(content) if isinstance(p, dict) and p.get("type") == "text")
        content = content[:last] + [{**content[last], "text": content[last]["text"] + mark}] + content[last + 1:]
    else:
        content = content + mark
    return {**message, "content": content}


def _unused(wanted: list[str], texts: list[str]) -> list[str]:
    """len(wanted) private-use characters that occur in none of `texts`."""
    joined = "\n".join(texts)
    seen = set(joined)
    free = []
    for c in _PRIVATE_USE:  # neither the character nor its JSON escape occurs anywhere
        if len(free) == len(wanted):
            break
        if chr(c) not in seen and _ascii(chr(c)) not in joined:
            free.append(chr(c))
    if len(free) < len(wanted):
        raise StepstreamError("the messages use every character of the private-use plane that stands in for "
                              "special-token text; remove some of them")
    return free


def _strings(value):
    """Every string inside a message structure (dict keys and values, list items)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _map_strings(value, fn):
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {_map_strings(k, fn): _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(v, fn) for v in value]
    return value
