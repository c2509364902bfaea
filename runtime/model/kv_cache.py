"""Per-block key/value cache: full-attention blocks grow, sliding blocks keep a ring.

Every slot records the absolute position it holds (-1 when empty), so attention masks by
position and never cares where in the buffer an entry sits. A sliding block needs only
the last W positions; its ring keeps W + `rollback` so that `trim(n)` for n <= rollback
leaves every key a later query can see still in place.

An evaluation is a transaction: `begin()` before the first block writes, `advance(T)` after
every block of a chunk has written, then `commit()`, or `abort()` when anything raised
(an expert read error, Ctrl-C, MemoryError) with some blocks a chunk ahead of the others.
Abort forgets every position written since `begin()` and puts back the ring slots those
writes overwrote while a later query or `trim` could still see them, so the cache is exactly
what it was before the evaluation started.

Keys and values are stored in the cache's types (runtime.model.kv_types: f32, f16 or q8_0),
each as a pair of arrays (data, scale); everything here moves slots of all four alike.

Shape legend:  C capacity (slots)   Nk KV heads   D head dim   T new positions
"""

from __future__ import annotations

import numpy as np

from runtime.base.errors import StepstreamError
from runtime.model import kv_types


class CacheStateError(StepstreamError):
    """The blocks' caches disagree about how many positions they hold."""


class LayerKV:
    limit: int | None = None  # the most positions a growing cache is ever asked to hold (n_ctx)

    def __init__(self, n_kv: int, head_dim: int, capacity: int, ring: bool, window: int,
                 types: tuple[str, str] = ("f32", "f32"), limit: int | None = None):
        self.ring = ring
        self.limit = limit
        self.window = window
        self.types = types  # (keys', values') runtime.model.kv_types type
        self.k, self.ks = kv_types.allocate(types[0], capacity, n_kv, head_dim)  # [C, Nk, D], scales [C, Nk, D/32 | 0]
        self.v, self.vs = kv_types.allocate(types[1], capacity, n_kv, head_dim)
        self.pos = np.full(capacity, -1, np.int64)  # [C]
        self.n = 0  # positions 0..n-1 have been written
        self._start: int | None = None  # n at begin(); None outside a transaction
        self._undo: list[tuple[np.ndarray, tuple[np.ndarray, ...]]] = []  # (slots, copies of arrays()) overwritten

    _ARRAYS = ("k", "ks", "v", "vs", "pos")  # every array indexed by slot

    def arrays(self) -> tuple[np.ndarray, ...]:
        """(k, ks, v, vs, pos): every array indexed by slot."""
        return tuple(getattr(self, name) for name in self._ARRAYS)

    @property
    def capacity(self) -> int:
        return self.pos.shape[0]

    def view(self) -> tuple[np.ndarray, ...]:
        """(k [S, Nk, D], k scales, v, v scales, pos [S]) of the slots in use, in slot order."""
        if self.ring:
            return self.arrays()
        return tuple(a[: self.n] for a in self.arrays())

    def fits_in_place(self, n_new: int) -> bool:
        """Whether n_new positions can be stored before attending without evicting a key one of
        them still sees: always on a growing cache; on a ring, when n_new <= C - W + 1."""
        return not self.ring or n_new <= self.capacity - self.window + 1

    def append(self, k: np.ndarray, v: np.ndarray, pos: np.ndarray) -> None:
        """Store k/v [T, Nk, D] for positions pos [T] = n, n+1, ..."""
        T = k.shape[0]
        if self.ring:
            keep = min(T, self.capacity)  # older ones are out of every future window
            slots = pos[T - keep :] % self.capacity
            self._save(slots)
            k, v, pos = k[T - keep :], v[T - keep :], pos[T - keep :]
        else:
            if self.n + T > self.capacity:
                self._grow(self.n + T)
            slots = np.arange(self.n, self.n + T)
        kv_types.store(self.k, self.ks, slots, k)
        kv_types.store(self.v, self.vs, slots, v)
        self.pos[slots] = pos
        self.n += T

    def reserve(self, pos: int) -> int:
        """The slot for one new position pos = n, marked as written; the caller fills k/v/pos there."""
        if self.ring:
            slot = pos % self.capacity
            if self._start is not None and self._start - self.capacity < self.pos[slot] < self._start:
                self._save_one(slot)
        else:
            if self.n + 1 > self.capacity:
                self._grow(self.n + 1)
            slot = self.n
        self.n += 1
        return slot

    def _save_one(self, slot: int) -> None:
        """_save of one slot that reserve found must be kept: slice copies, without _save's masks
        and fancy indexing (most of a decode step's 10 us in reserve)."""
        self._undo.append((np.array([slot]), tuple(a[slot:slot + 1].copy() for a in self.arrays())))

    def _save(self, slots: np.ndarray) -> None:
        """Inside a transaction, keep what ring `slots` hold before they are overwritten, where
        that is a position from before begin() that abort() must put back. A position <= start - C
        is out of reach of every later query and every allowed trim; one >= start was written in
        this transaction (so each slot is saved at most once)."""
        if self._start is None:
            return
        old = self.pos[slots]
        slots = slots[(old > self._start - self.capacity) & (old < self._start)]
        if slots.size:
            self._undo.append((slots, tuple(a[slots] for a in self.arrays())))  # fancy indexing copies

    def begin(self) -> None:
        self._start, self._undo = self.n, []

    def commit(self) -> None:
        self._start, self._undo = None, []

    def abort(self) -> None:
        """Back to the state at begin(): later positions forgotten, overwritten ring slots restored."""
        if self._start is None:
            return
        self.trim_to(self._start)
        for slots, saved in reversed(self._undo):
            for a, old in zip(self.arrays(), saved):
                a[slots] = old
        self.commit()

    def _new_capacity(self, need: int) -> int:
        """Room for `need` positions: double, but never past `limit` (doubling 2,048 slots for a
        context of 3,000 allocated 4,096, beyond what the placement line and `plan` count)."""
        cap = 2 * self.capacity if self.limit is None else min(2 * self.capacity, self.limit)
        return max(need, cap)

    def _grow(self, need: int) -> None:
        cap = self._new_capacity(need)
        for name in self._ARRAYS:
            old = getattr(self, name)
            new = np.full((cap,) + old.shape[1:], -1 if name == "pos" else 0, old.dtype)
            new[: self.n] = old[: self.n]
            setattr(self, name, new)

    def skip_to(self, n: int) -> None:
        """Go on at position n, the slots from the last one written up to n left empty (never
        attended): an MTP head restarting later in its stream. A growing cache only."""
        if n > self.capacity:
            self._grow(n)
        self.pos[self.n : n] = -1
        self.n = n

    def release(self) -> None:
        """Free the slots (a closed model's): every array emptied, nothing held."""
        for name in self._ARRAYS:
            setattr(self, name, getattr(self, name)[:0].copy())
        self.n, self._start, self._undo = 0, None, []

    def oldest_kept(self) -> int:
        used = self.pos[self.pos >= 0]
        return int(used.min()) if used.size else 0

    def trim_to(self, n: int) -> None:
        self.pos[self.pos >= n] = -1
        self.n = n


START_CAPACITY = 256  # positions a full-attention block's cache holds before it first grows


def ring_window(window: int, n_ctx: int) -> int:
    """The positions a sliding block's ring must keep visible: never more than the context holds.
    (A window larger than n_ctx masks nothing within it; the file's window may be up to its
    context length, which would otherwise size every ring.)"""
    return min(window, n_ctx)


def trimmable(oldest: list[int], n_past: int, n: int, window: int) -> bool:
    """Whether rings whose oldest kept positions are `oldest` can roll n_past back by n: each
    must still hold the oldest key the next query can see (KVCache.trim's condition)."""
    need = max(0, n_past - n - window + 1)
    return all(o <= need for o in oldest)


class KVCache:
    """The cache of every trunk block, and the number of positions it holds."""

    def __init__(self, n_kv: tuple[int, ...], head_dim: int, sliding: tuple[bool, ...], window: int,
                 n_ctx: int, rollback: int, types: tuple[str, str] = ("f32", "f32")):
        self.window = ring_window(window, n_ctx)
        self.rollback = rollback
        self.types = types  # (keys', values') element type: runtime.model.kv_types
        self.layers = [
            LayerKV(nk, head_dim, self.window + rollback if s else min(n_ctx, START_CAPACITY), ring=s,
                    window=self.window, types=types, limit=n_ctx)
            for nk, s in zip(n_kv, sliding)
        ]
        self.n_past = 0
        self._start: int | None = None  # n_past at begin()

    def check(self) -> None:
        """Raise CacheStateError unless every block holds exactly n_past positions."""
        for i, layer in enumerate(self.layers):
            if layer.n != self.n_past:
                raise CacheStateError(
                    f"KV cache of block {i} holds {layer.n} positions where the model has evaluated {self.n_past}; "
                    f"an earlier evaluation was cut off without a rollback: reset the model"
                )

    def begin(self) -> None:
        """Start a transaction (an evaluation of one or more chunks)."""
        if self._start is not None:
            raise CacheStateError("the KV cache is still inside an evaluation that was cut off during its rollback: "
                                  "reset the model")
        self.check()
        self._start = self.n_past
        for layer in self.layers:
            layer.begin()

    def advance(self, n: int) -> None:
        """Called once every block has appended the same n positions."""
        self.n_past += n
        self.check()

    def commit(self) -> None:
        for layer in self.layers:
            layer.commit()
        self._start = None

    def abort(self) -> None:
        """Undo everything since begin(), in every block, whichever block the error stopped in."""
        if self._start is None:
            return
        for layer in self.layers:
            layer.abort()
        self.n_past, self._start = self._start, None

    def trim(self, n: int) -> None:
        """Roll back the last n positions, as if they had never been evaluated."""
        if not 0 <= n <= self.n_past:
            raise StepstreamError(f"trim({n}): the cache holds {self.n_past} positions")
        new = self.n_past - n
        need = max(0, new - self.window + 1)  # oldest key the next query can see
        for layer in self.layers:
            if layer.ring and layer.n and layer.oldest_kept() > need:
                raise StepstreamError(
                    f"trim({n}) reaches past the sliding-window cache: it keeps {layer.capacity} positions "
                    f"(window {self.window} + rollback {self.rollback}); load the model with rollback >= {n}"
                )
        for layer in self.layers:
            layer.trim_to(new)
        self.n_past = new

    def reset(self) -> None:
        for layer in self.layers:
            layer.trim_to(0)
            layer.commit()
        self.n_past, self._start = 0, None

    def release(self) -> None:
        """Free every block's slots; the cache then holds nothing and takes nothing."""
        for layer in self.layers:
            layer.release()
        self.n_past, self._start = 0, None

    @property
    def nbytes(self) -> int:
        return sum(layer.k.nbytes + layer.ks.nbytes + layer.v.nbytes + layer.vs.nbytes for layer in self.layers)
