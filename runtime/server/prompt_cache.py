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
bigger than the whole budget is not copied at all (the server says so once). A state still
waiting to be written to the disk tier counts in the budget until it is written. One whose tokens
begin another's is dropped for it. The budget is counted in the
model's memory at load (RuntimeOptions.prompt_cache), so the expert cache gives it up.
"""

from __future__ import annotations

import sys

from runtime.base.memory_limit import size_text
from runtime.model import kv_state
from runtime.model.kv_state import SavedState, StateMismatch
from runtime.server.disk_states import DiskStates

MIN_GAIN = 32  # positions a kept state must add to what the live cache gives
MIN_KEEP = 256  # positions of the live cache a request must throw away for them to be kept


def _begins(a: tuple, b: tuple) -> bool:
    return len(a) <= len(b) and b[: len(a)] == a


class PromptCache:
    def __init__(self, budget: int, disk: DiskStates | None = None):
        """budget: bytes of RAM for kept states; disk: the disk tier (serve --cache-dir), or None."""
        self.budget = budget
        self.disk = disk
        self.states: list[SavedState] = []  # most recently used last
        self.loads = self.keeps = 0
        self.said_too_big = False

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.states)

    def prepare(self, model, prompt: list[int]) -> int:
        """Make the model's cache the best start for `prompt`; returns the positions it will reuse."""
        live = model.reusable(prompt)
        if self.budget <= 0 and self.disk is None:
            return live
        # (positions, in RAM, the state or file): RAM first where the two give as much
        scored = [(model.reusable(prompt, s), 1, s) for s in self.states]
        if self.disk is not None:
            ram = {s.tokens for s in self.states}
            scored += [(model.reusable(prompt, e), 0, e) for e in self.disk.usable(kv_state.layout(model.cache))
                       if e.tokens not in ram]
        best, in_ram, kept = max(scored, key=lambda x: x[:2], default=(0, 1, None))
        if best >= live + MIN_GAIN:
            # a file's arrays are mapped, not held: it is loaded from the page cache, and is not
            # copied into the RAM tier (its file serves it again)
            state = kept if in_ram else self.disk.get(kept)
            if state is not None:
                if in_ram:
                    self._remember(state)  # kept (most recently used): a later prompt may want more of it
                self._keep(model)  # (the live cache, used later still)
                try:
                    model.load_state(state)  # (a state it refuses leaves the cache as it was)
                except StateMismatch as e:
                    self._forget(state if in_ram else kept, e)
                    return live
                self.loads += 1
                return best
        if len(model.history) - live >= MIN_KEEP:
            self._keep(model)
        return live

    def _forget(self, kept, why: Exception) -> None:
        """A kept state or file the model refused (damaged, or of another model under this one's
        name): gone from its tier, said in the log."""
        print(f"prompt cache: a kept conversation was refused and dropped: {why}", file=sys.stderr, flush=True)
        if isinstance(kept, SavedState):
            self.states = [s for s in self.states if s is not kept]
        else:
            self.disk.remove(kept)

    def persist(self, model) -> bool:
        """The live cache to the disk tier (the server is stopping); returns whether a file holds it."""
        if self.disk is not None and len(model.history) >= MIN_KEEP:
            return self.disk.put(model.save_state(checkpoint=True, copy=False))  # written before anything changes it
        return False

    def keep(self, model) -> None:
        """Keep the live cache (a slot restore is about to replace it)."""
        self._keep(model)

    def _keep(self, model) -> None:
        """Copy the live cache (room made first: nothing is copied that the budget cannot hold), and
        write it to the disk tier."""
        held = tuple(model.history)
        if len(held) < MIN_KEEP:
            return
        size = model.state_nbytes(checkpoint=True)
        state = None
        if size <= self.budget:
            self._make_room(held, size)  # before the copy: the states never take more than the budget
            state = model.save_state(checkpoint=True)
            self.states.append(state)
            self.keeps += 1
        if self.disk is not None:  # the RAM copy by the writer thread; views of the cache before they change
            if state is not None:
                self.disk.put_later(state)
            else:
                self.disk.put(model.save_state(checkpoint=True, copy=False))
        elif state is None and not self.said_too_big:  # once: such conversations are evaluated again
            self.said_too_big = True
            print(f"prompt cache: a conversation of {len(held):,} tokens takes {size_text(size)}, more than "
                  f"--cache-ram {size_text(self.budget)}: it is not kept (give a larger --cache-ram)",
                  file=sys.stderr, flush=True)

    def _remember(self, state: SavedState) -> None:
        """`state` (one of the RAM states) as the most recently used."""
        self.states = [s for s in self.states if s is not state] + [state]

    def _make_room(self, tokens: tuple, size: int) -> None:
        """Drop the states these tokens extend, then the least recently used, until `size` more
        bytes fit the budget. A state still waiting for the disk's writer holds its memory until
        it is written, so dropping it frees nothing yet: the states already written go first,
        and only when they are not enough does the cache wait for the writes (seldom: only when
        conversations are kept faster than they are written)."""
        self.states = [s for s in self.states if not _begins(s.tokens, tokens)]
        while self.states and self._held() + size > self.budget:
            written = next((s for s in self.states if self.disk is None or not self.disk.queued(s)), None)
            if written is not None:
                self.states.remove(written)
            elif self.disk.pending_bytes():
                self.disk.flush()
        if self.disk is not None and self._held() + size > self.budget and self.disk.pending_bytes():
            self.disk.flush()  # states dropped from RAM, their files still being written

    def _held(self) -> int:
        """The bytes the RAM tier holds: its states, and those only the disk's writer still holds."""
        return self.nbytes + (self.disk.pending_bytes(self.states) if self.disk is not None else 0)
