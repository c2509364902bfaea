"""Conversations' KV caches kept beside the live one, so that a request between two turns of a
conversation does not cost the next turn its whole prompt (llama-server's --cache-ram).

The model reuses the longest prefix its one KV cache shares with a new prompt. An agent's
turns share long prefixes, but requests come in between: Claude Code's background requests
(titles, summaries), a second client, a sub-agent. Each evaluated over the cache, and the next
turn evaluated its whole prompt again: 30,000 tokens of Claude Code's system prompt and tools
each time.

Before each request the engine asks `prepare(model, prompt)`:

- when a kept state would give the prompt more positions than the live cache (by MIN_GAIN at
  least), the live cache is kept (below) and that state loaded in its place;
- else, when the request would throw away at least MIN_KEEP positions of the live cache, they
  are kept first.

Keeping copies the cache's slots in use and its rings' checkpoint (Model.save_state with
checkpoint), so a loaded state reuses exactly what the live cache would have; a loaded state
gives the same bits as evaluating its tokens (the forward pass is batch-invariant). The MTP
heads go on from a loaded state's end with nothing before (runtime.model.mtp.Drafter.start_at):
their first drafts after it may be accepted less often, the text is the same. States are
kept most recently used first, within `budget` bytes (a state bigger than the budget is not
kept), and one whose tokens begin another's is dropped for it. The budget is counted in the
model's memory at load (RuntimeOptions.prompt_cache), so the expert cache gives it up.
"""

from __future__ import annotations

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
            self._keep(model)
            model.load_state(state)
            self.loads += 1
            return best
        if len(model.history) - live >= MIN_KEEP:
            self._keep(model)
        return live

    def _keep(self, model) -> None:
        if len(model.history) < MIN_KEEP:
            return
        state = model.save_state(checkpoint=True)
        if state.nbytes > self.budget:
            return
        self.states = [s for s in self.states if not _begins(s.tokens, state.tokens)] + [state]
        self.keeps += 1
        while self.nbytes > self.budget:
            self.states.pop(0)
