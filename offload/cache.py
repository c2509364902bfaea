"""The expert cache: a fixed arena of equal slots under a byte budget, as a state machine.

Each slot goes EMPTY -> LOADING -> READY -> EVICTING -> EMPTY. A slot that is LOADING, or
READY with users (refs > 0), or pinned, is never chosen for eviction. Any other
transition raises. One lock guards all slot state; a condition wakes threads waiting for
a load to finish or a slot to come free.

The arena is allocated once (budget // slot_bytes slots), so the budget is exactly the
memory the cache holds, whatever the access pattern.

Bookkeeping never walks the slots: a hit, a miss, an eviction and a release cost the
same at 64 slots as at 10,000 (runtime/bench/cache_ops.py measures it). EMPTY slots sit
on a free list; the evictable ones (READY, no users, not pinned) sit in the policy's
`Evictable` structure, which a slot enters when its last user lets go and leaves when it
is acquired or evicted.

Policies pick the victim among evictable slots:
    lru      least recently released (an ordered dict: O(1)); an expert read for a scan (a
             prefill chunk, which asks for nearly every expert of every layer in turn) goes
             in at the old end instead, until it is used again: under plain LRU such a cycle
             larger than the cache evicts each expert just before it is asked for again (a
             review measured 4 hits in 1,279 requests with half the experts' bytes), while
             this keeps the experts resident before the scan and cycles the rest through
             the other slots
    lfu      fewest uses, ties least recently released (buckets of equal use counts
             and a heap of the counts in use: O(log n))
    pinned   a hot set loaded once and never evicted (see `pin`), LRU for the rest
"""

from __future__ import annotations

import enum
import heapq
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
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


class Outcome(enum.Enum):
    """What an `acquire` found: the four cases the statistics report apart."""

    HIT = "hit"  # READY, and in use before (not a prefetch waiting for its first use)
    PREFETCHED_IN_TIME = "prefetched_in_time"  # READY, read by a prefetch, first use
    PREFETCHED_LATE = "prefetched_late"  # a prefetch still reading it: the caller waits
    MISS = "miss"  # not resident (or still being read on demand): the caller waits for a read


@dataclass
class Slot:
    index: int
    buffer: np.ndarray
    state: SlotState = SlotState.EMPTY
    key: Key | None = None
    refs: int = 0
    pinned: bool = False
    uses: int = 0  # acquires since it was claimed (LFU's count)
    cold: bool = False  # read for a scan and not used since: evicted first (LRU)
    payload: object = None  # what the loader made of the bytes (the expert's matrices)
    prefetched: bool = False  # claimed by a prefetch (for this residency)
    asked: bool = False  # asked for by `acquire` since it was claimed
    rank: int = 0  # a prefetch's candidate rank (its place in the guess, best first)

    def move(self, to: SlotState) -> None:
        if (self.state, to) not in _ALLOWED:
            raise IllegalTransition(f"slot {self.index} ({self.key}): {self.state.value} -> {to.value} is not allowed")
        self.state = to


@dataclass
class CacheCounters:
    hits: int = 0  # READY when asked for, and used before
    prefetched_in_time: int = 0  # READY when asked for, read by a prefetch
    prefetched_late: int = 0  # a prefetch was still reading it when asked for
    misses: int = 0  # read on demand (or still being read on demand)
    evictions: int = 0
    prefetch_used: int = 0  # read by a prefetch and asked for before its eviction
    prefetch_wasted: int = 0  # read by a prefetch and evicted without being asked for


class LruEvictable:
    """Evictable slots in the order they became evictable; the oldest goes first. O(1)."""

    def __init__(self):
        self._order: OrderedDict[int, Slot] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def add(self, slot: Slot) -> None:
        self._order[slot.index] = slot
        if slot.cold:
            self._order.move_to_end(slot.index, last=False)

    def remove(self, slot: Slot) -> None:
        del self._order[slot.index]

    def pop(self) -> Slot | None:
        return self._order.popitem(last=False)[1] if self._order else None


class LfuEvictable:
    """Evictable slots bucketed by use count, oldest first within a bucket; the fewest uses go
    first. A heap holds the counts that have a bucket (each pushed once per bucket): O(log n)."""

    def __init__(self):
        self._buckets: dict[int, OrderedDict[int, Slot]] = {}
        self._where: dict[int, int] = {}  # slot index -> its bucket's use count
        self._counts: list[int] = []

    def __len__(self) -> int:
        return len(self._where)

    def add(self, slot: Slot) -> None:
        bucket = self._buckets.get(slot.uses)
        if bucket is None:
            bucket = self._buckets[slot.uses] = OrderedDict()
            heapq.heappush(self._counts, slot.uses)
        bucket[slot.index] = slot
        self._where[slot.index] = slot.uses

    def remove(self, slot: Slot) -> None:
        uses = self._where.pop(slot.index)
        bucket = self._buckets[uses]
        del bucket[slot.index]
        if not bucket:
            del self._buckets[uses]  # its count stays in the heap until `pop` meets it

    def pop(self) -> Slot | None:
        while self._counts:
            bucket = self._buckets.get(self._counts[0])
            if bucket is None:
                heapq.heappop(self._counts)
                continue
            slot = next(iter(bucket.values()))
            self.remove(slot)
            return slot
        return None


class ExpertCache:
    def __init__(self, budget_bytes: int, slot_bytes: int, policy: str = "lru", min_slots: int = 1,
                 on_prefetch_outcome: Callable[[int, bool], None] | None = None):
        """`on_prefetch_outcome(rank, used)` hears, under the cache's lock, the fate of each expert a
        prefetch read: used (first asked for) or evicted unused. It must be quick and not call back."""
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
        self.counters = CacheCounters()
        self.errors: dict[Key, BaseException] = {}  # the last failed load of a key, for whoever waits on it
        self._free: list[Slot] = self.slots[::-1]  # EMPTY slots; pop() takes the lowest index first
        self._evictable = LfuEvictable() if policy == "lfu" else LruEvictable()
        self._pinned: set[Key] = set()
        self._state_counts = Counter({SlotState.EMPTY: n})
        self.on_prefetch_outcome = on_prefetch_outcome

    @property
    def capacity_bytes(self) -> int:
        return self.arena.nbytes

    @property
    def n_slots(self) -> int:
        return len(self.slots)

    def resident_bytes(self) -> int:
        """Bytes of slots that hold or are receiving an expert (the cache's own accounting)."""
        with self.lock:
            return (self.n_slots - len(self._free)) * self.slot_bytes

    # -- callers hold self.lock in the helpers below

    def _move(self, slot: Slot, to: SlotState) -> None:
        was = slot.state
        slot.move(to)
        self._state_counts[was] -= 1
        self._state_counts[to] += 1

    def _touch(self, slot: Slot) -> None:
        slot.uses += 1

    def _prefetch_outcome(self, slot: Slot, used: bool) -> None:
        if used:
            self.counters.prefetch_used += 1
        else:
            self.counters.prefetch_wasted += 1
        if self.on_prefetch_outcome is not None:
            self.on_prefetch_outcome(slot.rank, used)

    def _maybe_evictable(self, slot: Slot) -> None:
        if slot.state is SlotState.READY and slot.refs == 0 and not slot.pinned:
            self._evictable.add(slot)

    def _victim(self) -> Slot | None:
        """An EMPTY slot: a free one, else the policy's victim, evicted."""
        if self._free:
            return self._free.pop()
        victim = self._evictable.pop()
        if victim is None:
            return None
        self._move(victim, SlotState.EVICTING)
        if victim.prefetched and not victim.asked:
            self._prefetch_outcome(victim, used=False)
        del self.index[victim.key]
        victim.key, victim.payload, victim.uses, victim.prefetched, victim.cold = None, None, 0, False, False
        self._move(victim, SlotState.EMPTY)
        self.counters.evictions += 1
        return victim

    def _claim(self, key: Key, slot: Slot, refs: int) -> Slot:
        self._move(slot, SlotState.LOADING)
        slot.key, slot.refs, slot.prefetched, slot.asked = key, refs, False, refs > 0
        self.errors.pop(key, None)
        self.index[key] = slot
        return slot

    def _take_resident(self, slot: Slot, scan: bool = False) -> Outcome:
        if slot.refs == 0 and slot.state is SlotState.READY and not slot.pinned:
            self._evictable.remove(slot)
        slot.refs += 1
        self._touch(slot)
        first_ask, slot.asked = not slot.asked, True
        # Asked for again: kept as LRU keeps it. A prefetch's first use by a scan is the scan's read.
        slot.cold = scan and slot.prefetched and first_ask
        if slot.prefetched and first_ask:
            self._prefetch_outcome(slot, used=True)
            if slot.state is SlotState.READY:
                self.counters.prefetched_in_time += 1
                return Outcome.PREFETCHED_IN_TIME
            self.counters.prefetched_late += 1
            return Outcome.PREFETCHED_LATE
        if slot.state is SlotState.READY:
            self.counters.hits += 1
            return Outcome.HIT
        self.counters.misses += 1  # a demand read that an earlier request started and abandoned
        return Outcome.MISS

    # -- public API

    def acquire(self, key: Key, timeout: float = 60.0) -> tuple[Slot, bool]:
        """Take a reference to `key`'s slot. Returns (slot, must_load).

        must_load is True when the caller claimed an EMPTY slot and must fill it, then call
        `loaded` or `failed`. Otherwise the slot is READY or LOADING by another thread
        (`wait_ready` blocks until it is READY).
        """
        slot, must_load, _ = self.acquire_counted(key, timeout)
        return slot, must_load

    def acquire_counted(self, key: Key, timeout: float = 60.0, scan: bool = False) -> tuple[Slot, bool, Outcome]:
        """`acquire`, also saying what it found (hit, prefetched in time or late, miss). `scan`: a
        miss is read for a scan, and goes first when evictable until it is asked for again."""
        with self.lock:
            while True:
                slot = self.index.get(key)
                if slot is not None:
                    return slot, False, self._take_resident(slot, scan)
                free = bool(self._free)
                victim = self._victim()
                if victim is not None:
                    self.counters.misses += 1
                    self._touch(victim)
                    victim.cold = scan and not free  # a free slot displaced nothing: it fills the cache
                    return self._claim(key, victim, refs=1), True, Outcome.MISS
                if not self.changed.wait(timeout):
                    raise StepstreamError(f"expert cache: no slot came free in {timeout:.0f} s for {key} "
                                          f"({self.n_slots} slots, all in use or loading); raise the RAM budget")

    def try_claim_for_prefetch(self, key: Key, rank: int = 0) -> Slot | None:
        """Claim a slot for a background load of `key` (the guess's candidate of `rank`), or None if
        resident or nothing is evictable."""
        with self.lock:
            if key in self.index:
                return None
            victim = self._victim()
            if victim is None:
                return None
            slot = self._claim(key, victim, refs=0)
            slot.prefetched, slot.rank = True, rank
            self._touch(slot)
            return slot

    def claim_free(self, key: Key) -> Slot | None:
        """Claim an EMPTY slot for a load of `key` that evicts nothing (filling the cache at
        load); None if `key` is resident or no slot is free. Loaded, it is READY and evictable,
        and its first request counts as a hit."""
        with self.lock:
            if key in self.index or not self._free:
                return None
            return self._claim(key, self._free.pop(), refs=0)

    def loaded(self, slot: Slot, payload: object) -> None:
        with self.lock:
            slot.payload = payload
            self._move(slot, SlotState.READY)
            self._maybe_evictable(slot)  # a prefetch nobody holds yet: the most recent evictable slot
            self.changed.notify_all()

    def failed(self, slot: Slot, error: BaseException) -> None:
        with self.lock:
            del self.index[slot.key]
            self._pinned.discard(slot.key)
            self.errors[slot.key] = error
            slot.key, slot.payload, slot.refs, slot.uses = None, None, 0, 0
            slot.pinned, slot.prefetched = False, False
            self._move(slot, SlotState.EMPTY)
            self._free.append(slot)
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
                self._maybe_evictable(slot)
                self.changed.notify_all()

    def forget_prefetches(self) -> None:
        """Experts read ahead, resident and not yet asked for become plain residents: a later use
        is a hit and an eviction no waste, so that statistics restarted now (a warm-up's end) do
        not count the earlier reads' fate (a review: 38 used + 16 wasted of 52 reads ahead). It
        walks the slots: called once per run, not per request."""
        with self.lock:
            for slot in self.slots:
                if slot.state is SlotState.READY and slot.prefetched and not slot.asked:
                    slot.prefetched = False

    @property
    def pinned_keys(self) -> frozenset:
        with self.lock:
            return frozenset(self._pinned)

    def evict_all_but(self, keep: Iterable[Key]) -> int:
        """Empty every resident slot that is not pinned, not in use and not holding one of `keep`
        (a warm-up's experts, before the fill at load is read again); returns how many. Not
        counted as evictions: the caller restarts the figures."""
        keep = set(keep)
        n = 0
        with self.lock:
            for slot in self.slots:
                if slot.state is not SlotState.READY or slot.refs or slot.pinned or slot.key in keep:
                    continue
                self._evictable.remove(slot)
                self._move(slot, SlotState.EVICTING)
                del self.index[slot.key]
                slot.key, slot.payload, slot.uses, slot.prefetched, slot.cold = None, None, 0, False, False
                self._move(slot, SlotState.EMPTY)
                self._free.append(slot)
                n += 1
            self.changed.notify_all()
        return n

    def pin(self, key: Key) -> Slot:
        """Claim a slot that eviction never touches (the hot set); the caller loads it."""
        with self.lock:
            slot = self._victim()
            if slot is None:
                raise StepstreamError("expert cache: no room left to pin another expert")
            slot.pinned = True
            self._pinned.add(key)
            return self._claim(key, slot, refs=0)

    def usable_slots(self, keys: Iterable[Key]) -> int:
        """Slots that could hold `keys` at once: every slot not pinned, plus those pinned to one of `keys`."""
        with self.lock:
            return self.n_slots - len(self._pinned) + len(self._pinned.intersection(keys))

    def states(self) -> dict[SlotState, int]:
        with self.lock:
            return {s: self._state_counts[s] for s in SlotState}
