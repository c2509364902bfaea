"""The reasoning budget (runtime/generation/reasoning_budget.py): after N reasoning tokens the
reply is the one the model gives when its text holds those N tokens and then the closer.
Checked against plain greedy decoding of that teacher-forced text, with and without the MTP
heads drafting, and token by token on markers split over several tokens."""

from __future__ import annotations

import pytest

import runtime
from runtime.base.errors import StepstreamError
from runtime.generation import greedy_tokens
from runtime.generation.loop import sampling_params
from runtime.generation.reasoning_budget import CLOSER, ReasoningBudget, check_message, closer_tokens, effort_budget
from runtime.generation.request import Request, run
from runtime.text.tool_calls import ReplyStream

MODEL = "runtime/data/step35-mini-q4_k_m.gguf"


# ------------------------------------------------------------------ the state machine alone

PIECES = {1: b"<think>", 2: b"</think>", 3: b"word ", 4: b"</", 5: b"think>", 6: b"<th", 7: b"ink>", 8: b"\n",
          9: b"<tool_call>\n<function=f>\n<parameter=a>\n", 10: b"\n</parameter>\n</function>\n</tool_call>"}


def _budget(n: int, closer: list[int], in_reasoning: bool = False, calls: bool = False) -> ReasoningBudget:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string"}}}}}] if calls else None
    return ReasoningBudget(n, closer, PIECES.__getitem__,
                           ReplyStream(in_reasoning=in_reasoning, tools=tools, calls=calls))


def _feed(budget: ReasoningBudget, sampled: list[int]) -> list[int]:
    """The reply when the model would write `sampled` in order (a forced token takes a turn
    from the script, as it takes a position from the model)."""
    out, script = [], iter(sampled)
    for _ in range(len(sampled)):
        tok = budget.forced()
        tok = next(script) if tok is None else tok
        budget.took(tok)
        out.append(tok)
    return out


def test_after_the_budget_the_closer_is_forced_and_the_reply_goes_on():
    b = _budget(2, [8, 2, 8], in_reasoning=True)
    assert _feed(b, [3, 3, 3, 3, 3, 3, 3]) == [3, 3, 8, 2, 8, 3, 3]
    assert b.cut and not b.reasoning


def test_a_section_the_reply_opens_counts_from_its_opening():
    b = _budget(1, [2])
    assert _feed(b, [1, 3, 3, 3, 3]) == [1, 3, 2, 3, 3]


def test_a_second_section_after_a_call_is_closed_at_once():
    b = _budget(3, [2], calls=True)
    # one reasoning token and the model's own closing marker (written inside the section, so
    # counted), a call, then a section the parser opens after it: one token left
    assert _feed(b, [1, 3, 2, 9, 3, 10, 1, 3, 3, 3]) == [1, 3, 2, 9, 3, 10, 1, 3, 2, 3]


def test_markers_split_over_tokens_are_read():
    b = _budget(5, [2])
    _feed(b, [6, 7])  # "<th" "ink>"
    assert b.reasoning
    _feed(b, [3, 4, 5])  # "word " "</" "think>"
    assert not b.reasoning and not b.cut and b.used == 3


@pytest.mark.parametrize("calls", [False, True])
def test_a_think_tag_the_parser_reads_as_text_opens_nothing(calls):
    """Review 91: a <think> after text (prose about the tag) or inside a call's value started
    the budget, whose closer then broke the answer, the call or the JSON."""
    b = _budget(0, [2], calls=calls)
    assert _feed(b, [3, 1, 3, 3]) == [3, 1, 3, 3] and b.used == 0 and not b.cut
    if calls:
        b = _budget(0, [2], calls=True)
        assert _feed(b, [9, 1, 3, 10, 3]) == [9, 1, 3, 10, 3] and not b.cut


def test_a_refused_closer_is_not_forced_again_in_that_section():
    b = _budget(1, [2], in_reasoning=True)
    _feed(b, [3])
    assert b.forced() == 2
    b.give_up()  # a grammar refused it
    assert _feed(b, [3, 3]) == [3, 3] and b.forced() is None
    _feed(b, [2, 1])  # the model closes it, and opens another: that one is bounded again
    assert b.forced() == 2


def test_budget_zero_closes_a_section_the_prompt_opened_before_any_token():
    assert _budget(0, [8, 2], in_reasoning=True).forced() == 8


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_a_budget_that_is_not_a_count_is_refused(bad):
    with pytest.raises(StepstreamError, match="reasoning budget"):
        _budget(bad, [2])


@pytest.mark.parametrize("message", ["a </think> b", "<think>", 3, None])
def test_a_message_that_is_no_plain_text_is_refused(message):
    with pytest.raises(StepstreamError, match="message"):
        check_message(message)


def test_effort_levels():
    assert [effort_budget(e) for e in (None, "none", "minimal", "low", "medium", "high", "xhigh", "max")] == \
        [None, 0, 256, 1024, None, None, None, None]
    for bad in ("extreme", ["low"], 3):
        with pytest.raises(StepstreamError, match="effort"):
            effort_budget(bad)
    with pytest.raises(StepstreamError, match="effort"):
        effort_budget("max", ("none", "low"))


# ------------------------------------------------------------------ on the shipped model


@pytest.fixture(scope="module")
def model():
    return runtime.load(MODEL, n_threads=1, n_ctx=1024)


def _prompt(m) -> list[int]:
    # the reply starts inside a reasoning section, as the published template's prompt leaves it
    return m.tokenize("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n# <think>\n")


def _reply(m, prompt, budget, n, mtp=0, temperature=0.0, message="") -> list[int]:
    req = Request(prompt, sampling_params(temperature=temperature, seed=11), n, logprobs=0, mtp=mtp,
                  in_reasoning=True, reasoning_budget=budget, reasoning_message=message, ignore_eos=True)
    return [lp.token for s in run(m, req) for lp in s.logprobs]


@pytest.mark.parametrize("budget", [0, 5])
@pytest.mark.parametrize("mtp", [0, 3])
def test_greedy_reply_is_the_teacher_forced_text_continued(model, budget, mtp):
    prompt = _prompt(model)
    n = 24
    free = greedy_tokens(model, prompt, n)
    closer = model.tokenize(CLOSER, add_bos=False, special=True)
    head = free[:budget] + closer
    want = head + greedy_tokens(model, prompt + head, n - len(head))
    assert _reply(model, prompt, budget, n, mtp=mtp) == want


def test_the_message_is_written_before_the_closer(model):
    prompt = _prompt(model)
    message = " Time to answer <|im_end|>."  # special-token text in it stays text
    forced = closer_tokens(model.tokenize, message)
    assert forced == model.tokenize(message, add_bos=False) + model.tokenize(CLOSER, add_bos=False, special=True)
    got = _reply(model, prompt, 3, 3 + len(forced) + 4, message=message)
    assert got[3:3 + len(forced)] == forced
    assert got[:3] == greedy_tokens(model, prompt, 3)


def test_sampled_replies_are_the_same_with_the_heads_drafting(model):
    prompt = _prompt(model)
    plain = _reply(model, prompt, 6, 30, mtp=0, temperature=0.8)
    assert plain == _reply(model, prompt, 6, 30, mtp=3, temperature=0.8)
    assert plain[6:6 + 3] == model.tokenize(CLOSER, add_bos=False, special=True)[:3]


def test_without_a_budget_nothing_is_forced(model):
    prompt = _prompt(model)
    assert _reply(model, prompt, None, 12) == greedy_tokens(model, prompt, 12)
