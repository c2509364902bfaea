"""The expert cache's bookkeeping cost per operation, against its number of slots.

    python -m runtime.bench.cache_ops [--slots 64,1000,10000] [--policy lru,lfu] [--json]

For each slot count the cache is filled with READY experts (slots of 4 KiB: only the
bookkeeping is measured, nothing is read), then timed per operation, in microseconds:
    hit      acquire of a resident expert
    miss     acquire of an expert that is not resident, with the full cache: one eviction
    release  dropping the last reference of a READY expert
    held     one decode step's bookkeeping in one layer: StreamingExperts.held() of 8
             resident experts (acquire, release and the provider's own checks)
Each figure is the best mean over several batches (the least disturbed by other work on
the machine). Bookkeeping that does not grow with the slots gives the same figures at
64 and at 10,000 slots.

The script uses only the cache's and the provider's public calls, so it runs unchanged
against an older checkout: `PYTHONPATH=/old/checkout python runtime/bench/cache_ops.py`.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

SLOT_BYTES = 4096
HELD_K = 8


def _timed(batch, rounds: int) -> float:
    """Best mean seconds per operation over `rounds` calls of `batch()` (which returns its op count)."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        n = batch()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def _filled_cache(n: int, policy: str):
    from offload.cache import ExpertCache

    cache = ExpertCache(n * SLOT_BYTES, SLOT_BYTES, policy)
    for e in range(n):
        slot, _ = cache.acquire((0, e))
        cache.loaded(slot, e)
        cache.release(slot, (0, e))
    return cache


def measure(n: int, policy: str, budget_s: float = 0.4) -> dict:
    cache = _filled_cache(n, policy)
    rnd = random.Random(0)
    batch = max(8, min(256, n // 2))
    # A few batches first, to learn how many fit the time budget.
    probe_keys = [(0, rnd.randrange(n)) for _ in range(8)]
    t0 = time.perf_counter()
    for k in probe_keys:
        s, _ = cache.acquire(k)
        cache.release(s, k)
    rounds = max(3, min(50, int(budget_s / max((time.perf_counter() - t0) / 8 * batch, 1e-9) / 3)))

    acquired: list = []

    def hits() -> int:
        keys = rnd.sample(list(cache.index), batch) if len(cache.index) >= batch else list(cache.index)
        acquired[:] = []
        t = time.perf_counter()
        for k in keys:
            acquired.append((cache.acquire(k)[0], k))
        hits.elapsed = time.perf_counter() - t
        return len(keys)

    def releases() -> int:
        for s, k in acquired:
            cache.release(s, k)
        return len(acquired)

    hit_s, release_s = float("inf"), float("inf")
    for _ in range(rounds):
        m = hits()
        hit_s = min(hit_s, hits.elapsed / m)
        release_s = min(release_s, _timed(releases, 1))

    fresh = iter(range(10**9))

    def misses() -> int:
        keys = [(1, next(fresh)) for _ in range(batch)]
        total = 0.0
        for k in keys:
            t = time.perf_counter()
            slot, must = cache.acquire(k)
            total += time.perf_counter() - t
            assert must, "a fresh key must miss"
            cache.loaded(slot, k)
            cache.release(slot, k)
        misses.elapsed = total
        return len(keys)

    miss_s = float("inf")
    for _ in range(rounds):
        m = misses()
        miss_s = min(miss_s, misses.elapsed / m)
    return {"slots": n, "policy": policy, "hit_us": hit_s * 1e6, "miss_us": miss_s * 1e6,
            "release_us": release_s * 1e6, "held_us": measure_held(n, policy, rounds) * 1e6}


def measure_held(n: int, policy: str, rounds: int) -> float:
    """Seconds per StreamingExperts.held() of HELD_K resident experts in one layer."""
    import gguf

    from offload.expert_table import ExpertTable, LayerExperts
    from offload.provider import StreamingExperts

    cache = _filled_cache(n, policy)
    q = gguf.GGMLQuantizationType.F32
    table = ExpertTable({0: LayerExperts(0, n, (q, q, q), ((1, 1),) * 3, (Path("unused"),) * 3, (0, 0, 0),
                                         (SLOT_BYTES // 3,) * 3)})
    provider = StreamingExperts(table, cache, workers=1)
    rnd = random.Random(1)
    steps = 64

    def decode_steps() -> int:
        for _ in range(steps):
            ids = rnd.sample(range(n), HELD_K)
            with provider.held(0, ids) as got:
                assert got is not None and len(got) == HELD_K
        return steps

    try:
        return _timed(decode_steps, max(3, rounds // 4))
    finally:
        provider.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.bench.cache_ops", description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", default="64,1000,10000", help="comma-separated slot counts")
    ap.add_argument("--policy", default="lru,lfu", help="comma-separated cache policies")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = ap.parse_args(argv)
    import offload.cache

    if not args.json:
        print(f"expert cache bookkeeping ({offload.cache.__file__}), microseconds per operation")
        print(f"{'policy':>7} {'slots':>7} {'hit':>9} {'miss':>9} {'release':>9} {'held(8)':>9}", flush=True)
    rows = []
    for p in args.policy.split(","):
        for n in args.slots.split(","):
            r = measure(int(n), p)
            rows.append(r)
            if not args.json:
                print(f"{r['policy']:>7} {r['slots']:>7} {r['hit_us']:9.2f} {r['miss_us']:9.2f} {r['release_us']:9.2f} "
                      f"{r['held_us']:9.2f}", flush=True)
    if args.json:
        print(json.dumps({"cache_module": offload.cache.__file__, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
