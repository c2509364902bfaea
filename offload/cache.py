"""The expert cache: a fixed arena of equal slots under a byte budget, as a state machine.

Each slot goes EMPTY -> LOADING -> READY -> EVICTING -> EMPTY. A slot that is LOADING, or
READY with users (refs > 0), or pinned, is never chosen for eviction. Any other
transition raises. One lock guards all slot state; a condition wakes threads waiting for
a load to finish or a slot to come free.

The arena is allocated once (budget // slot_bytes slots), so the budget is exactly the
memory the cache holds, whatever the access pattern.

Policies pick the victim among evictable READY slots:
    lru      least recently used
    lfu      least frequently used (ties: least recent)
    pinned   a hot set loaded once and never evicted (see `pin`), LRU for the rest
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass

import numpy as np

from offload.direct_io import aligned_empty
from runtime.base.errors import StepstreamError

Key = tuple[int, int]  # (layer, expert)
POLICIES = ("lru", "lfu", "pinned")


class SlotState(enum.Enum):
    EMPTY = "empty"
    LOADING = "loading"
    READY = "ready"
    EVICTING = "evicting"


_ALLOWED = {
    (SlotState.EMPTY, SlotState.LOADING),
    (SlotState.LOADING, SlotState.READY),
    (SlotState.LOADING, SlotState.EMPTY),  # the read failed
    (SlotState.READY, SlotState.EVICTING),
    (SlotState.EVICTING, SlotState.EMPTY),
}


class IllegalTransition(RuntimeError):
    pass


@dataclass
class Slot:
    index: int
    buffer: np.ndarray
    state: SlotState = SlotState.EMPTY
    key: Key | None = None
    refs: int = 0
    pinned: bool = False
    last_used: int = 0
    uses: int = 0
    payload: object = None  # what the loader made of the bytes (the expert's matrices)
    prefetched: bool = False  # loaded by a prefetch and not yet asked for

    def move(self, to: SlotState) -> None:
        if (self.state, to) not in _ALLOWED:
            raise IllegalTransition(f"slot {self.index} ({self.key}): {self.state.value} -> {to.value} is not allowed")
        self.state = to


@dataclass
class CacheCounters:
    hits: int = 0  # resident and READY when asked for
    inflight: int = 0  # already being read (a prefetch) when asked for
    misses: int = 0
    evictions: int = 0


class ExpertCache:
    def __init__(self, budget_bytes: int, slot_bytes: int, policy: str = "lru", min_slots: int = 1):
        if policy not in POLICIES:
            raise StepstreamError(f"unknown cache policy {policy!r}; choose one of {', '.join(POLICIES)}")
        n = budget_bytes // slot_bytes
        if n < min_slots:
            raise StepstreamError(
                f"a RAM budget of {budget_bytes / 2**20:.1f} MiB holds {n} experts of {slot_bytes / 2**20:.2f} MiB; "
                f"at least {min_slots} are needed (one token's experts in one layer)"
            )
        self.policy = policy
        self.slot_bytes = slot_bytes
        self.arena = aligned_empty(n * slot_bytes)
        self.slots = [Slot(i, self.arena[i * slot_bytes : (i + 1) * slot_bytes]) for i in range(n)]
        self.index: dict[Key, Slot] = {}
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.clock = 0
        self.counters = CacheCounters()
        self.errors: dict[Key, BaseException] = {}  # the last failed load of a key, for whoever waits on it

    @property
    def capacity_bytes(self) -> int:
        return self.arena.nbytes

    @property
    def n_slots(self) -> int:
        return len(self.slots)

    def resident_bytes(self) -> int:
        """Bytes of slots that hold or are receiving an expert (the cache's own accounting)."""
        with self.lock:
            return sum(self.slot_bytes for s in self.slots if s.state is not SlotState.EMPTY)

    # -- callers hold self.lock in the helpers below

    def _touch(self, slot: Slot) -> None:
        self.clock += 1
        slot.last_used = self.clock
        slot.uses += 1

    def _victim(self) -> Slot | None:
        free = next((s for s in self.slots if s.state is SlotState.EMPTY), None)
        if free is not None:
            return free
        candidates = [s for s in self.slots if s.state is SlotState.READY and s.refs == 0 and not s.pinned]
        if not candidates:
            return None
        if self.policy == "lfu":
            victim = min(candidates, key=lambda s: (s.uses, s.last_used))
        else:
            victim = min(candidates, key=lambda s: s.last_used)
        victim.move(SlotState.EVICTING)
        del self.index[victim.key]
        victim.key, victim.payload, victim.uses = None, None, 0
        victim.move(SlotState.EMPTY)
        self.counters.evictions += 1
        return victim

    def _claim(self, key: Key, slot: Slot, refs: int) -> Slot:
        slot.move(SlotState.LOADING)
        slot.key, slot.refs, slot.prefetched = key, refs, False
        self.errors.pop(key, None)
        self.index[key] = slot
        return slot

    # -- public API

    def acquire(self, key: Key, timeout: float = 60.0) -> tuple[Slot, bool]:
        """Take a reference to `key`'s slot. Returns (slot, must_load).

        must_load is True when the caller claimed an EMPTY slot and must fill it, then call
        `loaded` or `failed`. Otherwise the slot is READY or LOADING by another thread
        (`wait_ready` blocks until it is READY).
        """
        with self.lock:
            while True:
                slot = self.index.get(key)
                if slot is not None:
                    slot.refs += 1
                    self._touch(slot)
                    if slot.state is SlotState.READY:
                        self.counters.hits += 1
                    else:
                        self.counters.inflight += 1
                    return slot, False
                victim = self._victim()
                if victim is not None:
                    self.counters.misses += 1
                    self._touch(victim)
                    return self._claim(key, victim, refs=1), True
                if not self.changed.wait(timeout):
                    raise StepstreamError(f"expert cache: no slot came free in {timeout:.0f} s for {key} "
                                          f"({self.n_slots} slots, all in use or loading); raise the RAM budget")

    def try_claim_for_prefetch(self, key: Key) -> Slot | None:
        """Claim a slot for a background load of `key`, or None if resident or nothing is evictable."""
        with self.lock:
            if key in self.index:
                return None
            victim = self._victim()
            if victim is None:
                return None
            slot = self._claim(key, victim, refs=0)
            slot.prefetched = True
            self._touch(slot)  # recent: the next demand miss must not evict it before it is used
            return slot

    def loaded(self, slot: Slot, payload: object) -> None:
        with self.lock:
            slot.payload = payload
            slot.move(SlotState.READY)
            self.changed.notify_all()

    def failed(self, slot: Slot, error: BaseException) -> None:
        with self.lock:
            del self.index[slot.key]
            self.errors[slot.key] = error
            slot.key, slot.payload, slot.refs = None, None, 0
            slot.move(SlotState.EMPTY)
            self.changed.notify_all()

    def ready_payload(self, slot: Slot, key: Key) -> object | None:
        """`slot`'s payload if it holds `key` and is READY, else None (still loading, or failed)."""
        with self.lock:
            return slot.payload if slot.key == key and slot.state is SlotState.READY else None

    def wait_ready(self, slot: Slot, key: Key, timeout: float = 60.0) -> object:
        """Block until `slot` (acquired for `key`) is READY; its payload. Raises the loader's error."""
        with self.lock:
            while slot.state is SlotState.LOADING and slot.key == key:
                if not self.changed.wait(timeout):
                    raise StepstreamError(f"expert cache: {key} still loading after {timeout:.0f} s")
            if slot.key != key or slot.state is not SlotState.READY:
                error = self.errors.pop(key, None)
                if isinstance(error, StepstreamError):
                    raise StepstreamError(str(error)) from None
                raise StepstreamError(f"expert cache: load of {key} failed ({error!r})")
            return slot.payload

    def is_ready(self, key: Key) -> bool:
        with self.lock:
            slot = self.index.get(key)
            return slot is not None and slot.state is SlotState.READY

    def release(self, slot: Slot, key: Key) -> None:
        """Drop one reference taken by `acquire(key)`; a no-op if the slot's load failed meanwhile."""
        with self.lock:
            if slot.key != key:
                return
            if slot.refs <= 0:
                raise IllegalTransition(f"slot {slot.index} ({slot.key}) released more often than acquired")
            slot.refs -= 1
            if slot.refs == 0:
                self.changed.notify_all()

    def pin(self, key: Key) -> Slot:
        """Claim a slot that eviction never touches (the hot set); the caller loads it."""
        with self.lock:
            slot = self._victim()
            if slot is None:
                raise StepstreamError("expert cache: no room left to pin another expert")
            slot.pinned = True
            return self._claim(key, slot, refs=0)

    def states(self) -> dict[SlotState, int]:
        with self.lock:
            out = {s: 0 for s in SlotState}
            for slot in self.slots:
                out[slot.state] += 1
            return out
