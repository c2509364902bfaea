"""Streaming routed experts: identical outputs under any budget, a budget that holds, clear errors."""

import os
import random
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from offload.cache import ExpertCache, IllegalTransition, Slot, SlotState
from runtime.base.cgroup import CgroupUnavailable, MemoryCap, drop_page_cache
from offload.direct_io import DirectReader
from offload.expert_table import build_expert_table
from offload.profile import ExpertProfile
from runtime.base.errors import StepstreamError
from runtime.loader import load

PROMPT = list(range(3, 3 + 70))


@pytest.fixture(scope="module")
def q4(tiny_gguf):
    return tiny_gguf("q4_k_m")


@pytest.fixture(scope="module")
def reference(q4):
    m = load(q4)
    try:
        logits = m.logits(PROMPT)
        decode = [m.eval([t]) for t in (5, 9, 200, 17)]
        table = build_expert_table(m.file, m.cfg)
        # the table's extents are the bytes the mapped file holds for each expert
        le = table.layers[1]
        ext = le.extents(7)
        raw = np.fromfile(q4, dtype=np.uint8, count=ext[2].nbytes, offset=ext[2].offset)
        np.testing.assert_array_equal(raw, np.asarray(m.provider.table[1][7].down.data).reshape(-1))
        return logits, decode, table.total_bytes
    finally:
        m.close()


@pytest.mark.parametrize("share", [0.1, 0.3, 0.6])
def test_logits_bit_identical_under_budgets(q4, reference, share):
    logits, decode, total = reference
    m = load(q4, ram_budget=int(total * share))
    try:
        assert m.placement.cache_bytes <= total * share
        got = m.logits(PROMPT)
        got_decode = [m.eval([t]) for t in (5, 9, 200, 17)]
        stats = m.provider.stats
        assert np.array_equal(got, logits), f"prefill logits differ by up to {np.abs(got - logits).max()}"
        assert all(np.array_equal(a, b) for a, b in zip(got_decode, decode)), \
            f"decode logits differ by up to {max(np.abs(a - b).max() for a, b in zip(got_decode, decode))}"
        assert stats.misses > 0 and stats.bytes_read > 0
        if share < 0.5:
            assert m.provider.cache.counters.evictions > 0, "a small budget must evict"
        assert m.provider.cache.resident_bytes() <= m.placement.cache_bytes
    finally:
        m.close()


def test_policies_give_identical_logits(q4, reference, tmp_path):
    logits, _, total = reference
    m = load(q4, experts="stream")  # records a profile by hand: route the prompt once
    prof = ExpertProfile(q4.name, q4.stat().st_size)
    from offload.profile import RecordingProvider
    m.provider = RecordingProvider(m.provider, prof, m.cfg.n_expert)
    m.logits(PROMPT)
    m.close()
    prof.save(tmp_path / "p.json")
    for kwargs in ({"cache_policy": "lfu"}, {"profile": str(tmp_path / "p.json")}):
        s = load(q4, ram_budget=int(total * 0.3), **kwargs)
        try:
            assert np.array_equal(s.logits(PROMPT), logits)
            if "profile" in kwargs:
                pinned = [sl for sl in s.provider.cache.slots if sl.pinned]
                assert len(pinned) == s.placement.pinned > 0
                assert all(sl.state is SlotState.READY and sl.key in set(prof.hottest(len(pinned))) for sl in pinned)
        finally:
            s.close()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "one-by-one"])
def test_a_prefill_asks_its_provider_once_per_layer(q4, monkeypatch, fused):
    """With every expert in RAM, a prefill chunk's MoE layer holds its experts once: whether they
    then run in one fused kernel call or one by one (experts without a fused int8 kernel), a
    provider that counts requests (stepstream profile's) sees one request per layer."""
    from offload.profile import RecordingProvider
    from runtime.model import ffn

    if not fused:
        monkeypatch.setattr(ffn, "_fused_sum", lambda *args: None)
    m = load(q4)
    try:
        rec = m.provider = RecordingProvider(m.provider, ExpertProfile(q4.name, q4.stat().st_size),
                                             m.cfg.n_expert, keep_calls=True)
        m.logits(PROMPT[:20])
        layers = [layer for layer, _ in rec.calls]
        assert layers and len(layers) == len(set(layers)), layers
    finally:
        m.close()


def test_in_ram_decode_routes_inside_a_kernel_with_the_held_paths_bits(q4, reference):
    """With every expert in RAM, a decode step takes its experts' descriptors from the provider's
    table in the routing kernel, without asking `held`; a provider that must be asked (stepstream
    profile's) takes the held path. Both give the reference's decode logits to the bit."""
    from offload.profile import RecordingProvider

    logits, decode, _ = reference
    m = load(q4)
    try:
        table = m.provider.descriptors(1)
        assert table is not None and table.shape == (m.cfg.n_expert, 6)
        assert np.array_equal(table[7], m.provider.table[1][7].descriptor)
        m.logits(PROMPT)
        m.provider.held = None  # a decode step that asked would fail here
        assert all(np.array_equal(m.eval([t]), d) for t, d in zip((5, 9, 200, 17), decode))
    finally:
        m.close()
    m = load(q4)
    try:
        rec = m.provider = RecordingProvider(m.provider, ExpertProfile(q4.name, q4.stat().st_size), m.cfg.n_expert,
                                             keep_calls=True)
        assert rec.descriptors(1) is None
        m.logits(PROMPT)
        before = len(rec.calls)
        assert all(np.array_equal(m.eval([t]), d) for t, d in zip((5, 9, 200, 17), decode))
        assert len(rec.calls) - before == 4 * sum(b.moe for b in m.blocks)  # one request per MoE layer and token
    finally:
        m.close()


def test_prefetch_never_changes_outputs_and_is_measured(q4, reference):
    logits, decode, total = reference
    for prefetch in (False, True):
        m = load(q4, ram_budget=int(total * 0.3), prefetch=prefetch)
        try:
            m.logits(PROMPT)
            got = [m.eval([t]) for t in (5, 9, 200, 17)]
            assert all(np.array_equal(a, b) for a, b in zip(got, decode))
            st = m.provider.stats
            if prefetch:
                assert st.prefetch_predicted > 0 and 0 < st.prefetch_recall <= 1 and 0 < st.prefetch_precision <= 1
            else:
                assert st.prefetch_predicted == 0
        finally:
            m.close()


def test_budget_too_small_is_a_clear_error(q4):
    with pytest.raises(StepstreamError, match="holds 2 experts .* at least 4 are needed"):
        load(q4, ram_budget=300_000)
    with pytest.raises(StepstreamError, match="cannot read"):
        load(q4, ram_budget="lots")


def test_injected_read_error_names_file_and_offset(q4, reference, monkeypatch):
    import offload.direct_io as dio

    m = load(q4, ram_budget=int(reference[2] * 0.3), prefetch=False)
    bad = m.provider.table.layers[2].extents(0)[1].offset
    real = os.preadv

    def failing(fd, buffers, offset):
        if offset <= bad < offset + sum(len(b) for b in buffers):
            raise OSError(5, "Input/output error")
        return real(fd, buffers, offset)

    monkeypatch.setattr(dio.os, "preadv", failing)
    try:
        with pytest.raises(StepstreamError) as err:
            for _ in range(3):
                m.logits(PROMPT)
        msg = str(err.value)
        assert str(q4) in msg and f"offset {bad}" in msg and "Input/output error" in msg
    finally:
        m.close()


def test_truncated_file_read_is_a_clear_error(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(bytes(10000))
    from offload.direct_io import aligned_empty

    r = DirectReader()
    with pytest.raises(StepstreamError, match=r"offset 9000 came back short"):
        r.read(p, 9000, 5000, aligned_empty(3 * 4096))
    r.close()


def test_o_direct_refused_falls_back_with_warning(tmp_path, monkeypatch):
    """Filesystems such as older tmpfs refuse O_DIRECT at open: reads still work, with a warning."""
    import offload.direct_io as dio
    from offload.direct_io import aligned_empty

    path = tmp_path / "f.bin"
    data = np.random.default_rng(0).integers(0, 255, 20000, dtype=np.uint8)
    data.tofile(path)
    real_open = os.open

    def refusing(p, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(p, flags, *a)

    monkeypatch.setattr(dio.os, "open", refusing)
    r = DirectReader()
    with pytest.warns(RuntimeWarning, match="refuses O_DIRECT"):
        got = r.read(path, 1234, 5000, aligned_empty(4 * 4096))
    np.testing.assert_array_equal(got, data[1234:6234])
    assert r.fallback_paths == [path]
    r.close()


# ----------------------------------------------------------------------------- the cache itself


def test_illegal_transitions_raise():
    s = Slot(0, np.zeros(8, np.uint8))
    with pytest.raises(IllegalTransition):
        s.move(SlotState.READY)  # EMPTY -> READY skips LOADING
    s.move(SlotState.LOADING)
    with pytest.raises(IllegalTransition):
        s.move(SlotState.EVICTING)  # a loading slot is never evicted
    cache = ExpertCache(4 * 64, 64)
    slot, must = cache.acquire((0, 1))
    cache.loaded(slot, "payload")
    cache.release(slot, (0, 1))
    with pytest.raises(IllegalTransition):
        cache.release(slot, (0, 1))


def test_eviction_never_drops_an_in_use_expert_under_threads():
    """16 threads hammer a 6-slot cache; each checks its expert's bytes while it holds it."""
    cache = ExpertCache(6 * 256, 256, policy="lru")
    errors = []
    stop = threading.Event()

    def pattern(key):
        return np.full(256, (key[0] * 31 + key[1]) % 251, dtype=np.uint8)

    def worker(seed):
        rnd = random.Random(seed)
        try:
            for _ in range(400):
                key = (rnd.randrange(3), rnd.randrange(5))
                slot, must = cache.acquire(key, timeout=20)
                if must:
                    slot.buffer[:] = pattern(key)
                    cache.loaded(slot, key)
                payload = cache.wait_ready(slot, key, timeout=20)
                assert payload == key and slot.state is SlotState.READY and slot.key == key
                for _ in range(3):  # hold it while others churn
                    assert np.array_equal(slot.buffer, pattern(key)), "an in-use slot was overwritten"
                cache.release(slot, key)
                if rnd.random() < 0.3:  # a prefetch claim; the completer thread fills it
                    cache.try_claim_for_prefetch((rnd.randrange(3), rnd.randrange(5)))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            stop.set()

    def completer():  # completes prefetch claims, as the provider's reader threads do
        while not stop.is_set():
            with cache.lock:
                loading = [s for s in cache.slots if s.state is SlotState.LOADING and s.prefetched]
            for s in loading:
                key = s.key
                if key is not None:
                    s.buffer[:] = pattern(key)
                    try:
                        cache.loaded(s, key)
                    except IllegalTransition:
                        pass
            stop.wait(0.001)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    helper = threading.Thread(target=completer)
    helper.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    helper.join()
    assert not errors, errors[0]
    assert cache.counters.evictions > 0
    assert all(s.refs == 0 for s in cache.slots)


# ----------------------------------------------------------------------------- a real memory cap

CAPPED = textwrap.dedent("""
    import sys, numpy as np
    from runtime.loader import load
    m = load(sys.argv[1], ram_budget=int(sys.argv[2]))
    np.save(sys.argv[3], m.logits(list(range(3, 43))))
    print(m.placement.text())
    print(m.provider.stats.text())
""")


@pytest.mark.slow
def test_streaming_runs_under_a_cgroup_cap_smaller_than_the_model(tmp_path):
    from convert.converter import convert
    from convert.mini import write_mini

    ckpt = write_mini(tmp_path / "stress", "stress", seed=5)
    model = tmp_path / "stress-q8_0.gguf"
    convert(ckpt, model, "q8_0", progress=False)
    size = model.stat().st_size
    cap = int(size * 0.6)
    budget = 48 * 2**20
    ref = load(model).logits(list(range(3, 43)))
    drop_page_cache(model)
    try:
        with MemoryCap(cap) as group:
            r = group.run([sys.executable, "-c", CAPPED, str(model), str(budget), str(tmp_path / "l.npy")],
                          capture_output=True, text=True, timeout=600)
            peak = group.max_usage
    except CgroupUnavailable as e:
        pytest.skip(f"no memory cgroup for a RAM cap here: {e}")
    assert r.returncode == 0, r.stderr[-2000:]
    print(f"\n{size / 2**20:.0f} MiB model under a {cap / 2**20:.0f} MiB cap: peak {peak / 2**20:.0f} MiB\n{r.stdout}")
    assert peak <= cap
    assert np.array_equal(np.load(tmp_path / "l.npy"), ref)


def test_auto_streams_only_when_the_model_does_not_fit(q4, monkeypatch):
    from runtime.base import system
    from runtime.model.experts import InMemoryExperts

    m = load(q4)
    assert isinstance(m.provider, InMemoryExperts) and m.placement is None
    m.close()
    from offload.placement import kv_cache_bytes
    from runtime.base.options import RuntimeOptions

    # half the file, and room for the KV cache at the full context (which no reserve covers)
    kv = kv_cache_bytes(m.cfg, m.n_ctx, RuntimeOptions().rollback, kv_types=RuntimeOptions().kv_types)
    monkeypatch.setattr(system, "usable_memory", lambda: q4.stat().st_size // 2 + kv)
    s = load(q4)
    try:
        assert s.placement is not None and s.provider.stats is not None
        assert s.placement.cache_bytes <= q4.stat().st_size // 2
    finally:
        s.close()
    assert isinstance(load(q4, experts="ram").provider, InMemoryExperts)


def test_a_failed_slot_reclaimed_for_another_expert_is_never_served():
    """After a failed read, its slot may be claimed again; the waiter gets the error, not the new payload."""
    cache = ExpertCache(2 * 64, 64)
    slot, must = cache.acquire((1, 1))
    assert must
    cache.failed(slot, StepstreamError("disk.gguf: read of 64 bytes at offset 4096 failed (Input/output error)"))
    other = cache.try_claim_for_prefetch((2, 2))
    assert other is not None
    if other is slot:
        cache.loaded(other, "weights of (2, 2)")
    assert cache.ready_payload(slot, (1, 1)) is None
    with pytest.raises(StepstreamError, match="offset 4096"):
        cache.wait_ready(slot, (1, 1))
    cache.release(slot, (1, 1))  # a no-op: the slot no longer holds (1, 1)


def test_streaming_from_a_split_file(q4, reference, tmp_path):
    """Experts of a model split in parts are read from whichever part holds them."""
    from tests.helpers.gguf_edit import rewrite

    rewrite(q4, tmp_path / "tiny.gguf", split_max_tensors=40)
    parts = sorted(tmp_path.glob("tiny-*-of-*.gguf"))
    assert len(parts) >= 2
    m = load(parts[0], ram_budget=int(reference[2] * 0.3))
    try:
        files = {ext.path for le in m.provider.table.layers.values() for e in range(le.n_expert) for ext in le.extents(e)}
        assert len(files) >= 2, "the experts should come from more than one part"
        assert np.array_equal(m.logits(PROMPT), reference[0])
    finally:
        m.close()


def test_fill_cache_starts_warm_and_changes_no_output(q4, reference):
    """fill_cache reads an even share of every layer's experts into the free slots at load:
    the bytes of exactly those experts, none evicted; the first requests for them are hits,
    and the logits are the cold cache's, bit for bit."""
    logits, decode, total = reference
    m = load(q4, ram_budget=int(total * 0.5), fill_cache=True, prefetch=False)
    try:
        cache, st = m.provider.cache, m.provider.stats
        held = sorted(cache.index)
        per_layer = {l: [e for ll, e in held if ll == l] for l in m.provider.table.layers}
        assert len(held) == cache.n_slots == m.placement.filled > 0
        assert max(map(len, per_layer.values())) - min(map(len, per_layer.values())) <= 1
        assert all(ids == list(range(len(ids))) for ids in per_layer.values())  # the lowest ids, read in order
        assert cache.counters.evictions == 0 and st.misses == 0 and st.reads == len(held)
        assert f"{len(held)} read at load" in m.placement.text()
        got = m.logits(PROMPT)
        warm_hits = st.hits
        assert np.array_equal(got, logits)
        assert all(np.array_equal(m.eval([t]), want) for t, want in zip((5, 9, 200, 17), decode))
    finally:
        m.close()
    cold = load(q4, ram_budget=int(total * 0.5), prefetch=False)
    try:
        cold.logits(PROMPT)
        assert cold.placement.filled == 0 and cold.provider.stats.hits < warm_hits  # the same prompt, warm vs cold
    finally:
        cold.close()


def test_fill_keys_deal_every_free_slot_across_layers():
    """Pins that fill most of one layer leave its share to the others: every free slot is used."""
    from types import SimpleNamespace

    from offload.placement import fill_keys

    table = SimpleNamespace(layers={1: SimpleNamespace(n_expert=8), 2: SimpleNamespace(n_expert=8)})
    keys = fill_keys(table, 10, {(1, e) for e in range(6)})
    assert keys == [(1, 6), (1, 7)] + [(2, e) for e in range(8)]
    assert fill_keys(table, 5, set()) == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]
    assert len(fill_keys(table, 100, set())) == 16


def test_a_failed_fill_read_drops_the_reads_not_started(q4, reference, monkeypatch):
    """One bad read stops the fill at once: the reads still queued are dropped, not run."""
    import offload.direct_io as dio

    real, calls = dio.DirectReader.read, []

    def read(self, path, offset, nbytes, buf):
        calls.append(offset)
        if len(calls) == 1:
            raise dio.ReadError(f"{path}: injected failure at offset {offset}")
        time.sleep(0.05)
        return real(self, path, offset, nbytes, buf)

    whole = load(q4, ram_budget=int(reference[2] * 0.6), fill_cache=True, prefetch=False)
    reads = whole.provider.stats.reads  # what the whole fill reads (one per expert)
    whole.close()
    monkeypatch.setattr(dio.DirectReader, "read", read)
    with pytest.raises(StepstreamError, match="injected failure"):
        load(q4, ram_budget=int(reference[2] * 0.6), fill_cache=True, prefetch=False)
    extents = len(calls) / 3  # each expert is three reads (gate, up, down)
    assert reads > 20 and extents < reads / 2, (extents, reads)


def test_fill_cache_read_error_is_clear_and_leaves_nothing_open(q4, reference, monkeypatch):
    import offload.direct_io as dio

    def failing(*args):
        raise OSError(5, "Input/output error")

    def readers():
        return sum(t.name.startswith("expert-read") and t.is_alive() for t in threading.enumerate())

    before = readers()
    monkeypatch.setattr(dio.os, "preadv", failing)
    monkeypatch.setattr(dio.os, "pread", failing, raising=False)
    with pytest.raises(StepstreamError, match="Input/output error") as err:
        load(q4, ram_budget=int(reference[2] * 0.3), fill_cache=True)
    assert str(q4) in str(err.value) and "offset" in str(err.value)
    deadline = time.time() + 10
    while readers() > before and time.time() < deadline:  # the pool's threads exit once told to
        time.sleep(0.05)
    assert readers() == before


def test_arriving_hands_over_resident_experts_first_and_releases_every_slot(q4, reference):
    """StreamingExperts.arriving (a streaming decode step): the experts resident when asked come
    at once, the others as their reads finish, each with the file's bytes; every slot is released
    after the step, and after a step that raised part-way, so later steps give the same logits."""
    logits, _, total = reference
    m = load(q4, ram_budget=int(total * 0.3), prefetch=False)
    ram = load(q4)
    try:
        p = m.provider
        m.logits(PROMPT[:8])  # leaves some experts resident
        layer = max(p.table.layers, key=lambda l: sum(p.cache.is_ready((l, e)) for e in range(m.cfg.n_expert)))
        resident = [e for e in range(m.cfg.n_expert) if p.cache.is_ready((layer, e))]
        absent = [e for e in range(m.cfg.n_expert) if e not in resident]
        assert len(resident) >= 2 and len(absent) >= 4
        ids = sorted(resident[:2] + absent[:2])
        with p.arriving(layer, ids) as (ready, later):
            got = ready + list(later)
            assert [e for e, _ in got][:2] == resident[:2]  # the resident ones first, not waited for
            assert set(resident[:2]) <= {e for e, _ in ready}
            assert sorted(e for e, _ in got) == ids
            for e, ew in got:
                want = ram.provider.table[layer][e]
                for mine, theirs in ((ew.gate, want.gate), (ew.up, want.up), (ew.down, want.down)):
                    np.testing.assert_array_equal(np.asarray(mine.data).reshape(-1), np.asarray(theirs.data).reshape(-1))
        assert all(s.refs == 0 for s in p.cache.slots)
        with pytest.raises(RuntimeError, match="a kernel failed"):
            with p.arriving(layer, sorted(absent[2:4] + resident[:1])) as (ready, later):
                next(iter(later))
                raise RuntimeError("a kernel failed")
        deadline = time.monotonic() + 10
        while any(s.state is SlotState.LOADING for s in p.cache.slots) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(s.refs == 0 and s.state is not SlotState.LOADING for s in p.cache.slots)
        m.reset()
        assert np.array_equal(m.logits(PROMPT), logits)
    finally:
        m.close()
        ram.close()
