"""A reasoning budget: after `budget` tokens of a reply's `<think>` section, the sampler's next
tokens are forced to close it (an optional message, then `</think>`), and the reply goes on
to its answer. llama.cpp's `--reasoning-budget` and `--reasoning-budget-message`, Anthropic's
`thinking.budget_tokens`, and the budget an OpenAI `reasoning_effort` stands for.

    budget = ReasoningBudget(n, closer_ids, tokenizer.token_bytes, in_reasoning)
    Sampler(params, budget=budget)      # the sampler asks `forced()` first, tells `took(token)`

The budget counts the reply's reasoning tokens, every `<think>` section together, as
Anthropic's budget covers a reply's thinking: a section opened once the budget is spent is
closed at once. Whether the reply is reasoning is read from its bytes, as the reply parser
reads it (runtime.text.tool_calls), so a marker split over several tokens counts too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from runtime.base.errors import StepstreamError

THINK, END_THINK = b"<think>", b"</think>"
CLOSER = "\n</think>\n"  # what the model writes to end its reasoning (and the forced call's prefix)
# An effort level as a budget in tokens (None: no limit). The model has one way to reason, which
# is the APIs' default level (OpenAI's "medium", Anthropic's "high"); the levels below it cap it.
EFFORT_BUDGETS = {"none": 0, "minimal": 256, "low": 1024, "medium": None, "high": None, "xhigh": None, "max": None}


def effort_budget(effort: str | None) -> int | None:
    """The budget an effort level stands for; None for no limit (or no effort given)."""
    if effort is None:
        return None
    if effort not in EFFORT_BUDGETS:
        raise StepstreamError(f"reasoning effort must be one of {', '.join(EFFORT_BUDGETS)}, got {effort!r}")
    return EFFORT_BUDGETS[effort]


def closer_text(message: str = "") -> str:
    """The text forced when the budget is spent: the message (llama.cpp's
    --reasoning-budget-message), then the end of the reasoning section."""
    return message + CLOSER


class ReasoningBudget:
    """The state of one reply: tokens spent reasoning, and the forced tokens still to come."""

    def __init__(self, budget: int, closer: Sequence[int], token_bytes: Callable[[int], bytes],
                 in_reasoning: bool = False):
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise StepstreamError(f"a reasoning budget must be an integer >= 0 (tokens), got {budget!r}")
        if not closer:
            raise StepstreamError("a reasoning budget needs the tokens that close the reasoning")
        self.budget, self.closer, self.token_bytes = budget, list(closer), token_bytes
        self.reasoning = in_reasoning
        self.used = 0  # reasoning tokens so far (forced ones included)
        self.cut = False  # whether the budget ended a section
        self._queue: list[int] = []
        self._tail = b""  # the last bytes, where a marker may have begun
        self._check()

    def forced(self) -> int | None:
        """The token that must come next, or None when the sampler chooses."""
        return self._queue[0] if self._queue else None

    def give_up(self) -> None:
        """Stop forcing (a grammar refused the closer): the reply goes on as sampled."""
        self._queue.clear()

    def took(self, token: int) -> None:
        """The token the reply got next, forced or sampled."""
        if self._queue:
            if token == self._queue[0]:
                self._queue.pop(0)
            else:  # (a sampler that did not ask) the closer no longer fits the text
                self._queue.clear()
        if self.reasoning:
            self.used += 1
        window = self._tail + self.token_bytes(token)
        opened, closed = window.rfind(THINK), window.rfind(END_THINK)
        if opened >= 0 or closed >= 0:
            self.reasoning = opened > closed
        self._tail = window[-(len(END_THINK) - 1):]
        self._check()

    def _check(self) -> None:
        if self.reasoning and not self._queue and self.used >= self.budget:
            self._queue = list(self.closer)
            self.cut = True
