"""The checkpoint's tokenizer, as GGUF metadata llama.cpp understands.

llama.cpp rebuilds a byte-level BPE from the token list, the merges and a *pre-tokenizer
name* that selects its split regex. llama.cpp's own converter recognises the name by
hashing tokenizer output; we read the split regex from tokenizer.json instead and look it
up in a table of the regexes llama.cpp implements. The original tokenizer.json text is
stored too, so our runtime can rebuild the exact Hugging Face tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf

from runtime.base.errors import StepstreamError
from runtime.base.gguf_schema import Key

# Split regex found in tokenizer.json -> llama.cpp pre-tokenizer name (src/llama-vocab.cpp).
KNOWN_SPLIT_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen35",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}


@dataclass(frozen=True)
class TokenizerData:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    hf_json: str


def _split_regexes(node) -> list[str]:
    if isinstance(node, dict):
        found = []
        if node.get("type") == "Split" and isinstance(node.get("pattern"), dict) and "Regex" in node["pattern"]:
            found.append(node["pattern"]["Regex"])
        for v in node.values():
            found += _split_regexes(v)
        return found
    if isinstance(node, list):
        return [r for v in node for r in _split_regexes(v)]
    return []


def detect_pre(tokenizer: dict, source: str) -> str:
    regexes = _split_regexes(tokenizer.get("pre_tokenizer"))
    if not regexes:
        pre = tokenizer.get("pre_tokenizer") or {}
        if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
            return "gpt2"
        raise StepstreamError(f"{source}: no split regex in pre_tokenizer; pass --tokenizer-pre NAME (a llama.cpp pre-tokenizer name)")
    if len(regexes) == 1 and regexes[0] in KNOWN_SPLIT_REGEXES:
        return KNOWN_SPLIT_REGEXES[regexes[0]]
    raise StepstreamError(
        f"{source}: split regex {regexes[0]!r} is not one llama.cpp implements under a known name; "
        "pass --tokenizer-pre NAME to choose one"
    )


def _token_content(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


def read_tokenizer(hf_dir: Path, vocab_size: int, pre_override: str | None = None) -> TokenizerData:
    path = hf_dir / "tokenizer.json"
    try:
        text = path.read_text(encoding="utf-8")
        tok = json.loads(text)
    except FileNotFoundError:
        raise StepstreamError(f"{path}: not found; the converter needs the Hugging Face tokenizer.json") from None
    except json.JSONDecodeError as e:
        raise StepstreamError(f"{path}: invalid JSON ({e})") from None
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise StepstreamError(f"{path}: tokenizer model is {model.get('type')!r}; Step-3.5 uses byte-level BPE")

    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types: dict[int, int] = {}
    for added in tok.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    n = max(by_id) + 1
    if n > vocab_size:
        raise StepstreamError(f"{path}: token id {n - 1} does not fit config vocab_size={vocab_size}")
    tokens, toktypes = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            toktypes.append(types.get(i, gguf.TokenType.NORMAL))
        else:  # padding rows of the embedding, as llama.cpp's converter names them
            tokens.append(f"[PAD{i}]")
            toktypes.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    cfg_path = hf_dir / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    ids = {t: i for i, t in enumerate(tokens)}

    def special_id(key: str) -> int | None:
        content = _token_content(tcfg.get(key))
        if content is None:
            return None
        if content not in ids:
            raise StepstreamError(f"{cfg_path}: {key} {content!r} is not a token of {path.name}")
        return ids[content]

    template = tcfg.get("chat_template")
    if isinstance(template, list):  # named templates: keep the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return TokenizerData(
        tokens=tokens,
        types=[int(t) for t in toktypes],
        merges=merges,
        pre=pre_override or detect_pre(tok, str(path)),
        bos_id=special_id("bos_token"),
        eos_id=special_id("eos_token"),
        pad_id=special_id("pad_token"),
        add_bos=bool(tcfg.get("add_bos_token", False)),
        add_eos=bool(tcfg.get("add_eos_token", False)),
        chat_template=template,
        hf_json=text,
    )


def add_tokenizer(writer: gguf.GGUFWriter, t: TokenizerData) -> None:
    writer.add_string(Key.TOK_MODEL, "gpt2")
    writer.add_string(Key.TOK_PRE, t.pre)
    writer.add_array(Key.TOK_LIST, t.tokens)
    writer.add_array(Key.TOK_TYPES, t.types)
    writer.add_array(Key.TOK_MERGES, t.merges)
    if t.bos_id is not None:
        writer.add_uint32(Key.TOK_BOS, t.bos_id)
    if t.eos_id is not None:
        writer.add_uint32(Key.TOK_EOS, t.eos_id)
    if t.pad_id is not None:
        writer.add_uint32(Key.TOK_PAD, t.pad_id)
    writer.add_bool(Key.TOK_ADD_BOS, t.add_bos)
    writer.add_bool(Key.TOK_ADD_EOS, t.add_eos)
    if t.chat_template:
        writer.add_string(Key.CHAT_TEMPLATE, t.chat_template)
    writer.add_string(Key.HF_JSON, t.hf_json)
