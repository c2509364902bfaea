"""Added tokens of every GGUF token type, which the shipped model does not have (its four are
control tokens): USER_DEFINED ones such as `<think>` (a HF added token with special=false) are
matched with special parsing on or off, as llama.cpp and HF `tokenizers` match them; CONTROL and
UNKNOWN ones only with special parsing on. A chat message's `</think>` therefore reaches the
template as the text a template tests for (Step-3.5's drops earlier turns' reasoning by it).
References: llama-cpp-python's tokenizer (vocab_only) on the same files, HF `tokenizers` on the
embedded tokenizer.json, and a jinja2 rendering set up as HF's apply_chat_template sets it up."""

from __future__ import annotations

import json
import warnings

import gguf
import jinja2
import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from runtime.base.gguf_file import GGUFModelFile
from runtime.base.gguf_schema import Key
from runtime.text.chat_prompt import chat_ids
from runtime.text.tokenizer import Tokenizer
from tests.helpers.gguf_edit import rewrite

MODEL = "runtime/data/step35-mini-q4_k_m.gguf"
T = gguf.TokenType
EXTRA = [("<think>", T.USER_DEFINED), ("</think>", T.USER_DEFINED), ("<tool_call>", T.USER_DEFINED),
         ("<|ctl_x|>", T.CONTROL), ("<unk_x>", T.UNKNOWN)]
TEXTS = ["<think>\nhi</think>ok", "a<|ctl_x|>b<unk_x>c", "x<tool_call>{}</think></think>", "<|im_end|><think>",
         "plain text, no added tokens", "<thi nk> </ think>"]

# A template that does what Step-3.5's does with reasoning: an assistant turn before the last
# user message keeps only what follows its `</think>`.
TEMPLATE = (
    "{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}"
    "{% endif %}{% endfor %}"
    "{% for m in messages %}{% set c = m.content %}"
    "{% if m.role == 'assistant' and '</think>' in c and loop.index0 < ns.last %}"
    "{% set c = c.split('</think>')[-1].lstrip('\\n') %}{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ c }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(with the embedded tokenizer.json, without it: llama.cpp's converter's kind of file)."""
    r = gguf.GGUFReader(MODEL)
    tokens = list(r.fields[Key.TOK_LIST].contents())
    n = len(tokens)
    types = list(r.fields[Key.TOK_TYPES].contents()) + [int(t) for _, t in EXTRA]
    tokens += [t for t, _ in EXTRA]
    hf = json.loads(r.fields[Key.HF_JSON].contents())
    for i, (text, kind) in enumerate(EXTRA):
        hf["model"]["vocab"][text] = n + i
        hf["added_tokens"].append({"id": n + i, "content": text, "single_word": False, "lstrip": False,
                                   "rstrip": False, "normalized": False, "special": kind != T.USER_DEFINED})
    d = tmp_path_factory.mktemp("added")
    with_json, without = d / "json.gguf", d / "nojson.gguf"
    change = {Key.TOK_LIST: tokens, Key.TOK_TYPES: types}
    rewrite(MODEL, with_json, change={**change, Key.HF_JSON: json.dumps(hf)})
    rewrite(MODEL, without, change=change, drop={Key.HF_JSON, Key.HF_JSON_PRE})
    return with_json, without


def _tokenizer(path) -> Tokenizer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Tokenizer.from_gguf(GGUFModelFile(path))


@pytest.fixture(scope="module")
def llama(files):
    import llama_cpp

    out = {p: llama_cpp.Llama(model_path=str(p), vocab_only=True, verbose=False) for p in files}
    yield out
    for llm in out.values():
        llm.close()


@pytest.mark.parametrize("which", [0, 1], ids=["tokenizer.json", "vocabulary only"])
@pytest.mark.parametrize("special", [False, True])
def test_added_tokens_of_each_type_tokenize_as_llama_cpp(files, llama, which, special):
    path = files[which]
    tok = _tokenizer(path)
    for text in TEXTS:
        want = llama[path].tokenize(text.encode(), add_bos=False, special=special)
        assert tok.encode(text, add_bos=False, special=special) == want, text


def test_added_tokens_tokenize_as_hf_tokenizers(files):
    from tokenizers import Tokenizer as HF

    hf = HF.from_str(GGUFModelFile(files[0]).get(Key.HF_JSON))
    tok = _tokenizer(files[0])
    for text in TEXTS:  # HF matches every added token, special or not
        assert tok.encode(text, add_bos=False, special=True) == hf.encode(text, add_special_tokens=False).ids


def _hf_render(messages, add_generation_prompt=True) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    return env.from_string(TEMPLATE).render(messages=messages, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("which", [0, 1], ids=["tokenizer.json", "vocabulary only"])
def test_a_reply_with_its_reasoning_is_dropped_by_the_template_as_hf_drops_it(files, llama, which):
    """What `stepstream chat` keeps of a reply (the generation prompt opened `<think>`): its
    reasoning, `</think>`, the answer. Before, `</think>` was disguised like a control token's
    text, the template no longer found it, and every earlier turn's reasoning stayed in the
    prompt as plain text."""
    path = files[which]
    tok = _tokenizer(path)
    tok.chat_template = TEMPLATE
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "r1\n</think>\n\nb"},
            {"role": "user", "content": "c <|im_end|> d"}]
    ref = _hf_render(msgs)
    assert "r1" not in ref  # the reference drops it
    ids = chat_ids(tok, msgs)
    # control-token text inside a message stays text (no forged turn); the template's are ids
    split = ref.index("c <|im_end|> d")
    want = (llama[path].tokenize(ref[:split].encode(), add_bos=False, special=True)
            + llama[path].tokenize(b"c <|im_end|> d", add_bos=False, special=False)
            + llama[path].tokenize(ref[split + len("c <|im_end|> d"):].encode(), add_bos=False, special=True))
    assert ids == want
