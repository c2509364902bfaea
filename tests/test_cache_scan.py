"""A prefill chunk asks every layer for nearly all its experts in turn: a cyclic scan larger than
the cache, under which LRU evicts each expert just before it is asked for again (a review: 4 hits
in 1,279 requests, perplexity under half the experts' bytes). Misses read for a scan go in at
the old end of the LRU order until asked for again (offload.cache), so the experts resident
before the scan stay, and one slot's worth cycles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from offload.cache import ExpertCache, Outcome
from runtime.loader import load

SLOT = 64


def _use(cache, key, scan=False):
    slot, must, outcome = cache.acquire_counted(key, scan=scan)
    if must:
        cache.loaded(slot, key)
    cache.release(slot, key)
    return outcome


def _hits_per_cycle(n, scan, cycles=4):
    cache = ExpertCache(n * SLOT, SLOT, "lru")
    for e in range(n):  # the cache's contents before the scan
        _use(cache, (0, e))
    hits = []
    for _ in range(cycles):
        hits.append(sum(_use(cache, (0, e), scan) is Outcome.HIT for e in range(2 * n)))
    return hits


@pytest.mark.parametrize("n", [1, 4, 33])
def test_a_scan_twice_the_cache_keeps_all_but_one_slot(n):
    assert _hits_per_cycle(n, scan=False) == [n, 0, 0, 0]  # plain LRU: nothing survives a cycle
    assert _hits_per_cycle(n, scan=True) == [n, n - 1, n - 1, n - 1]


def test_an_expert_read_by_a_scan_and_asked_for_again_is_kept_as_lru_keeps_it():
    cache = ExpertCache(3 * SLOT, SLOT, "lru")
    for e in range(3):
        _use(cache, (0, e))
    _use(cache, (0, 7), scan=True)  # evicts (0, 0); goes in at the old end
    assert _use(cache, (0, 7)) is Outcome.HIT  # decode asks for it: now the most recent
    _use(cache, (0, 8))  # a plain miss evicts the oldest: (0, 1), not (0, 7)
    assert set(cache.index) == {(0, 2), (0, 7), (0, 8)}


def test_a_prefetch_first_used_by_a_scan_counts_as_the_scans_read():
    cache = ExpertCache(3 * SLOT, SLOT, "lru")
    for e in range(3):
        _use(cache, (0, e))
    slot = cache.try_claim_for_prefetch((1, 5))  # evicts (0, 0)
    cache.loaded(slot, "w")
    assert _use(cache, (1, 5), scan=True) is Outcome.PREFETCHED_IN_TIME
    _use(cache, (1, 6), scan=True)  # the next scan miss evicts the prefetched one, not (0, 1)
    assert set(cache.index) == {(0, 1), (0, 2), (1, 6)}


def test_a_prefill_under_half_the_experts_keeps_hitting():
    """The shipped model, 3 chunks of 128 tokens, half its experts' bytes: LRU hit 0-1% here."""
    from offload.expert_table import build_expert_table
    from runtime.base.config import ModelConfig
    from runtime.base.gguf_file import GGUFModelFile

    path = Path(__file__).resolve().parents[1] / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
    f = GGUFModelFile(path)
    budget = build_expert_table(f, ModelConfig.from_gguf(f)).total_bytes // 2
    m = load(path, n_ctx=512, ram_budget=budget, prefetch=False)
    try:
        m.provider.stats.restart()
        m.eval(np.random.default_rng(0).integers(0, m.cfg.vocab, 384).tolist())
        s = m.provider.stats.as_dict()
    finally:
        m.close()
    assert s["hits"] >= 0.1 * s["requests"], s


def test_a_read_ahead_before_a_restart_is_not_the_next_runs():
    """After the warm-up's stats.restart(), its reads ahead evicted unused counted as the run's waste."""
    cache = ExpertCache(2 * SLOT, SLOT, "lru")
    outcomes = []
    cache.on_prefetch_outcome = lambda rank, used: outcomes.append(used)
    slot = cache.try_claim_for_prefetch((0, 1))
    cache.loaded(slot, "w")
    cache.forget_prefetches()
    _use(cache, (0, 2))
    _use(cache, (0, 3))  # evicts the expert read ahead: no waste reported
    assert outcomes == [] and cache.counters.prefetch_wasted == 0
    slot = cache.try_claim_for_prefetch((0, 4))  # read ahead after the restart: counted
    cache.loaded(slot, "w")
    assert _use(cache, (0, 4)) is Outcome.PREFETCHED_IN_TIME and outcomes == [True]
