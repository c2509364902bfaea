"""A byte-level BPE tokenizer trained offline with the `tokenizers` library.

It uses the Qwen2-style split regex (the one llama.cpp calls pre-tokenizer "qwen2"), so
llama.cpp and `tokenizers` cut text the same way. The corpus is the Python standard
library's own sources on this machine plus a short multilingual text, read in sorted
order so the same inputs train the same merges.
"""

from __future__ import annotations

import json
from pathlib import Path

from convert.corpus import stdlib_corpus
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BOS, EOS, IM_START, IM_END = "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END]

# Our own template in Step-3.5-Flash's markup (llama.cpp's models/templates/
# stepfun-ai-Step-3.5-Flash.jinja): ChatML turns; the tools as JSON lines inside <tools> in
# the system turn; a call as <tool_call><function=NAME><parameter=KEY>VALUE</parameter>...;
# results as <tool_response> blocks in one `tool_response` turn; reasoning in <think>.
# Differences from theirs, for prompt-prefix reuse (runtime/text/tool_calls.py parses the
# reply with the inverse layout): the generation prompt does not open <think>, an earlier
# turn's reasoning is kept in every turn (theirs drops it once a new user turn comes, which
# changes an already-evaluated prefix), and a call after content or after another call is
# set on its own line. A string argument is written as is, any other value as JSON.
CHAT_TEMPLATE = (
    "{%- macro text(c) -%}"
    "{%- if c is none -%}"
    "{%- elif c is string -%}{{ c }}"
    "{%- elif c is mapping -%}{{ c | tojson }}"
    "{%- elif c is iterable -%}"
    "{%- for part in c -%}{%- if part is mapping and part.type == 'text' -%}{{ part.text }}{%- endif -%}{%- endfor -%}"
    "{%- else -%}{{ c | string }}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages and messages[0].role == 'system' -%}{{- text(messages[0].content) + '\\n\\n' -}}{%- endif -%}"
    "{{- '# Tools\\n\\nThese functions are available, each given as a JSON Schema:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nTo call functions, end your reply with one block per call:\\n'"
    " + '<tool_call>\\n<function=NAME>\\n<parameter=ARGUMENT>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>\\n'"
    " + 'Write a string VALUE as it is and any other VALUE as JSON.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if tools and loop.first and message.role == 'system' -%}"
    "{%- elif message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if message.reasoning_content is string and message.reasoning_content -%}"
    "{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n' -}}"
    "{%- endif -%}"
    "{%- set content = text(message.content) -%}"
    "{{- content -}}"
    "{%- for call in message.tool_calls or [] -%}"
    "{%- set f = call.function if call.function is defined else call -%}"
    "{%- if content or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>\\n<function=' + f.name + '>\\n' -}}"
    "{%- for key, value in (f.arguments or {}).items() -%}"
    "{{- '<parameter=' + key + '>\\n' + (value if value is string else value | tojson) + '\\n</parameter>\\n' -}}"
    "{%- endfor -%}"
    "{{- '</function>\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>tool_response\\n' -}}{%- endif -%}"
    "{{- '<tool_response>' + text(message.content) + '</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + text(message.content) + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

def train_tokenizer(vocab_size: int, corpus_bytes: int = 2_000_000, texts: list[str] | None = None) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts if texts is not None else stdlib_corpus(corpus_bytes), trainer=trainer)
    return tok


def write_tokenizer_files(tok: Tokenizer, out_dir: Path) -> None:
    (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=False), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": IM_END,
        "pad_token": EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 65536,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
