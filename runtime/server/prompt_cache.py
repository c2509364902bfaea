"""Conversations' KV caches kept beside the live one, so that a request between two turns of a
conversation does not cost the next turn its whole prompt (llama-server's --cache-ram).

The model reuses the longest prefix its one KV cache shares with a new prompt. An agent's
turns share long prefixes, but requests come in between: Claude Code's background requests
(titles, summaries), a second client, a sub-agent. Each evaluated over the cache, and the next
turn evaluated its whole prompt again: 30,000 tokens of Claude Code's system prompt and tools
each time.

Before each request the engine asks `prepare(model, prompt)`:

- when a kept state would give the prompt more positions than the live cache (by MIN_GAIN at
  least), the live cache is kept (below) and that state loaded in its place (it stays kept: a
  later prompt may want more of it than this one);
- else, when the request would throw away at least MIN_KEEP positions of the live cache, they
  are kept first.

Keeping copies the cache's slots in use and its rings' checkpoint (Model.save_state with
checkpoint), so a loaded state reuses exactly what the live cache would have; a loaded state
gives the same bits as evaluating its tokens (the forward pass is batch-invariant). The MTP
heads go on from a loaded state's end with nothing before (runtime.model.mtp.Drafter.start_at):
their first drafts after it may be accepted less often, the text is the same. States are
kept most recently used first, within `budget` bytes: room is made before a copy, and a state
bigger than the whole budget is not copied at all (the server says so once). One whose tokens
begin another's is dropped for it. The budget is counted in the
model's memory at load (RuntimeOptions.prompt_cache), so the expert cache gives it up.
"""

from __future__ import annotations

import sys

from runtime.base.memory_limit import size_text
from runtime.model.kv_state import SavedState

MIN_GAIN = 32  # positions a kept state must add to what the live cache gives
MIN_KEEP = 256  # positions of the live cache a request must throw away for them to be kept


def _begins(a: tuple, b: tuple) -> bool:
    return len(a) <= len(b) and b[: len(a)] == a


class PromptCache:
    def __init__(self, budget: int):
        self.budget = budget
        self.states: list[SavedState] = []  # most recently used last
        self.loads = self.keeps = 0
        self.said_too_big = False

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.states)

    def prepare(self, model, prompt: list[int]) -> int:
        """Make the model's cache the best start for `prompt`; returns the positions it will reuse."""
        live = model.reusable(prompt)
        if self.budget <= 0 or model.gpu is not None:  # (the GPU tier's cache is on the card)
            return live
        scored = [(model.reusable(prompt, s), i) for i, s in enumerate(self.states)]
        best, at = max(scored, default=(0, -1))
        if best >= live + MIN_GAIN:
            state = self.states.pop(at)
            self.states.append(state)  # kept (most recently used): a later prompt may want more of it
            self._keep(model)
            model.load_state(state)
            self.loads += 1
            return best
        if len(model.history) - live >= MIN_KEEP:
            self._keep(model)
        return live

    def _keep(self, model) -> None:
        """Copy the live cache, room made first: nothing is copied that the budget cannot hold."""
        held = tuple(model.history)
        if len(held) < MIN_KEEP:
            return
        size = model.state_nbytes(checkpoint=True)
        if size > self.budget:
            if not self.said_too_big:  # once: from here on, such conversations are evaluated again
                self.said_too_big = True
                print(f"prompt cache: a conversation of {len(held):,} tokens takes {size_text(size)}, more than "
                      f"--cache-ram {size_text(self.budget)}: it is not kept (give a larger --cache-ram)",
                      file=sys.stderr, flush=True)
            return
        self.states = [s for s in self.states if not _begins(s.tokens, held)]  # it extends them
        while self.states and self.nbytes + size > self.budget:
            self.states.pop(0)
        self.states.append(model.save_state(checkpoint=True))
        self.keeps += 1
