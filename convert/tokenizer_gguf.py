"""The checkpoint's tokenizer, as GGUF metadata llama.cpp understands.

llama.cpp rebuilds a byte-level BPE from the token list, the merges and a *pre-tokenizer
name* that selects its split regex. llama.cpp's own converter recognises the name by
hashing tokenizer output; we read the split regex from tokenizer.json instead and look it
up in a table of the regexes llama.cpp implements. The original tokenizer.json text is
stored too, so our runtime can rebuild the exact Hugging Face tokenizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from runtime.base.errors import StepstreamError
from runtime.base.gguf_schema import Key

from convert.hf_config import JsonFields, read_json_object, read_text, shown, warn

# Split regexes found in tokenizer.json, in order (each an isolating Split, then a ByteLevel that
# only maps bytes) -> llama.cpp pre-tokenizer name (src/llama-vocab.cpp).
KNOWN_SPLIT_REGEXES = {
    (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",): "qwen2",
    (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",): "qwen35",
    (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",): "llama-bpe",
    # DeepSeek-V3's three (digit runs of up to 3, CJK and kana runs, then words and punctuation);
    # a public test of StepFun's Step-3.7 GGUF finds "deepseek-v3" there
    (r"\p{N}{1,3}",
     "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
     "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|"
     "\\s*[\r\n]+|\\s+(?!\\S)|\\s+"): "deepseek-v3",
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
    named_templates: dict[str, str] = field(default_factory=dict)  # gguf-py's tokenizer.chat_template.{name}


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


def _split_regex(step) -> str | None:
    """The regex of an isolating, non-inverted Split step, else None."""
    if not isinstance(step, dict) or step.get("type") != "Split":
        return None
    pattern = step.get("pattern")
    regex = pattern.get("Regex") if isinstance(pattern, dict) else None
    if isinstance(regex, str) and step.get("behavior") == "Isolated" and not step.get("invert", False):
        return regex
    return None


def detect_pre(tokenizer: dict, source: str) -> str:
    """llama.cpp's name for tokenizer.json's pre-tokenizer, for the shapes llama.cpp reproduces.

    Either a lone ByteLevel splitting with its own (GPT-2) regex, or isolating Split regexes
    (one, or DeepSeek-V3's three) followed by a ByteLevel that only maps bytes. Anything else
    would cut text differently in llama.cpp, so it is refused rather than given a name that
    merely loads.
    """
    steps = _steps(tokenizer.get("pre_tokenizer"))
    if len(steps) == 1 and (bl := _byte_level(steps[0], source)) is not None:
        if bl.get("use_regex", True):
            return GPT2_PRE
        raise StepstreamError(f"{source}: the pre-tokenizer is a ByteLevel without a split regex; {_OVERRIDE}")
    if len(steps) >= 2:
        regexes = tuple(_split_regex(step) for step in steps[:-1])
        bl = _byte_level(steps[-1], source)
        if bl is not None and not bl.get("use_regex", True) and None not in regexes:
            if regexes in KNOWN_SPLIT_REGEXES:
                return KNOWN_SPLIT_REGEXES[regexes]
            shown = " then ".join(repr(r) for r in regexes)
            raise StepstreamError(f"{source}: split regex {shown} is not one llama.cpp implements under a known name; "
                                  f"{_OVERRIDE}")
    kinds = [s.get("type") if isinstance(s, dict) else type(s).__name__ for s in steps]
    raise StepstreamError(f"{source}: pre-tokenizer {' + '.join(map(str, kinds)) or 'an empty Sequence'} is not a shape llama.cpp reproduces "
                          f"(a ByteLevel, or isolating Split regexes then a ByteLevel without regex); {_OVERRIDE}")


def read_tokenizer(hf_dir: Path, vocab_size: int, pre_override: str | None = None) -> TokenizerData:
    path = hf_dir / "tokenizer.json"
    try:
        tok, text = read_json_object(path)
    except FileNotFoundError:
        raise StepstreamError(f"{path}: not found; the converter needs the Hugging Face tokenizer.json") from None
    fields = JsonFields(tok, str(path))
    model = fields.get("model", dict)
    if model.get("type") != "BPE":
        raise StepstreamError(f"{path}: tokenizer model is {model.get('type')!r}; Step-3.5 uses byte-level BPE")
    by_id, types = _vocabulary(fields, fields.nested("model"))
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

    tcfg = _optional_json(hf_dir / "tokenizer_config.json")
    special = _SpecialTokens(hf_dir, tcfg, tokens)
    bos_id, eos_id, pad_id = special.id("bos"), special.eos_id(), special.id("pad")  # errors before the template's warning
    add_bos, add_eos = _added_by_post_processor(tok, tokens, bos_id, eos_id)
    template, named = _chat_template(hf_dir, tcfg)
    return TokenizerData(
        tokens=tokens,
        types=[int(t) for t in toktypes],
        merges=_merges(fields.nested("model")),
        pre=check_pre_name(pre_override) if pre_override else detect_pre(tok, str(path)),
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id,
        # tokenizer_config.json's booleans, where it has them, over the post-processor's template
        # (gguf-py's SpecialVocab order, which llama.cpp's converter follows)
        add_bos=tcfg.get("add_bos_token", bool, add_bos),
        add_eos=tcfg.get("add_eos_token", bool, add_eos),
        chat_template=template,
        hf_json=text,
        named_templates=named,
    )


def _vocabulary(tok: JsonFields, model: JsonFields) -> tuple[dict[int, str], dict[int, int]]:
    """Token text by id, and the added tokens' GGUF types: ids are non-negative integers, one
    text per id (a repeated id used to drop a token without a word), and an added token may
    only name the text its id already has."""
    by_id: dict[int, str] = {}
    for text, i in model.get("vocab", dict).items():
        model.check(i, int, f"vocab[{text!r}]", "non-negative")
        if i in by_id:
            raise StepstreamError(f"{model.source}: {model.prefix}vocab gives id {i} to both {by_id[i]!r} and {text!r}")
        by_id[i] = text
    if not by_id:
        raise StepstreamError(f"{model.source}: {model.prefix}vocab is empty")
    types: dict[int, int] = {}
    for k, entry in enumerate(tok.get("added_tokens", list, [])):
        added = JsonFields(tok.check(entry, dict, f"added_tokens[{k}]"), tok.source, f"added_tokens[{k}].")
        i, content = added.get("id", int, bound="non-negative"), added.get("content", str)
        if by_id.get(i, content) != content:
            raise StepstreamError(f"{tok.source}: added_tokens[{k}] gives id {i} to {content!r}, which the "
                                  f"vocabulary gives to {by_id[i]!r}")
        by_id[i] = content
        types[i] = gguf.TokenType.CONTROL if added.get("special", bool, False) else gguf.TokenType.USER_DEFINED
    return by_id, types


def _merges(model: JsonFields) -> list[str]:
    """The BPE merges as "left right" strings (tokenizers writes pairs as strings or as lists)."""
    merges = []
    for k, m in enumerate(model.get("merges", list, [])):
        if isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m):
            m = " ".join(m)
        if not isinstance(m, str):
            raise StepstreamError(f"{model.source}: {model.prefix}merges[{k}] must be a string or a pair of "
                                  f"strings, got {shown(m)}")
        merges.append(m)
    return merges


def _added_by_post_processor(tok: dict, tokens: list[str], bos_id: int | None, eos_id: int | None) -> tuple[bool, bool]:
    """Whether tokenizer.json's post-processor adds BOS and EOS to a single sequence: a
    TemplateProcessing that starts (ends) with the BOS (EOS) token's text, or a
    RobertaProcessing; read as gguf-py's SpecialVocab reads it. Without one, neither."""
    post = tok.get("post_processor")
    if not isinstance(post, dict):
        return False, False
    processors = post.get("processors") if post.get("type") == "Sequence" else [post]
    add_bos = add_eos = False
    for p in processors if isinstance(processors, list) else []:
        if not isinstance(p, dict):
            continue
        if p.get("type") == "RobertaProcessing":
            add_bos = add_eos = True
        single = p.get("single") if p.get("type") == "TemplateProcessing" else None
        if isinstance(single, list) and len(single) > 1:
            first, last = (_special_piece(single[0]), _special_piece(single[-1]))
            add_bos = first is not None and bos_id is not None and first == tokens[bos_id]
            add_eos = last is not None and eos_id is not None and last == tokens[eos_id]
    return add_bos, add_eos


def _special_piece(piece) -> str | None:
    special = piece.get("SpecialToken") if isinstance(piece, dict) else None
    return special.get("id") if isinstance(special, dict) and isinstance(special.get("id"), str) else None


def _optional_json(path: Path) -> JsonFields:
    """A JSON file's values; an absent file reads as an empty object."""
    try:
        raw, _ = read_json_object(path)
    except FileNotFoundError:
        raw = {}
    return JsonFields(raw, str(path))


class _SpecialTokens:
    """BOS/EOS/PAD ids as llama.cpp's SpecialVocab finds them: tokenizer_config.json's `{kind}_token`
    (the token's text), else config.json's `{kind}_token_id`."""

    def __init__(self, hf_dir: Path, tcfg: JsonFields, tokens: list[str]):
        self.tcfg, self.tokens = tcfg, tokens
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.tokenizer_json = hf_dir / "tokenizer.json"
        self.config = _optional_json(hf_dir / "config.json")

    def id(self, kind: str) -> int | None:
        from_text = self._from_tokenizer_config(kind)
        return from_text if from_text is not None else self._from_config(kind)

    def eos_id(self) -> int | None:
        eos = self.id("eos")
        if eos is None:
            warn(f"no EOS token: neither {self.tcfg.source} (eos_token) nor {self.config.source} "
                 "(eos_token_id) names one; generation stops only at its length limit")
        return eos

    def _from_tokenizer_config(self, kind: str) -> int | None:
        key = f"{kind}_token"
        value = self.tcfg.raw.get(key)
        if isinstance(value, dict):  # an AddedToken, saved as an object with the text under "content"
            value = self.tcfg.nested(key).get("content", str)
        elif value is not None:
            value = self.tcfg.check(value, str, key)
        if value is None:
            return None
        if value not in self.ids:
            raise StepstreamError(f"{self.tcfg.source}: {key} {value!r} is not a token of {self.tokenizer_json.name}")
        return self.ids[value]

    def _from_config(self, kind: str) -> int | None:
        """config.json's id. eos_token_id may list several (transformers stops at any of them); GGUF
        holds one EOS id, the first."""
        key = f"{kind}_token_id"
        value = self.config.raw.get(key)
        if isinstance(value, list):
            ids = [self.config.check(v, int, f"{key}[{i}]", "non-negative") for i, v in enumerate(value)]
            value = ids[0] if ids else None
        else:
            value = self.config.get(key, int, None, "non-negative")
        if value is not None and value >= len(self.tokens):
            raise StepstreamError(f"{self.config.source}: {key} {value} is not a token id "
                                  f"(the vocabulary holds {len(self.tokens)})")
        return value


# Where a chat template may live, in the order transformers reads them: a chat_template.jinja file
# wins over tokenizer_config.json's chat_template ("independent chat template files take priority");
# chat_template.json (the older processors' file, which gguf-py's SpecialVocab also reads) comes last.
TEMPLATE_SOURCES = ("chat_template.jinja", "tokenizer_config.json", "chat_template.json")


def _chat_template(hf_dir: Path, tcfg: JsonFields) -> tuple[str | None, dict[str, str]]:
    """The checkpoint's (default) chat template, and its other named templates (a list of
    `{"name", "template"}` entries, kept as gguf-py keeps them); a warning when it has no default."""
    found, named = {}, {}
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        found["chat_template.jinja"] = read_text(jinja)
        # transformers saves the other templates beside it, one file each; gguf-py names them by file
        for extra in sorted((hf_dir / "additional_chat_templates").glob("*.jinja")):
            named[_template_name(extra.stem)] = read_text(extra)
    for name, fields in (("tokenizer_config.json", tcfg), ("chat_template.json", _optional_json(hf_dir / "chat_template.json"))):
        found[name], names = _template_value(fields)
        named = named or names
    present = [(name, t) for name in TEMPLATE_SOURCES if (t := found.get(name)) and t.strip()]
    if not present:
        if named:
            warn(f"{hf_dir}: the chat templates are named {', '.join(named)}, none 'default'; the GGUF keeps them "
                 "as tokenizer.chat_template.NAME (as llama.cpp's converter does) but gets no default template, "
                 "so chat requests to it will be refused (plain completion works)")
        else:
            warn(f"{hf_dir}: no chat template (looked in {', '.join(TEMPLATE_SOURCES)}); the GGUF gets none, "
                 "and chat requests to it will be refused (plain completion works)")
        return None, named
    (name, template), *others = present
    if any(t != template for _, t in others):
        warn(f"{hf_dir}: the chat templates in {' and '.join(n for n, _ in present)} differ; using {name}'s, "
             "as transformers does")
    return template, named


def _template_value(fields: JsonFields) -> tuple[str | None, dict[str, str]]:
    """A `chat_template` entry: the text, or from a list of named templates the default one and the
    others by name (letters, digits and '_', as gguf-py writes the key)."""
    value = fields.raw.get("chat_template")
    if not isinstance(value, list):
        return fields.get("chat_template", str, None), {}
    default, named = None, {}
    for i, entry in enumerate(value):
        entry = JsonFields(fields.check(entry, dict, f"chat_template[{i}]"), fields.source, f"chat_template[{i}].")
        name, template = entry.get("name", str, ""), entry.get("template", str)
        if name == "default":
            default = template
        elif name:
            named[_template_name(name)] = template
    return default, named


def _template_name(name: str) -> str:
    """A template's name as gguf-py writes it into the key tokenizer.chat_template.NAME."""
    return re.sub(r"[^A-Za-z0-9]", "_", name)


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
    for name, template in t.named_templates.items():
        writer.add_string(f"{Key.CHAT_TEMPLATE}.{name}", template)
    if t.named_templates:
        writer.add_array(f"{Key.CHAT_TEMPLATE}s", list(t.named_templates))
    writer.add_string(Key.HF_JSON, t.hf_json)
    writer.add_string(Key.HF_JSON_PRE, t.pre)
