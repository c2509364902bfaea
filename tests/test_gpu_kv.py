"""The KV cache in VRAM keeps the host cache's bookkeeping: rings, growth, trim and the
transaction's undo, checked against runtime.model.kv_cache.KVCache driven the same way."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba.cuda")

from runtime.model.gpu.kv import DeviceKVCache  # noqa: E402
from runtime.model.kv_cache import KVCache  # noqa: E402

NK, D, W, ROLLBACK = 2, 4, 6, 3


def _pair(n_ctx=40):
    sliding = (True, False)
    return (KVCache((NK, NK), D, sliding, W, n_ctx, ROLLBACK),
            DeviceKVCache((NK, NK), D, sliding, W, n_ctx, ROLLBACK, start_capacity=4))


def _step(host: KVCache, dev: DeviceKVCache, pos: int, rng) -> None:
    """One token at pos: the same keys and values into both caches (the card's by a copy into
    its slot, as the KV-store kernel would)."""
    for hl, dl in zip(host.layers, dev.layers):
        k, v = rng.standard_normal((2, NK, D)).astype(np.float32)
        s = hl.reserve(pos)
        hl.k[s], hl.v[s], hl.pos[s] = k, v, pos
        t = dl.reserve(pos)
        assert t == s
        dl.pos[t] = pos
        dl.k[t].copy_to_device(k)
        dl.v[t].copy_to_device(v)
        dl.dpos[t : t + 1].copy_to_device(np.array([pos], np.int64))
    host.advance(1)
    dev.advance(1)


def _same(host: KVCache, dev: DeviceKVCache) -> None:
    assert host.n_past == dev.n_past
    for hl, dl in zip(host.layers, dev.layers):
        dl.sync_positions()
        assert dl.n == hl.n
        dk, dv, dp = dl.k.copy_to_host(), dl.v.copy_to_host(), dl.dpos.copy_to_host()
        np.testing.assert_array_equal(dp, dl.pos)
        for p in range(hl.n):  # every position either cache still holds: in the same place on a ring
            hs, ds = np.flatnonzero(hl.pos == p), np.flatnonzero(dl.pos == p)
            assert len(hs) == len(ds) <= 1
            if len(hs):
                np.testing.assert_array_equal(dk[ds[0]], hl.k[hs[0]])
                np.testing.assert_array_equal(dv[ds[0]], hl.v[hs[0]])


def test_device_cache_follows_the_host_cache_through_growth_wraps_trims_and_aborts():
    host, dev = _pair()  # the card's full layer starts at 4 slots and grows; the ring (6 + 3) wraps
    rng = np.random.default_rng(2)
    for p in range(13):
        host.begin(); dev.begin()
        _step(host, dev, p, rng)
        host.commit(); dev.commit()
    assert dev.layers[1].capacity >= 13 > 4
    _same(host, dev)
    host.trim(2); dev.trim(2)
    _same(host, dev)
    # an evaluation cut off after 3 tokens: abort puts back the ring slots it overwrote
    host.begin(); dev.begin()
    for p in range(11, 14):
        _step(host, dev, p, rng)
    host.abort(); dev.abort()
    _same(host, dev)
    assert dev.nbytes == sum(2 * l.k.shape[0] * NK * D * 4 for l in dev.layers)


def test_a_device_cache_saves_and_loads_states_as_the_host_cache_does():
    """The prompt cache on the GPU tier: a state taken from the card holds what the host's float32
    cache holds, driven the same way; it loads back into a fresh card cache and into a host cache
    (and a host state into a card cache), after which both go on alike."""
    from runtime.model import kv_state

    host, dev = _pair()
    rng = np.random.default_rng(5)
    for p in range(15):  # the ring wraps, the growing layer grows past its 4 slots
        _step(host, dev, p, rng)
    tokens = list(range(100, 115))
    hs, ds = kv_state.take(host, tokens, "m"), kv_state.take(dev, tokens, "m")
    assert hs.layout == ds.layout and hs.nbytes == ds.nbytes == kv_state.size(dev) == kv_state.size(host)
    for a, b in zip(hs.slots, ds.slots):
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and np.array_equal(x, y)
    host2, dev2 = _pair()
    kv_state.restore(dev2, hs, "m")  # a host state onto a card
    kv_state.restore(host2, ds, "m")  # and a card's onto the host
    _same(host2, dev2)
    _same(host, dev2)
    for p in range(15, 19):
        _step(host2, dev2, p, np.random.default_rng(p))
    _same(host2, dev2)
    with pytest.raises(kv_state.StateMismatch, match="layout"):
        kv_state.restore(DeviceKVCache((NK,), D, (True,), W, 40, ROLLBACK, start_capacity=4), ds, "m")


def test_a_device_checkpoint_restores_on_the_host_and_back():
    """A state taken on the card carries its rings' checkpoint (no scales: the card's cache is
    float32); it restores on a host float32 cache as the host's own checkpoint does."""
    from runtime.model import kv_checkpoint

    host, dev = _pair()
    rng = np.random.default_rng(6)
    for p in range(12):
        _step(host, dev, p, rng)
    hc, dc = kv_checkpoint.take(host), kv_checkpoint.take(dev)
    for p in range(12, 16):
        _step(host, dev, p, rng)
    kv_checkpoint.restore(host, dc)  # the card's checkpoint on the host
    kv_checkpoint.restore(dev, hc)  # and the host's on the card
    _same(host, dev)
    assert host.n_past == dev.n_past == 12


def test_a_state_whose_checkpoint_does_not_fit_the_cache_is_refused_untouched():
    """Review 93: a checkpoint of one row of uint16 keys passed, then its restore broadcast that
    row over a whole ring."""
    import dataclasses

    from runtime.model import kv_checkpoint, kv_state

    host, dev = _pair()
    rng = np.random.default_rng(7)
    for p in range(10):
        _step(host, dev, p, rng)
    good = kv_state.take(host, list(range(10)), "m", kv_checkpoint.take(host))
    ring = good.checkpoint.rings[0]
    bad_rings = [dataclasses.replace(ring, k=ring.k[:1].view(np.uint16)[..., :D]),
                 dataclasses.replace(ring, index=1), dataclasses.replace(ring, pos=ring.pos[:2])]
    for cache in (host, dev):
        before = kv_state.take(host, list(range(10)), "m")
        for bad in bad_rings:
            state = dataclasses.replace(good, checkpoint=dataclasses.replace(good.checkpoint, rings=(bad,)))
            with pytest.raises(kv_state.StateMismatch, match="checkpoint"):
                kv_state.restore(cache, state, "m")
        with pytest.raises(kv_state.StateMismatch, match="checkpoint"):
            kv_state.restore(cache, dataclasses.replace(good, checkpoint=dataclasses.replace(good.checkpoint,
                                                                                            n_past=11)), "m")
        after = kv_state.take(host, list(range(10)), "m")
        assert all(np.array_equal(a, b) for x, y in zip(before.slots, after.slots) for a, b in zip(x, y))
        kv_state.restore(cache, good, "m")  # and the good one loads
