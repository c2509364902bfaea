"""A reasoning budget: after `budget` tokens of a reply's `<think>` section, the sampler's next
tokens are forced to close it (an optional message, then `</think>`), and the reply goes on
to its answer. llama.cpp's `--reasoning-budget` and `--reasoning-budget-message`, Anthropic's
`thinking.budget_tokens`, and the budget an OpenAI `reasoning_effort` stands for.

    reader = ReplyStream(in_reasoning=..., tools=..., calls=...); reader.push(forced)
    budget = ReasoningBudget(n, closer_ids, tokenizer.token_bytes, reader)
    Sampler(params, budget=budget)      # the sampler asks `forced()` first, tells `took(token)`

Whether the reply is reasoning is the reply parser's own reading (`reader`, the
runtime.text.tool_calls.ReplyStream the reply is parsed with, fed the reply's text): a
`<think>` opens reasoning only where the parser reads one (at the start, after a call or a
closed section), never inside a call, a JSON value or prose that mentions the tag. The budget
counts the reply's reasoning tokens, every section together, as Anthropic's budget covers a
reply's thinking: a section opened once the budget is spent is closed at once.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence

from runtime.base.errors import StepstreamError

CLOSER = "\n</think>\n"  # what the model writes to end its reasoning (and the forced call's prefix)
# An effort level as a budget in tokens (None: no limit). The model has one way to reason, which
# is the APIs' default level (OpenAI's "medium", Anthropic's "high"); the levels below it cap it.
EFFORT_BUDGETS = {"none": 0, "minimal": 256, "low": 1024, "medium": None, "high": None, "xhigh": None, "max": None}
OPENAI_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")  # reasoning_effort, reasoning.effort


def effort_budget(effort, allowed=tuple(EFFORT_BUDGETS)) -> int | None:
    """The budget an effort level stands for; None for no limit (or no effort given)."""
    if effort is None:
        return None
    if not isinstance(effort, str) or effort not in allowed:
        raise StepstreamError(f"reasoning effort must be one of {', '.join(allowed)}, got {effort!r:.40}")
    return EFFORT_BUDGETS[effort]


def check_message(message) -> str:
    """A budget message (llama.cpp's --reasoning-budget-message): text, without the reasoning
    tags, which would open or close a section inside the closer."""
    if not isinstance(message, str):
        raise StepstreamError(f"a reasoning budget message must be text, got {type(message).__name__}")
    for tag in ("<think>", "</think>"):
        if tag in message:
            raise StepstreamError(f"a reasoning budget message must not hold {tag}: the closer adds the </think>")
    return message


def closer_tokens(tokenize, message: str = "") -> list[int]:
    """The tokens forced when the budget is spent: the message as plain text (its special-token
    text stays text), then the end of the reasoning section. tokenize: Model.tokenize."""
    text = tokenize(check_message(message), add_bos=False, special=False) if message else []
    return text + tokenize(CLOSER, add_bos=False, special=True)


class ReasoningBudget:
    """The state of one reply: tokens spent reasoning, and the forced tokens still to come."""

    def __init__(self, budget: int, closer: Sequence[int], token_bytes: Callable[[int], bytes], reader):
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise StepstreamError(f"a reasoning budget must be an integer >= 0 (tokens), got {budget!r}")
        if not closer:
            raise StepstreamError("a reasoning budget needs the tokens that close the reasoning")
        self.budget, self.closer, self.token_bytes = budget, list(closer), token_bytes
        self.reader = reader  # push(text); in_reasoning
        self.used = 0  # reasoning tokens so far (forced ones included)
        self.cut = False  # whether the budget ended a section
        self._queue: list[int] = []
        self._held = False  # a grammar refused the closer: none is forced again in this section
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._check()

    @property
    def reasoning(self) -> bool:
        return self.reader.in_reasoning

    def forced(self) -> int | None:
        """The token that must come next, or None when the sampler chooses."""
        return self._queue[0] if self._queue else None

    def give_up(self) -> None:
        """Stop forcing (a grammar refused the closer): this section goes on as sampled."""
        self._queue.clear()
        self._held = True

    def took(self, token: int) -> None:
        """The token the reply got next, forced or sampled."""
        if self._queue:
            if token == self._queue[0]:
                self._queue.pop(0)
            else:  # (a sampler that did not ask) the closer no longer fits the text
                self._queue.clear()
        if self.reasoning:
            self.used += 1
        self.reader.push(self._utf8.decode(self.token_bytes(token)))
        if not self.reasoning:
            self._held = False
        self._check()

    def _check(self) -> None:
        if self.reasoning and not self._queue and not self._held and self.used >= self.budget:
            self._queue = list(self.closer)
            self.cut = True
