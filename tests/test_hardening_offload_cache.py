"""Issue 12, item 4: the expert cache's bookkeeping does not grow with its number of slots.

Hits, misses, evictions, releases and a decode step's `held` never walk the slots (checked
by a slot list that refuses to be iterated), a miss costs about the same at 10,000 slots as
at 64, and the O(1)/O(log n) structures pick the same victims as a plain scan-based model
of the policy over random operation sequences.
"""

import time
from pathlib import Path

import gguf
import pytest
from hypothesis import given, settings, strategies as st

from offload.cache import ExpertCache, SlotState
from offload.expert_table import ExpertTable, LayerExperts
from offload.provider import StreamingExperts

SLOT = 4096


class NoWalk(list):
    """The cache's slot list, made to fail any walk over it (indexing and len still work)."""

    def __iter__(self):
        raise AssertionError("the cache walked all its slots")


def filled(n: int, policy: str) -> ExpertCache:
    cache = ExpertCache(n * SLOT, SLOT, policy)
    cache.slots = NoWalk(cache.slots)
    for e in range(n):
        slot, must = cache.acquire((0, e))
        assert must
        cache.loaded(slot, e)
        cache.release(slot, (0, e))
    return cache


@pytest.mark.parametrize("policy", ["lru", "lfu", "pinned"])
def test_no_operation_walks_the_slots(policy):
    cache = ExpertCache(64 * SLOT, SLOT, policy)
    cache.slots = NoWalk(cache.slots)
    pinned = cache.pin((9, 9))
    cache.loaded(pinned, "hot")
    for e in range(63):  # fill: 63 misses into free slots
        slot, _ = cache.acquire((0, e))
        cache.loaded(slot, e)
        cache.release(slot, (0, e))
    slot, must = cache.acquire((0, 5))  # a hit
    assert not must
    cache.release(slot, (0, 5))
    slot, must = cache.acquire((1, 0))  # a miss with an eviction
    assert must and cache.counters.evictions == 1
    cache.failed(slot, OSError("gone"))
    pre = cache.try_claim_for_prefetch((1, 1))
    assert pre is not None
    cache.loaded(pre, "prefetched")
    assert cache.usable_slots([(9, 9), (1, 1)]) == 64
    assert cache.usable_slots([(1, 1)]) == 63
    assert cache.resident_bytes() == 64 * SLOT
    assert cache.states()[SlotState.READY] == 64


def test_a_decode_step_does_not_walk_the_slots():
    """StreamingExperts.held() ran `sum(... for slot in cache.slots)` once per layer per token."""
    n = 256
    cache = filled(n, "lru")
    q = gguf.GGMLQuantizationType.F32
    table = ExpertTable({0: LayerExperts(0, n, (q, q, q), ((1, 1),) * 3, (Path("unused"),) * 3, (0, 0, 0),
                                         (SLOT // 3,) * 3)})
    provider = StreamingExperts(table, cache, workers=1)
    try:
        with provider.held(0, [3, 7, 11, 200]) as got:
            assert [e for e, _ in got] == [3, 7, 11, 200] and [w for _, w in got] == [3, 7, 11, 200]
    finally:
        provider.close()


class MissTimer:
    """A full cache of n slots; `round()` times 100 misses (each with an eviction) and their
    load and release, and keeps the best per-miss time."""

    def __init__(self, n: int):
        self.cache = ExpertCache(n * SLOT, SLOT, "lru")
        for e in range(n):
            slot, _ = self.cache.acquire((0, e))
            self.cache.loaded(slot, e)
            self.cache.release(slot, (0, e))
        self.fresh, self.best = 0, float("inf")

    def round(self) -> None:
        t0 = time.perf_counter()
        for _ in range(100):
            self.fresh += 1
            key = (1, self.fresh)
            slot, must = self.cache.acquire(key)
            self.cache.loaded(slot, key)
            self.cache.release(slot, key)
        self.best = min(self.best, (time.perf_counter() - t0) / 100)


def test_a_miss_costs_the_same_at_10000_slots_as_at_64():
    small, large = MissTimer(64), MissTimer(10_000)
    for _ in range(25):  # alternated, so that a busy moment of the machine hits both alike
        small.round()
        large.round()
    print(f"\nmiss + load + release: {small.best * 1e6:.1f} us at 64 slots, {large.best * 1e6:.1f} us at 10,000")
    assert large.best < 4 * small.best, \
        f"{large.best * 1e6:.1f} us per miss at 10,000 slots against {small.best * 1e6:.1f} us at 64"


# ----------------------------------------------------------------------------- the policies against a plain model


class ScanModel:
    """The policy written the obvious way (a scan over every slot), as the reference."""

    def __init__(self, n: int, policy: str):
        self.n, self.policy = n, policy
        self.res: dict = {}  # key -> dict(state, refs, uses, stamp, pinned)
        self.clock = 0

    def _stamp(self, r):
        self.clock += 1
        r["stamp"] = self.clock

    def evictable(self):
        return [k for k, r in self.res.items() if r["state"] == "ready" and r["refs"] == 0 and not r["pinned"]]

    def room(self) -> bool:
        return len(self.res) < self.n or bool(self.evictable())

    def make_room(self):
        if len(self.res) < self.n:
            return None
        if self.policy == "lfu":
            victim = min(self.evictable(), key=lambda k: (self.res[k]["uses"], self.res[k]["stamp"]))
        else:
            victim = min(self.evictable(), key=lambda k: self.res[k]["stamp"])
        del self.res[victim]
        return victim

    def acquire(self, key):
        r = self.res.get(key)
        if r is not None:
            r["refs"] += 1
            r["uses"] += 1
            return False
        self.make_room()
        self.res[key] = {"state": "loading", "refs": 1, "uses": 1, "stamp": 0, "pinned": False}
        return True

    def prefetch(self, key):
        if key in self.res or not self.room():
            return False
        self.make_room()
        self.res[key] = {"state": "loading", "refs": 0, "uses": 1, "stamp": 0, "pinned": False}
        return True

    def loaded(self, key):
        r = self.res[key]
        r["state"] = "ready"
        if r["refs"] == 0:
            self._stamp(r)

    def failed(self, key):
        del self.res[key]

    def release(self, key):
        r = self.res[key]
        r["refs"] -= 1
        if r["refs"] == 0 and r["state"] == "ready":
            self._stamp(r)


ops = st.lists(st.tuples(st.sampled_from(["acquire", "release", "prefetch", "loaded", "failed"]),
                         st.integers(0, 1), st.integers(0, 5), st.integers(0, 10**6)), max_size=120)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 6), policy=st.sampled_from(["lru", "lfu", "pinned"]), program=ops)
def test_victims_match_a_scan_over_the_slots(n, policy, program):
    cache = ExpertCache(n * 64, 64, policy)
    model = ScanModel(n, policy)
    held: list = []  # (key, slot) references taken by acquire
    loading: dict = {}  # key -> slot that must be loaded or failed
    for op, layer, e, pick in program:
        key = (layer, e)
        if op == "acquire" and (key in model.res or model.room()):
            must = model.acquire(key)
            slot, got_must = cache.acquire(key, timeout=1)
            assert got_must == must
            held.append((key, slot))
            if must:
                loading[key] = slot
        elif op == "prefetch":
            slot = cache.try_claim_for_prefetch(key)
            assert (slot is not None) == model.prefetch(key)
            if slot is not None:
                loading[key] = slot
        elif op in ("loaded", "failed") and loading:
            key = sorted(loading)[pick % len(loading)]
            slot = loading.pop(key)
            if op == "loaded":
                model.loaded(key)
                cache.loaded(slot, key)
            else:
                model.failed(key)
                cache.failed(slot, OSError("injected"))
                held = [(k, s) for k, s in held if k != key]
        elif op == "release" and held:
            key, slot = held.pop(pick % len(held))
            model.release(key)
            cache.release(slot, key)
        assert set(cache.index) == set(model.res), f"after {op} {key}"
        assert cache.resident_bytes() == len(model.res) * 64
        for k, r in model.res.items():
            assert cache.index[k].refs == r["refs"]


def test_lfu_evicts_the_least_used_then_the_least_recent():
    cache = ExpertCache(3 * 64, 64, "lfu")
    for key, times in (((0, 0), 3), ((0, 1), 1), ((0, 2), 1)):
        for _ in range(times):
            slot, must = cache.acquire(key)
            if must:
                cache.loaded(slot, key)
            cache.release(slot, key)
    slot, _ = cache.acquire((0, 9))  # (0, 1) and (0, 2) have one use each; (0, 1) was released first
    assert set(cache.index) == {(0, 0), (0, 2), (0, 9)}
    cache.loaded(slot, "x")
    cache.release(slot, (0, 9))
