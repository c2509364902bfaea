"""Tokenizer rebuilt from the GGUF, and the chat template rendered with jinja2."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer

import runtime
from runtime.text.chat_template import render_chat
from runtime.base.errors import StepstreamError
from runtime.base.gguf_file import GGUFModelFile
from runtime.text.tokenizer import Tokenizer

TEXTS = [
    "Hello world! def foo(x):\n    return x**2  # café",
    "日本語のテキスト 🙂 1234567 <|im_start|>user\nhi<|im_end|>",
    "  leading spaces\n\n\ttabs   and trailing   ",
    "Ünïcödé àccents, émojis 🙂 Привет, мир! Γειά σου κόσμε. 你好，世界。",
    "I'm sure they'll say 'it's done' -- 3.14159e+10",
    (Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text()[:4000],
]


@pytest.fixture(scope="module")
def f32_path(tiny_gguf):
    return tiny_gguf("f32")


@pytest.fixture(scope="module")
def vocab_only_llama(f32_path):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(f32_path), vocab_only=True, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module", params=["hf_json", "vocab"])
def tok(request, f32_path):
    """The tokenizer from the stored tokenizer.json, and the one rebuilt from tokens + merges + pre name."""
    return Tokenizer.from_gguf(GGUFModelFile(f32_path), use_hf_json=request.param == "hf_json")


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_hf_and_llama_cpp(tok, tiny_ckpt, vocab_only_llama, text):
    hf = HFTokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    assert tok.encode(text, add_bos=False, special=True) == hf.encode(text, add_special_tokens=False).ids
    for special in (True, False):
        assert tok.encode(text, add_bos=False, special=special) == vocab_only_llama.tokenize(text.encode(), add_bos=False, special=special)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip_and_matches_llama_cpp(tok, vocab_only_llama, text):
    ids = tok.encode(text, add_bos=False, special=True)
    assert tok.decode(ids, special=True) == text
    for special in (True, False):
        assert tok.decode_bytes(ids, special=special) == vocab_only_llama.detokenize(ids, special=special)


def test_every_token_prints_as_in_llama_cpp(tok, vocab_only_llama):
    for i in range(len(tok.tokens)):
        for special in (True, False):
            assert tok.decode_bytes([i], special=special) == vocab_only_llama.detokenize([i], special=special), (i, tok.tokens[i])


def test_streaming_bytes_never_split_characters(tok):
    text = "🙂日本語"
    ids = tok.encode(text, add_bos=False)
    assert len(ids) > 2  # multi-byte characters are cut across tokens
    assert b"".join(tok.token_bytes(i) for i in ids).decode() == text


def test_special_ids_and_bos(f32_path):
    m = runtime.load(f32_path)
    t = m.tokenizer
    assert t.tokens[t.bos_id] == "<|begin_of_text|>" and t.tokens[t.eos_id] == "<|im_end|>"
    assert t.eos_id in t.eog_ids
    assert m.tokenize("hi")[0] == t.bos_id
    assert m.tokenize("hi", add_bos=False)[0] != t.bos_id
    assert m.detokenize(m.tokenize("hi there")) == b"hi there"


def test_unsupported_pre_tokenizer(f32_path, tmp_path):
    from tests.helpers.gguf_edit import rewrite

    bad = tmp_path / "pre.gguf"
    rewrite(f32_path, bad, drop={"stepstream.tokenizer.hf_json"}, change={"tokenizer.ggml.pre": "made-up"})
    with pytest.raises(StepstreamError, match="pre-tokenizer 'made-up'"):
        Tokenizer.from_gguf(GGUFModelFile(bad))


def test_chat_template_renders_like_hf(f32_path, tiny_ckpt):
    import json

    from jinja2 import Template

    m = runtime.load(f32_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo?"}]
    got = render_chat(m.tokenizer.chat_template, messages, bos_token="<|begin_of_text|>", eos_token="<|im_end|>")
    assert got == ("<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n"
                   "<|im_start|>user\nHéllo?<|im_end|>\n<|im_start|>assistant\n")
    raw = json.loads((tiny_ckpt / "tokenizer_config.json").read_text())["chat_template"]
    assert m.tokenizer.chat_template == raw
    assert got == Template(raw, trim_blocks=True, lstrip_blocks=True).render(
        messages=messages, bos_token="<|begin_of_text|>", add_generation_prompt=True)


def test_chat_template_errors():
    with pytest.raises(StepstreamError, match="no chat template"):
        render_chat(None, [{"role": "user", "content": "x"}])
    with pytest.raises(StepstreamError, match="needs a 'role'"):
        render_chat("{{ messages }}", [{"content": "x"}])
    with pytest.raises(StepstreamError, match="chat template failed: nope"):
        render_chat("{{ raise_exception('nope') }}", [{"role": "user", "content": "x"}])


def test_an_edited_pre_tokenizer_name_is_followed_as_llama_cpp_follows_it(f32_path, tmp_path):
    """A converted file keeps the checkpoint's tokenizer.json and the pre-tokenizer name written
    beside it. Someone who edits tokenizer.ggml.pre afterwards (gguf-py's gguf_set_metadata.py)
    gets llama.cpp's tokenization by the new name, with a warning naming both; before, the
    embedded tokenizer.json went on splitting the old way. A file from before the recorded name
    (no stepstream.tokenizer.hf_json_pre) keeps its tokenizer.json."""
    import warnings

    import llama_cpp

    from runtime.base.gguf_schema import Key
    from tests.helpers.gguf_edit import rewrite

    written = GGUFModelFile(f32_path)
    assert written.get(Key.HF_JSON_PRE) == written.get(Key.TOK_PRE) != "gpt-2"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        orig = Tokenizer.from_gguf(written)  # as converted: the tokenizer.json, no warning
    cases = TEXTS + ["can't WON'T I'M she'S", "1234567890123 abc 12", "x---y___z...!!!", "tabs\tand\u00a0nbsp"]

    edited = tmp_path / "edited.gguf"
    rewrite(f32_path, edited, change={Key.TOK_PRE: "gpt-2"})
    with pytest.warns(UserWarning, match="tokenizer.ggml.pre is 'gpt-2', edited since the conversion wrote"):
        tok = Tokenizer.from_gguf(GGUFModelFile(edited))
    llm = llama_cpp.Llama(model_path=str(edited), vocab_only=True, verbose=False)
    try:
        want = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in cases]
    finally:
        llm.close()
    assert [tok.encode(t, add_bos=False) for t in cases] == want
    assert want != [orig.encode(t, add_bos=False) for t in cases]  # the edit changes some splits

    older = tmp_path / "older.gguf"
    rewrite(f32_path, older, drop=(Key.HF_JSON_PRE,), change={Key.TOK_PRE: "gpt-2"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok = Tokenizer.from_gguf(GGUFModelFile(older))
    assert [tok.encode(t, add_bos=False) for t in cases] == [orig.encode(t, add_bos=False) for t in cases]


@pytest.mark.parametrize("pre", [None, "default"])
def test_a_file_without_a_pre_tokenizer_name_splits_as_llama_cpp_does(f32_path, tmp_path, pre):
    """A GGUF without tokenizer.ggml.pre (nor our tokenizer.json) fell back to GPT-2's split
    regex, where llama.cpp uses its own default splits: 270 of 3,022 strings tokenized differently
    (a review's finding); "default", the name llama.cpp gives that case, was refused."""
    import llama_cpp

    from runtime.base.gguf_schema import Key
    from tests.helpers.gguf_edit import rewrite

    path = tmp_path / "nopre.gguf"
    rewrite(f32_path, path, drop=(Key.HF_JSON,) + ((Key.TOK_PRE,) if pre is None else ()),
            change={} if pre is None else {Key.TOK_PRE: pre})
    tok = Tokenizer.from_gguf(GGUFModelFile(path))
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        cases = TEXTS + ["can't WON'T I'M she'S", "1234567890123 abc 12", "a+b=c <x>|y^z~$5", "(f)[g]{h} 'q' \"r\"",
                         "tabs\tand\u00a0nbsp\u3000wide 日本", "x---y___z...!!!"]
        for text in cases:
            assert tok.encode(text, add_bos=False) == llm.tokenize(text.encode(), add_bos=False, special=False), text
    finally:
        llm.close()


def _llama_cpp_eog(path) -> set[int]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
        return {i for i in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    finally:
        llm.close()


def test_generation_ends_at_the_tokens_llama_cpp_ends_at(f32_path, tmp_path):
    """The shipped miniature names <|im_end|> as EOS and no EOT; it ends documents with
    <|end_of_text|>, which llama.cpp stops at (it picks end-of-generation tokens by their text)
    and stepstream generated past (a review's finding). The sets are compared with llama.cpp's
    llama_vocab_is_eog over the whole vocabulary: the shipped file, the tiny converted one, one
    naming an EOM and FIM tokens, and one whose EOS was edited to <|end_of_text|>."""
    import gguf

    from runtime.base.gguf_schema import Key
    from tests.helpers.gguf_edit import rewrite

    shipped = Path(runtime.__file__).parent / "data" / "step35-mini-q4_k_m.gguf"
    tokens = GGUFModelFile(shipped).get(Key.TOK_LIST)
    u32 = gguf.GGUFValueType.UINT32
    named = tmp_path / "named.gguf"
    rewrite(shipped, named, add={Key.TOK_EOM: (7, u32), Key.TOK_FIM_PAD: (8, u32), Key.TOK_FIM_SEP: (9, u32)})
    edited = tmp_path / "edited.gguf"
    rewrite(shipped, edited, change={Key.TOK_EOS: tokens.index("<|end_of_text|>")})
    for path in (shipped, f32_path, named, edited):
        ours = Tokenizer.from_gguf(GGUFModelFile(path)).eog_ids
        assert ours == _llama_cpp_eog(path), path.name
    assert tokens.index("<|end_of_text|>") in Tokenizer.from_gguf(GGUFModelFile(shipped)).eog_ids
    assert {7, 8, 9} <= Tokenizer.from_gguf(GGUFModelFile(named)).eog_ids


@pytest.mark.parametrize("key, value, vtype, message", [
    ("tokenizer.chat_template", 7, "UINT32", "tokenizer.chat_template is int '7', expected a string"),
    ("stepstream.tokenizer.hf_json", 7, "UINT32", "stepstream.tokenizer.hf_json is int '7', expected a string"),
    ("tokenizer.ggml.add_bos_token", "false", "STRING", "tokenizer.ggml.add_bos_token is str 'false', expected a boolean"),
    ("tokenizer.ggml.add_bos_token", 1, "UINT8", "tokenizer.ggml.add_bos_token is int '1', expected a boolean"),
])
def test_tokenizer_metadata_of_the_wrong_type_is_one_line(f32_path, tmp_path, key, value, vtype, message):
    """A hand-edited file with a number for the chat template or the embedded tokenizer.json was
    a TypeError deep in the template code or the tokenizers library, and add_bos_token "false"
    (a string) added a BOS. llama.cpp refuses such keys; so does this, naming them."""
    import gguf

    from tests.helpers.gguf_edit import rewrite

    path = tmp_path / "typed.gguf"
    rewrite(f32_path, path, drop=(key,), add={key: (value, getattr(gguf.GGUFValueType, vtype))})
    with pytest.raises(StepstreamError) as e:
        Tokenizer.from_gguf(GGUFModelFile(path))
    assert str(e.value) == f"{path}: {message}"


def test_a_prompt_refused_untokenized_never_fits():
    """check_fits refuses a text only when it must hold more tokens than the limit: checked on
    texts made of the longest token repeated (the tightest case), code and random characters."""
    from runtime.base.errors import PromptTooLong
    tok = Tokenizer.from_gguf(GGUFModelFile(Path(runtime.__file__).parent / "data" / "step35-mini-q4_k_m.gguf"))
    longest = max(range(len(tok.tokens)), key=lambda i: len(tok.token_bytes(i, special=True)))
    piece = tok.token_bytes(longest, special=True).decode("utf-8", "replace")
    rng = random.Random(0)
    texts = [piece * 40, (piece + " ") * 30, open(__file__, encoding="utf-8").read()[:6000],
             "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(3000))]
    refused = 0
    for text in texts:
        n = len(tok.encode(text, add_bos=False, special=True))
        for limit in (1, n // 8, n // 2, n - 1, n, n * 2):
            try:
                tok.check_fits(text, limit)
            except PromptTooLong as e:
                refused += 1
                assert n > limit and e.at_least <= n, (text[:40], n, limit, e.at_least)
    assert refused >= 8  # the check does refuse
