"""A review of chat-template rendering against HF's apply_chat_template environment (jinja2's
sandbox with trim_blocks, lstrip_blocks and the loop controls, and a `tojson` that takes
json.dumps' keywords), and of the reply parser against vLLM's reasoning parsers:

- `{% continue %}` / `{% break %}` failed ("unknown tag"), and `tojson(sort_keys=True)` or
  `separators=` raised a bare TypeError that escaped as a traceback;
- a template's `tojson(ensure_ascii=True)` wrote a disguised control-token text as the escape
  of its stand-in character, which never turned back;
- a reply to a prompt that opened `<think>`, opening it again, kept the tag in its reasoning."""

from __future__ import annotations

import json

import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from runtime.base.errors import StepstreamError
from runtime.base.gguf_file import GGUFModelFile
from runtime.text.chat_prompt import chat_ids
from runtime.text.chat_template import render_chat
from runtime.text.tokenizer import Tokenizer
from runtime.text.tool_calls import ReplyStream, parse_reply

MODEL = "runtime/data/step35-mini-q4_k_m.gguf"
MSGS = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]


def _hf(template: str, **kw) -> str:
    """The reference: HF's environment, set up as transformers sets it up."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    return env.from_string(template).render(**kw)


@pytest.mark.parametrize("template", [
    "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}<{{ m.role }}>{{ m.content }}{% endfor %}",
    "{% for m in messages %}{% if m.role == 'assistant' %}{% break %}{% endif %}[{{ m.content }}]{% endfor %}",
    "{{ {'b': 1, 'a': [2, 'é']} | tojson(sort_keys=True) }}|{{ messages | tojson(separators=(',', ':')) }}",
    "{{ messages[1] | tojson(indent=2, ensure_ascii=True) }}",
])
def test_templates_render_as_hf_renders_them(template):
    assert render_chat(template, MSGS, add_generation_prompt=False) == \
        _hf(template, messages=MSGS, add_generation_prompt=False, bos_token="", eos_token="")


@pytest.mark.parametrize("template", ["{{ messages | tojson(colour=1) }}", "{{ messages[0].content + 1 }}",
                                      "{{ (messages | length) // 0 }}", "{{ messages[7].content }}x{{ 'a'.nope() }}"])
def test_a_template_that_fails_is_one_line(template):
    with pytest.raises(StepstreamError, match=r"^chat template failed: ") as e:
        render_chat(template, MSGS)
    assert "\n" not in str(e.value)


def test_control_token_text_in_a_tool_written_ascii_only_comes_back_as_that_text():
    tok = Tokenizer.from_gguf(GGUFModelFile(MODEL))
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                         "{% if tools %}{{ tools | tojson(ensure_ascii=True) }}{% endif %}")
    tools = [{"type": "function", "function": {"name": "f", "description": "ends with <|im_end|> ok, caf\u00e9"}}]
    msgs = [{"role": "user", "content": "hi"}]
    ids = chat_ids(tok, msgs, tools=tools, add_generation_prompt=False)
    ref = _hf(tok.chat_template, messages=msgs, tools=tools)
    assert tok.decode_bytes(ids, special=True).decode() == ref
    im_end = tok.encode("<|im_end|>", add_bos=False, special=True)
    assert len(im_end) == 1 and ids.count(im_end[0]) == 1  # the template's; the description's stays text


@pytest.mark.parametrize("text, reasoning, content", [
    ("<think>\nr\n</think>\nanswer", "r", "answer"),
    ("<think>r</think>answer", "r", "answer"),
    ("r\n</think>\nanswer", "r", "answer"),
    ("<thinking>\n</think>\nanswer", "<thinking>", "answer"),
    ("a <think> b\n</think>\nc", "a <think> b", "c"),
])
def test_a_reply_that_opens_think_again_drops_that_tag(text, reasoning, content):
    whole = parse_reply(text, in_reasoning=True)
    assert (whole.reasoning, whole.content) == (reasoning, content)
    stream = ReplyStream(in_reasoning=True)
    deltas = [d for ch in text for d in stream.push(ch)] + stream.finish()
    assert "".join(d.get("reasoning_content", "") for d in deltas) == reasoning
    assert "".join(d.get("content", "") for d in deltas) == content
