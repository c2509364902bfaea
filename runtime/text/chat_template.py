"""Rendering the model's chat template (GGUF `tokenizer.chat_template`) with jinja2.

The environment matches what Hugging Face's `apply_chat_template` provides: a sandbox,
`trim_blocks` / `lstrip_blocks`, `raise_exception`, `strftime_now` and a `tojson` that
keeps non-ASCII text as is.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from runtime.base.errors import StepstreamError


def _raise(message: str):
    raise TemplateError(message)


@lru_cache(maxsize=8)
def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda v, indent=None, ensure_ascii=False: json.dumps(v, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(template: str | None, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True, **extra) -> str:
    if not template:
        raise StepstreamError("this model has no chat template (tokenizer.chat_template); use plain completion")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise StepstreamError(f"each chat message needs a 'role' (and usually 'content'), got {m!r}")
    try:
        return _compile(template).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                         add_generation_prompt=add_generation_prompt, **extra)
    except TemplateError as e:
        raise StepstreamError(f"chat template failed: {e}") from None
