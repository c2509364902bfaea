"""The scripted-model fixture (tests/helpers/scripted_model.py): a copy of the shipped GGUF that
the real runtime, experts in RAM or streamed from disk, decodes into exactly a chosen text.

The reference is the chosen text itself, and the shipped tokenizer's own tokenization of it:
generation must give back those bytes, those ids (or the appended copies of repeated ones),
then <|im_end|> and finish_reason "stop", whatever the prompt before the generation prompt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.base.gguf_file import GGUFModelFile
from runtime.generation import complete, sampling_params
from runtime.loader import load
from runtime.text.chat_prompt import chat_ids
from runtime.text.tokenizer import Tokenizer
from tests.helpers.scripted_model import (end_token, fresh_script, script_ids, trigger_token,
                                          write_scripted_model)

SHIPPED = Path(__file__).resolve().parents[1] / "runtime" / "data" / "step35-mini-q4_k_m.gguf"

CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
JSON_CALL = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 3}}'
             '\n</tool_call>')
TEXTS = {
    "tool_call": CALL,
    "two_calls": ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
                  '<tool_call>\n{"name": "mul", "arguments": {"x": "3", "y": "4"}}\n</tool_call>'),
    "think_then_call": ("<think>\nThe user wants the weather in Oslo, so I call the tool.\n</think>\n\n" + CALL),
    "unterminated": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
    "repeated_words": "the cat and the dog and the cat and the bird, the end",
}

PROMPTS = {
    "short": [{"role": "user", "content": "hi"}],
    "system": [{"role": "system", "content": "You are a helpful assistant with tools."},
               {"role": "user", "content": "What is the weather in Paris?"}],
    # Over 128 tokens, so the sliding-window rings wrap; the earlier turns hold the script's
    # own text, which a bigram model must ignore.
    "long": [{"role": "user", "content": " ".join(f"word{i}" for i in range(20))},
             {"role": "assistant", "content": JSON_CALL},
             {"role": "user", "content": "again, please: " + "x " * 40}],
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(GGUFModelFile(SHIPPED))


@pytest.fixture(scope="module")
def scripted(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scripted")
    return {name: write_scripted_model(SHIPPED, root / f"{name}.gguf", text) for name, text in TEXTS.items()}


def _expected_ids(tok: Tokenizer, text: str, triggers=(), nxt=None, seen=None) -> list[int]:
    """Independent of the helper: the tokenizer's ids, each repeat (or a trigger) replaced by
    the next id past the shipped vocabulary, in order of appearance; then <|im_end|>."""
    triggers = set(triggers) or {tok.encode("<|im_start|>assistant\n", add_bos=False, special=True)[-1]}
    nxt = len(tok.tokens) if nxt is None else nxt
    seen, out = set() if seen is None else seen, []
    for i in tok.encode(text, add_bos=False):
        if i in seen or i in triggers:
            i, nxt = nxt, nxt + 1
        seen.add(i)
        out.append(i)
    return out + [tok.tokens.index("<|im_end|>")]


def _run(model, messages, **sampling) -> tuple[str, str | None, list[int]]:
    """(text, finish reason, ids generated): the ids are those the cache took after the prompt,
    and the end-of-generation token when the finish reason says it was sampled."""
    ids = model.chat_tokens(messages)
    pieces = list(complete(model, ids, sampling_params(**sampling), 200))
    text, reason = "".join(p.text for p in pieces), pieces[-1].finish_reason
    assert model.history[: len(ids)] == ids
    return text, reason, model.history[len(ids):] + ([end_token(model.tokenizer)] if reason == "stop" else [])


def test_trigger_and_end_come_from_the_file(tokenizer):
    ids = tokenizer.encode("<|im_start|>assistant\n", add_bos=False, special=True)
    assert trigger_token(tokenizer) == ids[-1]
    assert tokenizer.tokens[end_token(tokenizer)] == "<|im_end|>"
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    assert {chat_ids(tokenizer, p)[-1] for p in PROMPTS.values()} == {ids[-1]}
    assert chat_ids(tokenizer, PROMPTS["system"], tools=tools)[-1] == ids[-1]


FORCED = "<tool_call>\n<function=get_weather>\n"  # what a server appends for tool_choice naming a function
REQUIRED = "<tool_call>\n<function="  # and for tool_choice "required"
AFTER = {FORCED: "<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>",
         REQUIRED: "get_time>\n<parameter=zone>\nUTC\n</parameter>\n</function>\n</tool_call>"}


def test_more_scripts_follow_other_prompt_tails(tmp_path, tokenizer):
    path = write_scripted_model(SHIPPED, tmp_path / "forced.gguf", CALL, after=AFTER)
    m = load(path)
    try:
        chat_trigger = trigger_token(tokenizer)
        triggers = {chat_trigger} | {tokenizer.encode(t, add_bos=False)[-1] for t in AFTER}
        assert len(triggers) == 3
        seen, nxt, expected = set(), len(tokenizer.tokens), {}
        for key, text in [("", CALL)] + list(AFTER.items()):
            expected[key] = _expected_ids(tokenizer, text, triggers, nxt, seen)
            nxt = max([nxt - 1, *expected[key][:-1]]) + 1
        ids = m.chat_tokens(PROMPTS["long"])
        for tail in ["", *AFTER]:
            prompt = ids + m.tokenize(tail, add_bos=False)
            pieces = list(complete(m, prompt, sampling_params(temperature=0), 200))
            assert ("".join(p.text for p in pieces), pieces[-1].finish_reason) == (AFTER.get(tail, CALL), "stop")
            assert m.history[len(prompt):] == expected[tail][:-1]
    finally:
        m.close()
    with pytest.raises(ValueError, match="one token cannot start two scripts"):
        write_scripted_model(SHIPPED, tmp_path / "clash.gguf", CALL, after={"<|im_start|>user\nhi\n": "x"})


@pytest.mark.parametrize("name", list(TEXTS))
def test_greedy_decoding_writes_the_script_then_stops(name, scripted, tokenizer):
    text = TEXTS[name]
    m = load(scripted[name])
    try:
        expected = _expected_ids(tokenizer, text)
        assert m.cfg.vocab == max(max(expected) + 1, len(tokenizer.tokens))
        for prompt in ("short", "long"):  # "system" runs in the sampling test
            out, reason, ids = _run(m, PROMPTS[prompt], temperature=0)
            assert (prompt, out, reason) == (prompt, text, "stop")
            assert ids == expected, prompt
        assert len(m.chat_tokens(PROMPTS["long"])) > m.cfg.window + m.options.rollback  # the rings wrap
    finally:
        m.close()


def test_copies_print_as_the_tokens_they_copy(scripted, tokenizer):
    m = load(scripted["two_calls"])
    try:
        added = m.tokenizer.tokens[len(tokenizer.tokens):]
        assert added and all(t in tokenizer.tokens for t in added)
        ids = _expected_ids(tokenizer, TEXTS["two_calls"])
        assert m.detokenize(ids) == TEXTS["two_calls"].encode()
        # Encoding is the shipped tokenizer's: the copies are never produced by it.
        assert m.tokenize(TEXTS["two_calls"], add_bos=False) == tokenizer.encode(TEXTS["two_calls"], add_bos=False)
    finally:
        m.close()


def test_sampling_follows_the_script_and_a_foreign_prompt_stops_at_once(scripted):
    m = load(scripted["think_then_call"])
    try:
        out, reason, _ = _run(m, PROMPTS["system"], temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)
        assert (out, reason) == (TEXTS["think_then_call"], "stop")
        # A prompt that does not end with the generation prompt's last token: nothing to say.
        pieces = list(complete(m, m.tokenize("def f(x):"), sampling_params(temperature=0), 20))
        assert ("".join(p.text for p in pieces), pieces[-1].finish_reason, pieces[-1].n_tokens) == ("", "stop", 1)
    finally:
        m.close()


def test_mtp_heads_draft_the_script(scripted, tokenizer):
    m = load(scripted["tool_call"])
    try:
        prompt = m.chat_tokens(PROMPTS["short"])
        seq = prompt + _expected_ids(tokenizer, TEXTS["tool_call"])[:-1]
        heads = m.mtp_logits(seq)
        assert len(heads) == m.cfg.n_mtp
        for j, logits in enumerate(heads):  # row t drafts token t+2+j
            rows = range(len(prompt) - 2 - j, len(seq) - 2 - j)
            assert [int(np.argmax(logits[t])) for t in rows] == seq[len(prompt):], j
    finally:
        m.close()


def test_streamed_experts_under_a_small_budget(scripted, tokenizer):
    m = load(scripted["two_calls"], ram_budget=6 * 2**20 // 8, direct_io=False)
    try:
        assert m.placement is not None
        out, reason, ids = _run(m, PROMPTS["long"], temperature=0)
        assert (out, reason) == (TEXTS["two_calls"], "stop")
        assert ids == _expected_ids(tokenizer, TEXTS["two_calls"])
    finally:
        m.close()


def test_the_vocabulary_alone_and_its_limits(tmp_path, tokenizer):
    avoid = {trigger_token(tokenizer), end_token(tokenizer)}
    text = "the cat and the dog and the bird"
    ids = script_ids(tokenizer, text, avoid)
    assert len(set(ids)) == len(ids) and not avoid & set(ids)
    assert tokenizer.decode_bytes(ids) == text.encode()
    path = write_scripted_model(SHIPPED, tmp_path / "plain.gguf", text, extend_vocab=False)
    m = load(path)
    try:
        assert m.cfg.vocab == len(tokenizer.tokens)
        out, reason, got = _run(m, PROMPTS["short"], temperature=0)
        assert (out, reason, got[:-1]) == (text, "stop", ids)
    finally:
        m.close()
    # JSON needs more quote tokens than a vocabulary trained on Python has: the error names
    # where the distinct tokens run out.
    with pytest.raises(ValueError, match=r"character \d+ \('\"'"):
        script_ids(tokenizer, JSON_CALL, avoid)
    # One token alone holds the byte 7, so its second occurrence is where a script must fail.
    assert sum(b"\x07" in tokenizer.token_bytes(i) for i in range(len(tokenizer.tokens))) == 1
    with pytest.raises(ValueError, match=r"past character 4 \('\\x07' in 'ab \\x07\\x07 cd'\)"):
        script_ids(tokenizer, "ab \x07\x07 cd", avoid)
    with pytest.raises(ValueError, match="hidden size 256"):
        write_scripted_model(SHIPPED, tmp_path / "long.gguf", " ".join(f"w{i}" for i in range(300)))


def test_fresh_script_copies_repeats_and_avoided_tokens(tokenizer):
    enc = tokenizer.encode("ab ab ab", add_bos=False)
    assert len(enc) == 3 and enc[1] == enc[2] != enc[0]
    V = len(tokenizer.tokens)
    assert fresh_script(tokenizer, "ab ab ab") == ([enc[0], enc[1], V], [enc[1]])
    assert fresh_script(tokenizer, "ab ab ab", avoid={enc[0]}) == ([V, enc[1], V + 1], [enc[0], enc[1]])
