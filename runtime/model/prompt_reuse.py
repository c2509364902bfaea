"""What the KV cache holds, kept and returned to: the longest prefix a new prompt shares with
the cache (trimmed back to, or restored from the rings' checkpoint), a prompt evaluated past
it, and saved states (the server's prompt cache, llama-cpp-python's save_state/load_state, and as
files: save_state_file/load_state_file, llama.cpp's llama_state_save_file/load_file).

A mixin of runtime.model.model.Model: it reads the model's cache, token history, checkpoint
and MTP drafter.

Shape legend:  V vocab
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.base.errors import ContextExceeded, StepstreamError
from runtime.model import kv_checkpoint, kv_state, state_file
from runtime.model.kv_cache import trimmable
from runtime.model.kv_state import StateMismatch
from runtime.model.serial import serialized


class PromptReuse:
    @serialized
    def keep_prefix(self, tokens) -> int:
        """Roll the cache back to the longest prefix it shares with `tokens` that it can return
        to, leaving at least the last token to evaluate (its logits are wanted). Returns the
        positions kept: trim when the sliding rings allow it, else the checkpoint taken after
        the last prompt (runtime.model.kv_checkpoint) when the two agree up to it, else 0."""
        tokens = list(tokens)
        common = self._shared_prefix(tokens)
        try:
            self.trim(self.n_past - common)
            return common
        except StepstreamError:  # the sliding rings cannot roll back that far
            pass
        cp = self._checkpoint
        if cp is not None and cp.n_past <= common:
            kv_checkpoint.restore(self.cache, cp)
            del self._tokens[cp.n_past :]
            if self._drafter is not None:
                self._drafter.truncate(cp.n_past)
            return cp.n_past
        self.reset()
        return 0

    def reusable(self, tokens, state: kv_state.SavedState | None = None) -> int:
        """How many leading positions of `tokens` keep_prefix would keep: from the cache as it is,
        or from `state` once loaded (the server's prompt cache chooses among its states by it)."""
        tokens = list(tokens)
        if not tokens:
            return 0
        held, cp = (self._tokens, self._checkpoint) if state is None else (state.tokens, state.checkpoint)
        oldest = ([layer.oldest_kept() for layer in self.cache.layers if layer.ring and layer.n] if state is None
                  else state.oldest_kept())
        n = min(len(held), len(tokens))  # compared as arrays: a server scores every kept state by this
        differ = np.flatnonzero(np.asarray(held[:n], np.int64) != np.asarray(tokens[:n], np.int64))
        common = min(int(differ[0]) if differ.size else n, len(tokens) - 1)
        if trimmable(oldest, len(held), len(held) - common, self.cfg.window):
            return common
        return cp.n_past if cp is not None and cp.n_past <= common else 0

    def _shared_prefix(self, tokens: list) -> int:
        """How many leading tokens the cache shares with `tokens`, leaving at least the last."""
        common = 0
        for a, b in zip(self._tokens, tokens):
            if a != b:
                break
            common += 1
        return min(common, len(tokens) - 1)

    @serialized
    def eval_prompt(self, tokens, mtp: bool = False, cancelled=None) -> tuple[np.ndarray | None, int]:
        """(logits [V] after `tokens`, positions reused): evaluates only what the cache does not
        already hold. When the model has sliding-window blocks, their rings are copied afterwards
        (a checkpoint), so that a later prompt sharing these tokens but not what was generated
        after them still reuses them. With `mtp`, the MTP heads are brought in step too: the
        cache keeps only positions whose hidden states the heads still have to read, or
        have read. `cancelled()`, when given, is asked before each batch of n_batch positions:
        when it says so the evaluation stops there (logits None), the cache holding the prompt's
        positions evaluated so far, as a prefix a later prompt may reuse."""
        tokens = list(tokens)
        if len(tokens) > self.n_ctx:  # in the prompt's words, not a tail's after the reused positions
            raise ContextExceeded(f"the prompt is {len(tokens)} tokens, more than the context of {self.n_ctx} "
                                  f"(load with a larger n_ctx, at most the model's {self.cfg.context_length})")
        limit = len(tokens)
        if mtp and self.weights.nextn:
            # The heads first forget what read tokens past the shared prefix: the hidden states
            # they must then catch up from may be ones they had already read and let go, and the
            # trunk has to evaluate those positions again (else no head could draft after them).
            self.drafter.truncate(self._shared_prefix(tokens))
            limit = min(limit, self.drafter.resume_point() + 1)
        kept = self.keep_prefix(tokens[:limit])
        # The rings are copied before the last token, not after it: a prompt that repeats this
        # one (a retried or regenerated request) shares all but its last token, which is always
        # evaluated again for its logits, so it can return here. The forward pass is
        # batch-invariant: evaluating the last token apart gives the same bits. When the heads
        # draft, they follow the prompt a stretch at a time, so that only a stretch's hidden
        # states are held for them (a whole prompt's were: 16 KiB a token on the real model).
        heads = bool(mtp and self.weights.nextn)
        batch = self.options.n_batch
        stretch = 8 * batch if heads else len(tokens)
        for a in range(kept, len(tokens) - 1, stretch):
            end = min(a + stretch, len(tokens) - 1)
            # An evaluation a batch at a time (the same bits: the pass is batch-invariant): a
            # client gone is seen within a batch, and a writer the file's lease holds back gets
            # the file between batches, where the next one's check stops cleanly. The kernel
            # lets it through anyway after lease-break-time (45 s): a whole long prompt in one
            # evaluation outlasted it, and the process died of SIGBUS reading the map.
            for b in range(a, end, batch):
                if cancelled is not None and cancelled():
                    return None, kept
                self.eval(tokens[b : min(b + batch, end)])
            if heads and end < len(tokens) - 1:
                with self._heads_pass():
                    self.drafter.fill()
        if cancelled is not None and cancelled():
            return None, kept
        if any(layer.ring for layer in self.cache.layers) and (self._checkpoint is None
                                                               or self._checkpoint.n_past != self.n_past):
            self._checkpoint = kv_checkpoint.take(self.cache)
        logits = self.eval(tokens[-1:])
        if mtp and self.weights.nextn:
            self.drafter.pin = len(tokens) - 1  # where the same prompt sent again rolls back to
            with self._heads_pass():
                self.drafter.fill()
        return logits, kept

    @serialized
    def eval_reusing_prefix(self, tokens) -> np.ndarray:
        """Logits [V] after `tokens`, evaluating only what the cache does not already hold."""
        return self.eval_prompt(tokens)[0]


    @serialized
    def save_state(self, checkpoint: bool = False, copy: bool = True) -> kv_state.SavedState:
        """A copy of the KV cache and the tokens it holds (llama-cpp-python's save_state), for
        load_state to return to: a later prompt that starts with these tokens reuses them. With
        `checkpoint`, the state keeps the rings' checkpoint at the last prompt's end too, so that
        after load_state a prompt sharing that prompt but not the reply reuses the prompt.
        Without `copy`, its arrays are views of the cache, valid until the next evaluation (to
        write it to a file without holding a second copy)."""
        self._check_open()
        return kv_state.take(self.cache, self._tokens, self._identity(), self._checkpoint if checkpoint else None,
                             copy=copy)

    def state_nbytes(self, checkpoint: bool = False) -> int:
        """The bytes save_state(checkpoint) would copy now, without copying them."""
        return kv_state.size(self.cache, self._checkpoint if checkpoint else None)

    @serialized
    def load_state(self, state: kv_state.SavedState) -> None:
        """Make the cache hold what it held at save_state (a state of this file and cache layout;
        another is refused with the cache untouched)."""
        self._check_open()
        kv_state.restore(self.cache, state, self._identity())
        self.version += 1
        self._tokens = list(state.tokens)
        self._checkpoint = state.checkpoint
        # the heads go on from the state's end (mtp.Drafter.start_at); none are made for a model
        # loaded not to draft (their caches would take memory nothing counted)
        if self._drafter is not None or (self.n_mtp and self.options.mtp != 0):
            self.drafter.start_at(state.tokens)

    @property
    def state_variant(self) -> str:
        """What besides the file changes this model's saved states (runtime.model.state_file.variant)."""
        return state_file.variant(self.options.activations, self.gpu is not None)

    @serialized
    def save_state_file(self, path) -> int:
        """Write what the cache holds (save_state with its checkpoint) to `path`, atomically: a
        temporary name, then a rename. The format is the server's --cache-dir one; llama.cpp's
        llama_state_save_file does the same for its own. Returns the file's size."""
        self._check_open()
        identity = state_file.model_identity(self.file.path, self.state_variant)
        try:
            return state_file.write(Path(path), self.save_state(checkpoint=True, copy=False), identity)
        except OSError as e:
            raise StepstreamError(f"{path}: cannot write the state: {e.strerror or e}") from None

    @serialized
    def load_state_file(self, path) -> int:
        """Make the cache hold what a save_state_file of this model file (unchanged since), run the
        same way, held; a later prompt that starts with those tokens reuses them. Another file, or
        a damaged one, is refused with the cache untouched (runtime.model.kv_state.StateMismatch,
        runtime.model.state_file.StateFileError). Returns the tokens it holds."""
        self._check_open()
        header = state_file.read_header(Path(path))
        identity = state_file.model_identity(self.file.path, self.state_variant)
        if header["identity"] != identity:
            raise StateMismatch(f"{path}: saved by another model or run ({header['identity']}; this is {identity})")
        state = state_file.read_state(Path(path), header)
        self.load_state(state)
        return len(state.tokens)

    def _identity(self) -> str:
        return self._state_identity
