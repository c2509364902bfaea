"""Drafting with the model's MTP heads, each with a KV cache kept in step with the trunk.

Head j at position t of its own stream reads the token x[t+1+j] and a hidden state at t:
the trunk's for j = 0, head j-1's otherwise; its output predicts x[t+2+j]:

    x = eh_proj([enorm(embed(x[t+1+j])), hnorm(h_in[t])])
    h_out[t] = block_j(x)                   (attends over its stream's positions <= t)
    logits   = head_j(head_norm(h_out[t]))

With the trunk at N positions (x[0..N-1]) and a sampled token x[N] not yet evaluated, the draft
chain runs every head at position N-1: head 0 reads x[N] and drafts d1, head 1 reads d1 and
drafts d2, and so on. Positions whose inputs are all known are "teacher-forced" and kept (head
j's stream holds 0..N-1-j); the rest read drafts, are evaluated in the same chunk as the
draft row and trimmed right after. So a draft's logits are exactly `Model.mtp_logits` of the
sequence extended by the drafts before it (the test checks it bit for bit).

The heads' caches grow (no ring, the window is masked by position): any trim is possible, so
the drafter follows the trunk back as far as it goes (`truncate`). Hidden states the next
head needs are kept in dicts by position, down to MARGIN positions below what is in use, so
that a short rollback (a chat turn re-rendered) costs nothing extra. Those at the end of the
last prompt (`pin`) are kept however far generation goes past it: a prompt sent again (a retried
or regenerated request) rolls back to there, and the heads then catch up from them without the
trunk evaluating the prompt again.

Shape legend:  T positions in a chunk   H hidden   V vocab
"""

from __future__ import annotations

import weakref

import time

import numpy as np

from runtime.model.decode_plan import FEW_TOKENS
from runtime.model.kv_cache import START_CAPACITY, LayerKV
from runtime.model.matrix import matmul, rows
from runtime.model.ops import rms_norm

MARGIN = 64  # positions of hidden states kept below those in use, for rollbacks
DECODE_ROWS = FEW_TOKENS  # a head's chunk up to this many rows runs through the few-token decode path


def head_cache(cfg, j: int, n_ctx: int, types: tuple[str, str] = ("f32", "f32")) -> LayerKV:
    """Head j's KV cache, keys and values stored as `types` (the trunk's, from the options):
    growing, so trim can go anywhere (a sliding head masks by position)."""
    i = cfg.n_layers + j
    return LayerKV(cfg.n_head_kv[i], cfg.head_dim, min(n_ctx, START_CAPACITY), ring=False, window=cfg.window,
                   types=types, limit=n_ctx)


def head_input(model, j: int, ids: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Head j's block input [T, H] from the tokens it reads (ids [T]) and hidden states h [T, H].
    A few rows go in one call (runtime.model.few_kernels), with the bits of the chunk path."""
    cfg, nw = model.cfg, model.weights.nextn[j]
    e = rows(model.weights.embed, ids)
    g = model._mtp_q8[j][0]
    if g is not None and model._few_proj is not None and ids.shape[0] <= FEW_TOKENS:
        h = np.ascontiguousarray(h, dtype=np.float32)
        out = np.empty((ids.shape[0], g.rows), np.float32)
        model._few_proj.head_input(nw.enorm, nw.hnorm, np.float32(cfg.rms_eps), ids.shape[0],
                                   np.ascontiguousarray(e, dtype=np.float32), h, g.qt, g.addr, g.rb, g.starts,
                                   model.buffers.few, out)
        return out
    e = rms_norm(e, nw.enorm, cfg.rms_eps)
    return matmul(np.concatenate([e, rms_norm(h, nw.hnorm, cfg.rms_eps)], axis=1), nw.eh_proj, model.int8)


def head_chunk(model, j: int, x: np.ndarray, start: int, kv: LayerKV) -> np.ndarray:
    """Head j's block over inputs x [T, H] at positions start.. of its stream -> [T, H].
    A few rows (a draft's) go through the fused few-token decode kernels, several times faster
    than the chunk path at T <= DECODE_ROWS; the forward pass is batch-invariant, so the rows
    are the same bits either way."""
    block = model.blocks[model.cfg.n_layers + j]
    if x.shape[0] <= DECODE_ROWS:
        out = np.array(x, np.float32, order="C")
        block.decode_tokens(out, start, kv, model.provider, model.buffers)
        return out
    return block.prefill(x, np.arange(start, start + x.shape[0]), kv, model.provider)


def head_logits(model, j: int, h: np.ndarray) -> np.ndarray:
    """Head j's logits [T, V] float32 of its outputs h [T, H]."""
    nw = model.weights.nextn[j]
    g = model._mtp_q8[j][1]
    if g is not None and model._few_proj is not None and h.shape[0] <= FEW_TOKENS:
        return model.project_few(h, nw.head_norm, g)
    return matmul(rms_norm(h, nw.head_norm, model.cfg.rms_eps), nw.head, model.int8).astype(np.float32)


def restart_span(cfg, n_ctx: int, n_heads: int) -> tuple[int | None, int | None]:
    """(keep, lag_max) of Drafter's restarts: heads on a sliding window W go back (heads + 1) x W
    positions once they lag 2 x that + MARGIN; (None, None) when a head attends to every
    position (they never restart)."""
    sliding = all(cfg.sliding[cfg.n_layers + j] for j in range(n_heads))
    window = min(cfg.window, n_ctx)
    if not sliding or window <= 0:
        return None, None
    keep = (n_heads + 1) * window
    return keep, 2 * keep + MARGIN


def held_state_bytes(cfg, n_ctx: int, n_heads: int) -> int:
    """The most bytes of hidden states a Drafter keeps for its heads between drafts (float32 [H]
    each): lag_max + MARGIN positions of the trunk's, or the whole context's when the heads never
    restart. The placement counts them beside the KV cache."""
    if n_heads == 0:
        return 0
    _, lag_max = restart_span(cfg, n_ctx, n_heads)
    positions = n_ctx if lag_max is None else min(n_ctx, lag_max + MARGIN)
    return positions * cfg.hidden * 4


class Drafter:
    """The heads' caches and the hidden states they will read, in step with one model's trunk.

    tokens     the known sequence x[0..m-1] (the trunk's history, then the sampled token)
    filled[j]  head j's stream holds positions 0..filled[j]-1, all teacher-forced
    trunk[t]   the trunk's last hidden state at position t [H]
    out[j][t]  head j's output at position t [H] (head j+1 reads it)

    While auto decodes without drafts, the heads fall behind and `trunk` keeps the hidden states
    since; the next draft catches up first. Heads that attend over a sliding window W (Step-3.5's
    do) never lag more than `lag_max` positions: past that they restart `keep` = (heads + 1) x W
    positions back (_restart), which leaves their drafts exact (head j's output at a position
    reads W positions of its own keys, each made from head j-1's outputs over W more), holds at
    most lag_max + MARGIN states (16 KiB each on the real model: every position of the context
    was kept before, a review's finding) and bounds the catching up. Heads with full attention
    keep every state, as before.
    """

    def __init__(self, model):
        self.model = weakref.proxy(model)  # the model holds its drafter: a cycle kept both until a collection
        cfg = model.cfg
        self.n_heads = len(model.weights.nextn)
        self.kv = [head_cache(cfg, j, model.n_ctx, model.options.kv_types) for j in range(self.n_heads)]
        self.keep, self.lag_max = restart_span(cfg, model.n_ctx, self.n_heads)
        self.reset()

    def reset(self) -> None:
        for kv in self.kv:
            kv.trim_to(0)
        self.tokens: list[int] = []
        self.pending: int | None = None  # the sampled token the last draft read (see _drop_pending)
        self.filled = [0] * self.n_heads
        self.trunk: dict[int, np.ndarray] = {}
        self.out: list[dict[int, np.ndarray]] = [{} for _ in range(self.n_heads)]
        self.last_seconds = 0.0  # how long the last draft took, catching up excluded
        self.last_logits: list[np.ndarray] = []  # each head's logits [V] behind the last drafts
        self.pin: int | None = None  # the last prompt's end: states just below it are never pruned
        self.floor = 0  # the heads' streams hold nothing below this (start_at): they never go back past it

    def start_at(self, tokens) -> None:
        """Follow a trunk whose cache was loaded holding `tokens` (Model.load_state). Heads on a
        sliding window go on from its end (the `floor`), their streams empty before it, as a
        restart leaves them (exact again `keep` positions on), so the trunk evaluates nothing
        again for them; heads with full attention start over (the trunk evaluates it all again)."""
        self.reset()
        if self.lag_max is None:
            return
        self.tokens = list(tokens)
        self.floor = len(self.tokens)
        for j in range(self.n_heads):
            self.kv[j].skip_to(self.floor)
            self.filled[j] = self.floor

    # ---------------------------------------------------------------- following the trunk

    def record(self, start: int, h: np.ndarray, ids) -> None:
        """The trunk evaluated ids at positions start.. with hidden states h [T, H]."""
        ids = list(ids)
        if start != len(self.tokens):  # made after the trunk had evaluated: eval_prompt starts over
            self.truncate(min(start, len(self.tokens)))
            if start != len(self.tokens):
                return
        if ids and ids[0] != self.pending:
            self._drop_pending()
        self.pending = None
        self.tokens.extend(ids)
        for i in range(h.shape[0]):
            self.trunk[start + i] = h[i].copy()
        if self.lag_max is not None and len(self.tokens) - self.filled[0] > self.lag_max:
            self._restart(len(self.tokens) - self.keep)

    def _restart(self, p: int) -> None:
        """Every head goes on at position p, its cache keeping what it held with the positions
        between left empty (see the class doc: exact again `keep` positions on)."""
        for j in range(self.n_heads):
            if self.filled[j] < p:
                self.kv[j].skip_to(p)
                self.filled[j] = p
        for j in range(self.n_heads):
            for t in [t for t in self.out[j] if t < p]:
                del self.out[j][t]
        self._prune()

    def truncate(self, n: int) -> None:
        """Forget everything that read a token at position >= n (the trunk rolled back to n)."""
        if n >= len(self.tokens):
            return
        self.floor = min(self.floor, n)
        del self.tokens[n:]
        self.pending = None  # the rows that read it go with the tokens before it
        for t in [t for t in self.trunk if t >= n]:
            del self.trunk[t]
        for j in range(self.n_heads):
            self._lower(j, max(0, n - 1 - j))
        # A head must be able to read its predecessor's output at each position it has yet to
        # fill: when a rollback reached below what is kept, that head goes back further.
        changed = True
        while changed:
            changed = False
            for j in range(1, self.n_heads):
                need = range(self.filled[j], self.filled[j - 1])
                missing = [t for t in need if t not in self.out[j - 1]]
                if missing:
                    self._lower(j - 1, min(missing))
                    changed = True
                if self.filled[j] > self.filled[j - 1]:
                    self._lower(j, self.filled[j - 1])
                    changed = True

    def _drop_pending(self) -> None:
        """Forget the rows that read the token after `tokens` (the draft's sampled token, now
        known to be another): head j's positions >= len(tokens) - 1 - j."""
        for j in range(self.n_heads):
            self._lower(j, max(0, len(self.tokens) - 1 - j))
        self.pending = None

    def _lower(self, j: int, n: int) -> None:
        n = max(n, self.floor)  # (below it a head's stream is empty: it goes on from there)
        if n < self.filled[j]:
            self.filled[j] = n
            self.kv[j].trim_to(n)
            for t in [t for t in self.out[j] if t >= n]:
                del self.out[j][t]

    def resume_point(self) -> int:
        """How many trunk positions may be kept as they are: head 0 needs the trunk's hidden
        state from filled[0] on, so the trunk re-evaluates from the first one missing."""
        t = self.filled[0]
        while t < len(self.tokens) and t in self.trunk:
            t += 1
        return t

    # ---------------------------------------------------------------- drafting

    def fill(self, n_heads: int | None = None) -> None:
        """Teacher-force the first n_heads heads (all: None) over the positions whose inputs are
        known (after a prompt, or steps without drafts), so that a draft runs no longer a chunk
        than one made right after the last."""
        try:
            for j in range(self.n_heads if n_heads is None else n_heads):
                lo, hi = self.filled[j], len(self.tokens) - 1 - j  # positions lo..hi-1
                src = self.trunk if j == 0 else self.out[j - 1]
                if hi <= lo or any(t not in src for t in range(lo, hi)):
                    break
                h = self._run(j, range(lo, hi), self.tokens, src)
                for t in range(lo, hi):
                    self.out[j][t] = h[t - lo]
                self.filled[j] = hi
        except BaseException:
            self._rollback()
            raise
        self._prune()

    def draft(self, pending: int, k: int) -> list[int]:
        """Up to k greedy drafts after the trunk's history and the sampled token `pending`."""
        m = len(self.tokens) + 1  # the known sequence: tokens, then pending
        last = m - 2  # the draft position: the trunk's last one
        k = min(k, self.n_heads)
        if k <= 0 or last < 0:
            return []
        if self.pending is not None and self.pending != pending:
            self._drop_pending()
        self.fill(k)  # positions missed in steps without drafts: not timed
        t0 = time.perf_counter()
        self.last_logits = []
        seq = self.tokens + [pending]
        spec: dict[int, np.ndarray] = {}  # head j-1's outputs at positions that read drafts
        drafts: list[int] = []
        self.pending = pending  # head 0's draft row reads it and is kept
        try:
            for j in range(k):
                lo = self.filled[j]
                src = self.trunk if j == 0 else {**self.out[j - 1], **spec}
                pos = range(lo, last + 1)
                if any(t not in src for t in pos) or (not len(pos) and last not in self.out[j]):
                    break  # a head that cannot catch up (see truncate), or has not begun (start_at): draft fewer
                # Head 0's draft row reads only known tokens: kept, so a second draft from the
                # same position reads it back.
                h = self._run(j, pos, seq, src) if len(pos) else self.out[j][last][None]
                logits = head_logits(self.model, j, h[-1:])[0]  # [V]
                self.last_logits.append(logits)
                drafts.append(int(np.argmax(logits)))
                seq.append(drafts[-1])
                keep = m - 1 - j  # positions before this read only known tokens
                spec = {t: h[t - lo] for t in pos if t >= keep}
                for t in range(lo, keep):
                    self.out[j][t] = h[t - lo]
                self.filled[j] = max(keep, lo)
                self.kv[j].trim_to(self.filled[j])
        except BaseException:
            self._rollback()
            raise
        self.last_seconds = time.perf_counter() - t0
        self._prune()
        return drafts

    def _run(self, j: int, pos: range, seq: list[int], src: dict) -> np.ndarray:
        """Head j over positions pos (contiguous, from filled[j]) -> outputs [T, H], n_batch
        positions at a time as the trunk's prefill goes: a head filled over a whole prompt in
        one chunk held every position's activations at once (55 MiB more than the trunk's
        peak for a 2,668-token prompt at hidden 256, which a cgroup cap sized by the placement
        did not hold; at hidden 4096, GiBs)."""
        out = []
        step = self.model.options.n_batch
        for a in range(pos.start, pos.stop, step):
            part = range(a, min(a + step, pos.stop))
            ids = np.array([seq[t + 1 + j] for t in part], np.int64)
            x = head_input(self.model, j, ids, np.stack([src[t] for t in part]))
            out.append(head_chunk(self.model, j, x, part.start, self.kv[j]))
        return out[0] if len(out) == 1 else np.concatenate(out)

    def _rollback(self) -> None:
        """After an interruption: every head back to its teacher-forced positions."""
        for j in range(self.n_heads):
            self.kv[j].trim_to(self.filled[j])

    def _prune(self) -> None:
        # A rollback to the pin leaves head j at pin - 1 - j, reading head j-1's output there
        # (the trunk's for head 0): those positions, pin - 1 - n_heads .. pin - 1, stay.
        lo = hi = 0
        if self.pin is not None:
            lo, hi = self.pin - 1 - self.n_heads, self.pin
        for t in [t for t in self.trunk if t < self.filled[0] - MARGIN and not lo <= t < hi]:
            del self.trunk[t]
        for j in range(self.n_heads - 1):
            for t in [t for t in self.out[j] if t < self.filled[j + 1] - MARGIN and not lo <= t < hi]:
                del self.out[j][t]
        self.out[-1].clear()  # no head reads the last one's outputs
