"""Per-block key/value cache: full-attention blocks grow, sliding blocks keep a ring.

Every slot records the absolute position it holds (-1 when empty), so attention masks by
position and never cares where in the buffer an entry sits. A sliding block needs only
the last W positions; its ring keeps W + `rollback` so that `trim(n)` for n <= rollback
leaves every key a later query can see still in place.

Shape legend:  C capacity (slots)   Nk KV heads   D head dim   T new positions
"""

from __future__ import annotations

import numpy as np

from runtime.base.errors import StepstreamError


class LayerKV:
    def __init__(self, n_kv: int, head_dim: int, capacity: int, ring: bool, window: int):
        self.ring = ring
        self.window = window
        self.k = np.zeros((capacity, n_kv, head_dim), np.float32)  # [C, Nk, D]
        self.v = np.zeros((capacity, n_kv, head_dim), np.float32)
        self.pos = np.full(capacity, -1, np.int64)  # [C]
        self.n = 0  # positions 0..n-1 have been written

    @property
    def capacity(self) -> int:
        return self.pos.shape[0]

    def view(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(k [S, Nk, D], v, pos [S]) of the slots in use, in slot order."""
        if self.ring:
            return self.k, self.v, self.pos
        return self.k[: self.n], self.v[: self.n], self.pos[: self.n]

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
            self.k[slots], self.v[slots], self.pos[slots] = k[T - keep :], v[T - keep :], pos[T - keep :]
        else:
            if self.n + T > self.capacity:
                self._grow(self.n + T)
            self.k[self.n : self.n + T], self.v[self.n : self.n + T], self.pos[self.n : self.n + T] = k, v, pos
        self.n += T

    def reserve(self, pos: int) -> int:
        """The slot for one new position pos = n, marked as written; the caller fills k/v/pos there."""
        if self.ring:
            slot = pos % self.capacity
        else:
            if self.n + 1 > self.capacity:
                self._grow(self.n + 1)
            slot = self.n
        self.n += 1
        return slot

    def _grow(self, need: int) -> None:
        cap = max(need, 2 * self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = np.zeros((cap,) + old.shape[1:], np.float32)
            new[: self.n] = old[: self.n]
            setattr(self, name, new)
        pos = np.full(cap, -1, np.int64)
        pos[: self.n] = self.pos[: self.n]
        self.pos = pos

    def oldest_kept(self) -> int:
        used = self.pos[self.pos >= 0]
        return int(used.min()) if used.size else 0

    def trim_to(self, n: int) -> None:
        self.pos[self.pos >= n] = -1
        self.n = n


class KVCache:
    """The cache of every trunk block, and the number of positions it holds."""

    def __init__(self, n_kv: tuple[int, ...], head_dim: int, sliding: tuple[bool, ...], window: int,
                 n_ctx: int, rollback: int):
        self.window = window
        self.rollback = rollback
        self.layers = [
            LayerKV(nk, head_dim, window + rollback if s else min(n_ctx, 256), ring=s, window=window)
            for nk, s in zip(n_kv, sliding)
        ]
        self.n_past = 0

    def advance(self, n: int) -> None:
        """Called once every block has appended the same n positions."""
        self.n_past += n
        assert all(layer.n == self.n_past for layer in self.layers)

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
        self.n_past = 0

    @property
    def nbytes(self) -> int:
        return sum(layer.k.nbytes + layer.v.nbytes for layer in self.layers)
