"""Every pre-tokenizer name the converter writes is one llama.cpp knows, and cuts text as `tokenizers` does.

For each tokenizer.json style the converter recognises, a byte-level BPE is trained with that
pre-tokenizer (the `tokenizers` library), put into a copy of the tiny checkpoint, converted, and
the GGUF is loaded in llama.cpp. llama.cpp's tokenization must equal the original tokenizer's.
"""

from __future__ import annotations

import json
import shutil

import gguf
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from convert.corpus import stdlib_corpus
from convert.mini_tokenizer import SPECIAL_TOKENS
from convert.tokenizer_gguf import KNOWN_SPLIT_REGEXES, detect_pre
from runtime.base.errors import StepstreamError
from runtime.cli import main

REGEX_OF = {name: regex for regex, name in KNOWN_SPLIT_REGEXES.items()}


def _byte_level(use_regex: bool, add_prefix_space: bool = False):
    return pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=use_regex)


def _split_then_bytes(name: str):
    splits = [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in REGEX_OF[name]]
    return pre_tokenizers.Sequence([*splits, _byte_level(False)])


# tokenizer.json pre-tokenizer -> the llama.cpp name the converter must write for it
STYLES = {
    "gpt-2": lambda: _byte_level(True),  # a plain ByteLevel: GPT-2's own regex
    "qwen2": lambda: _split_then_bytes("qwen2"),  # the Step-3.5 / Qwen2 style
    "qwen35": lambda: _split_then_bytes("qwen35"),
    "llama-bpe": lambda: _split_then_bytes("llama-bpe"),
    "deepseek-v3": lambda: _split_then_bytes("deepseek-v3"),  # three Splits (a review: refused before)
}

# Text that the styles cut differently: digit runs, contractions, marks, scripts, whitespace runs.
EXTRA_CORPUS = (
    "In 2024 we sold 1234567 units at 3.14159 each; 42 + 58 = 100, 99999 bottles. " * 40
    + "I'M sure you'RE right, DON'T worry, it'LL be fine, we'D go. " * 40
    + "नमस्ते दुनिया, हिन्दी पाठ। cafe\u0301 nai\u0308ve Ελληνικά ﻿ﺍﻟﻌﺮﺑﻴﺔ 한국어 텍스트 " * 40
)
TEXTS = [
    "The quick brown fox's 3 dogs weren't there.\n\nI'M SURE it'LL work; DON'T panic!",
    "東京は日本の首都です。ひらがなとカタカナ、漢字。 नमस्ते दुनिया cafe\u0301 nai\u0308ve",
    "def fib(n: int) -> int:\n\tif n < 2:\n\t\treturn n  # base case\n    return fib(n-1)+fib(n-2)\n",
    "   trailing spaces   \r\n émojis 🙂🚀 and ünïcode, Привет мир 12345 and 1234567890123 and 3.14159",
    "x=1;y=22;z=333;w=4444\n\n\n    \t  end",
]


def _train(pre) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(stdlib_corpus(200_000) + [EXTRA_CORPUS], trainer=trainer)
    return tok


def _checkpoint_with(tiny_ckpt, d, tok: Tokenizer):
    """The tiny checkpoint's weights (linked, not copied) with another tokenizer.json."""
    d.mkdir()
    for p in tiny_ckpt.iterdir():
        if p.name == "tokenizer.json":
            continue
        if p.suffix == ".safetensors":
            (d / p.name).symlink_to(p)
        else:
            shutil.copy(p, d / p.name)
    (d / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    return d


def test_every_name_the_converter_can_write_is_tested():
    from convert.tokenizer_gguf import EMITTED_PRE_NAMES

    assert set(STYLES) == set(EMITTED_PRE_NAMES)


@pytest.mark.parametrize("name", sorted(STYLES))
def test_converted_tokenizer_loads_and_cuts_like_tokenizers_in_llama_cpp(name, tiny_ckpt, tmp_path, capsys):
    import llama_cpp

    tok = _train(STYLES[name]())
    d = _checkpoint_with(tiny_ckpt, tmp_path / "ckpt", tok)
    out = tmp_path / "m.gguf"
    assert main(["convert", str(d), str(out), "--type", "f16", "--no-progress"]) == 0, capsys.readouterr().err
    files = [out]
    if name == "gpt-2":  # the case: llama.cpp's quantizer copies the name, so its output was refused too
        files.append(_llama_quantize(out, tmp_path / "m-Q4_K_M.gguf"))
    for path in files:
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)  # refuses an unknown name
        try:
            for text in TEXTS:
                want = tok.encode(text, add_special_tokens=False).ids
                assert llm.tokenize(text.encode(), add_bos=False, special=False) == want, (name, path.name, text)
        finally:
            llm.close()
    pre = gguf.GGUFReader(out).fields["tokenizer.ggml.pre"]
    assert bytes(pre.parts[pre.data[0]]).decode() == name


def _llama_quantize(src, dst):
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


def _tokenizer_json(pre) -> dict:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    return json.loads(tok.to_str())


@pytest.mark.parametrize("pre, why", [
    (lambda: _byte_level(True, add_prefix_space=True), "prefix space"),
    (lambda: _byte_level(False), "without a split regex"),
    (lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(REGEX_OF["qwen2"][0]), behavior="removed"),
                                      _byte_level(False)]), "not a shape llama.cpp reproduces"),
    (lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(REGEX_OF["qwen2"][0]), behavior="isolated"),
                                      _byte_level(True)]), "not a shape llama.cpp reproduces"),
    (lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level(True)]),
     "Digits + ByteLevel"),
    (lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\s+|\w+"), behavior="isolated"),
                                      _byte_level(False)]), "not one llama.cpp implements"),
    (lambda: pre_tokenizers.Whitespace(), "Whitespace"),
], ids=["prefix-space", "bytelevel-no-regex", "split-removed", "split-then-regex-bytelevel", "digits", "unknown-regex",
        "whitespace"])
def test_pre_tokenizers_llama_cpp_would_cut_differently_are_refused(pre, why):
    with pytest.raises(StepstreamError, match="tokenizer.json") as e:
        detect_pre(_tokenizer_json(pre()), "ckpt/tokenizer.json")
    assert why in str(e.value)
    assert "--tokenizer-pre" in str(e.value) or "prefix space" in str(e.value)


def _llama_cpp_accepts_pre(name: str) -> bool:
    """Whether llama.cpp's loader takes `name` as tokenizer.ggml.pre: the embedded model's vocabulary
    loaded with that metadata overridden."""
    import llama_cpp

    from runtime.cli.demo import model_path

    try:
        llama_cpp.Llama(model_path=str(model_path()), vocab_only=True, verbose=False,
                        kv_overrides={"tokenizer.ggml.pre": name}).close()
        return True
    except (ValueError, RuntimeError):
        return False


def test_tokenizer_pre_names_are_the_ones_llama_cpp_accepts():
    from convert.tokenizer_gguf import LLAMA_CPP_PRE_NAMES

    refused = [n for n in sorted(LLAMA_CPP_PRE_NAMES) if not _llama_cpp_accepts_pre(n)]
    assert refused == [], refused
    for bogus in ("bogus", "qwen-2", "llama_bpe", "gpt2"):
        assert not _llama_cpp_accepts_pre(bogus) and bogus not in LLAMA_CPP_PRE_NAMES


def test_an_unknown_tokenizer_pre_is_refused_before_writing(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    assert main(["convert", str(tiny_ckpt), str(out), "--tokenizer-pre", "qwen-2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("error: --tokenizer-pre 'qwen-2': llama.cpp knows no pre-tokenizer of that name, and would refuse "
                   "the file; did you mean qwen2 or qwen35?")
    assert list(tmp_path.iterdir()) == []
