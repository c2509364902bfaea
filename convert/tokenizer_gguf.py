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
# A plain ByteLevel pre-tokenizer splits with GPT-2's own regex; llama.cpp's name for it has a hyphen
# ("gpt2" is the name of the tokenizer *model*, tokenizer.ggml.model, and llama.cpp refuses it here).
GPT2_PRE = "gpt-2"
# Every pre-tokenizer name detect_pre can write; tests load a converted file for each in llama.cpp.
EMITTED_PRE_NAMES = (GPT2_PRE, *dict.fromkeys(KNOWN_SPLIT_REGEXES.values()))

_OVERRIDE = "pass --tokenizer-pre NAME (a llama.cpp pre-tokenizer name) to choose one"

# The pre-tokenizer names llama.cpp's loader accepts (src/llama-vocab.cpp, late 2026); any other
# name makes llama.cpp refuse the file ("unknown pre-tokenizer type"), so --tokenizer-pre is
# checked against them.
LLAMA_CPP_PRE_NAMES = frozenset("""
    default minicpm5 llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano
    deepseek-llm deepseek-coder deepseek-v3 youtu falcon mpt starcoder gpt-2 phi-2 jina-es jina-de
    gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert jais-2 gemma4 granite-embed-multi-311m
    sarvam-moe jina-v1-en jina-v2-code roberta-bpe whitespace refact command-r qwen2 deepseek-r1-qwen
    kormo f2llmv2 qwen35 stablelm2 olmo dbrx smaug-bpe poro-chat glm4 glm5 chatglm-bpe viking jais
    tekken smollm codeshell bloom gpt3-finnish exaone exaone4 exaone-moe chameleon minerva-7b megrez
    gpt-4o llama4 kanana2 granite-embed-multi-97m tiny_aya cohere2moe superbpe trillion
    granite-docling bailingmoe bailingmoe2 llada-moe seed-coder hunyuan hunyuan-dense joyai-llm
    kimi-k2 grok-2 afmoe minimax-m2 solar-open mellum2 ufakzeka laguna talkie
""".split())


def check_pre_name(name: str) -> str:
    """`name` if llama.cpp's loader knows it, else one line with the nearest known names."""
    if name in LLAMA_CPP_PRE_NAMES:
        return name
    import difflib

    near = difflib.get_close_matches(name, sorted(LLAMA_CPP_PRE_NAMES), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(near)}?" if near else f" (names of the split regexes stepstream " \
        f"recognises: {', '.join(EMITTED_PRE_NAMES)})"
    raise StepstreamError(f"--tokenizer-pre {name!r}: llama.cpp knows no pre-tokenizer of that name, and would "
                          f"refuse the file{hint}")


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


def _steps(pre) -> list:
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        return list(pre.get("pretokenizers") or [])
    return [pre]


def _byte_level(step, source: str) -> dict | None:
    """The step if it is a ByteLevel llama.cpp reproduces (no prefix space), else None."""
    if not isinstance(step, dict) or step.get("type") != "ByteLevel":
        return None
    if step.get("add_prefix_space", True):
        raise StepstreamError(f"{source}: the ByteLevel pre-tokenizer adds a prefix space, which llama.cpp's BPE never does; "
                              "a converted file would tokenize differently")
    return step


def detect_pre(tokenizer: dict, source: str) -> str:
    """llama.cpp's name for tokenizer.json's pre-tokenizer, for the two shapes llama.cpp reproduces.

    Either a lone ByteLevel splitting with its own (GPT-2) regex, or one isolating Split regex
    followed by a ByteLevel that only maps bytes. Anything else would cut text differently in
    llama.cpp, so it is refused rather than given a name that merely loads.
    """
    steps = _steps(tokenizer.get("pre_tokenizer"))
    if len(steps) == 1 and (bl := _byte_level(steps[0], source)) is not None:
        if bl.get("use_regex", True):
            return GPT2_PRE
        raise StepstreamError(f"{source}: the pre-tokenizer is a ByteLevel without a split regex; {_OVERRIDE}")
    if len(steps) == 2 and isinstance(steps[0], dict) and steps[0].get("type") == "Split":
        split, bl = steps[0], _byte_level(steps[1], source)
        regex = (split.get("pattern") or {}).get("Regex") if isinstance(split.get("pattern"), dict) else None
        if bl is not None and not bl.get("use_regex", True) and regex is not None \
                and split.get("behavior") == "Isolated" and not split.get("invert", False):
            if regex in KNOWN_SPLIT_REGEXES:
                return KNOWN_SPLIT_REGEXES[regex]
            raise StepstreamError(f"{source}: split regex {regex!r} is not one llama.cpp implements under a known name; {_OVERRIDE}")
    kinds = [s.get("type") if isinstance(s, dict) else type(s).__name__ for s in steps]
    raise StepstreamError(f"{source}: pre-tokenizer {' + '.join(map(str, kinds))} is not a shape llama.cpp reproduces "
                          f"(a ByteLevel, or one isolating Split regex then a ByteLevel without regex); {_OVERRIDE}")


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
        pre=check_pre_name(pre_override) if pre_override else detect_pre(tok, str(path)),
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
