"""Issue 17, part 2: reads ahead that pay.

The gate's decision against hand-computed thresholds; precision counted from what the
cache saw (a read-ahead expert used before eviction counts for it, one evicted unused
against it); demand reads overtaking queued reads ahead, and stale reads ahead dropped
unread; the bytes-read accounting against a reader that counts what it was asked;
greedy decoding identical with the gate, without it, and with no reads ahead; the
disk-curve helper on a small file.
"""

import threading
import time

import numpy as np
import pytest

from offload.cache import ExpertCache
from offload.direct_io import AHEAD, DEMAND, DirectReader, DiskPoint, ReadPool, knee, measure_read_bandwidth, span
from offload.expert_table import build_expert_table
from offload.prefetch_gate import PRIOR_WEIGHT, PrefetchGate, RankCounts, threshold
from offload.provider import StreamingExperts, slot_bytes_for
from runtime.base.config import ModelConfig
from runtime.base.errors import StepstreamError
from runtime.base.gguf_file import GGUFModelFile
from runtime.loader import load

LAYER = 1  # the tiny model's first MoE layer


def wait_until(cond, timeout: float = 20.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.005)


# ---------------------------------------------------------------------- the decision


def test_threshold_by_hand():
    # r = 3 ms, lead 10 ms, cold cache, idle disk: gain = cost = 3 ms -> 1/2
    assert threshold(0.003, 0.010) == pytest.approx(0.5)
    # hit rate 1/2: a wasted read also holds a slot for a turn, h/(1-h) = 1 more miss: cost 6 ms, gain 3 ms
    assert threshold(0.003, 0.010, hit_rate=0.5) == pytest.approx(6 / 9)
    # and a disk busy 1/4 of the time: gain 3 * 0.75 = 2.25 ms -> 6 / 8.25
    assert threshold(0.003, 0.010, hit_rate=0.5, disk_busy=0.25) == pytest.approx(6 / 8.25)
    # a read longer than the lead hides only the lead: 3 / (1 + 3)
    assert threshold(0.003, 0.001) == pytest.approx(0.75)
    # a saturated disk: a read ahead hides nothing, so nothing but a sure guess pays
    assert threshold(0.003, 0.010, disk_busy=1.0) == pytest.approx(1.0)
    assert threshold(0.0, 0.010) == 0.0  # an instant read costs nothing


def test_gate_admits_exactly_at_the_hand_computed_edge():
    # 3 MB at 1 GB/s: r = 3 ms; lead 10 ms, hit rate 1/2, disk busy 1/4 -> threshold 6 / 8.25 = 0.72727
    gate = PrefetchGate(disk_bytes_per_s=1e9)
    for _ in range(9):
        gate.record(0, used=True)
    gate.record(0, used=False)
    # no shadow score yet: prior 1/2 worth PRIOR_WEIGHT outcomes; p = (9 + 8 * 0.5) / (10 + 8) = 0.7222
    assert PRIOR_WEIGHT == 8.0
    assert gate.probability(0) == pytest.approx(13 / 18)
    assert not gate.admit(0, 3_000_000, 0.010, hit_rate=0.5, disk_busy=0.25)
    gate.record(0, used=True)  # p = (10 + 4) / 19 = 0.7368
    assert gate.probability(0) == pytest.approx(14 / 19)
    assert gate.admit(0, 3_000_000, 0.010, hit_rate=0.5, disk_busy=0.25)
    assert (gate.admitted, gate.refused) == (1, 1)
    # a faster disk does not change a ratio of times; a slower one, whose read outlasts the lead, raises it
    assert not gate.admit(0, 3_000_000, 0.001, hit_rate=0.5, disk_busy=0.25)  # 6/(0.75+6) = 0.889


def test_waste_budget_by_hand():
    """Reads ahead may waste at most a tenth of the bytes read for compute plus one expert: bytes
    wasted so far, plus (1 - p) of every read whose fate is pending, plus (1 - p) of the candidate."""
    gate = PrefetchGate(disk_bytes_per_s=1e9)
    for _ in range(10):
        gate.record(0, used=True)
    p = gate.probability(0)  # (10 + 8 * 0.5) / 18 = 7/9: a 2 MB read ahead wastes 4/9 MB expected
    assert p == pytest.approx(7 / 9)
    mb = 1_000_000
    for _ in range(4):  # nothing read for compute yet: one expert's 2 MB of room, 4 x 0.444 MB
        assert gate.admit(0, 2 * mb, 0.010, needed_bytes=0)
    assert not gate.admit(0, 2 * mb, 0.010, needed_bytes=0)  # 5 x 0.444 > 2
    assert gate.over_budget == 1 and gate.refused == 1
    assert gate.admit(0, 2 * mb, 0.010, needed_bytes=3 * mb)  # 0.3 MB more room: 2.22 <= 2.3
    assert not gate.admit(0, 2 * mb, 0.010, needed_bytes=3 * mb)  # 2.67 > 2.3
    gate.dropped(0)  # one was never read: its expected waste goes
    assert gate.admit(0, 2 * mb, 0.010, needed_bytes=3 * mb)
    gate.record(0, used=False)  # one evicted unused: 2 MB wasted for good, and p = 14/19
    assert gate.wasted_bytes == 2 * mb
    assert gate.probability(0) == pytest.approx(14 / 19)
    # 2 MB wasted + 4 pending x 2 MB x 5/19 + the candidate's 2 MB x 5/19 = 4.63 MB
    assert not gate.admit(0, 2 * mb, 0.010, needed_bytes=26 * mb)  # room 2.6 + 2
    assert gate.admit(0, 2 * mb, 0.010, needed_bytes=27 * mb)  # room 2.7 + 2
    assert gate.admit(0, 2 * mb, 0.010)  # no budget given: the threshold alone
    # a candidate under the threshold is refused before the budget is looked at
    assert not gate.admit(0, 2 * mb, 0.010, hit_rate=0.9, needed_bytes=1e12)
    assert gate.over_budget == 3


def test_shadow_score_is_the_prior_of_a_rank_never_read():
    gate = PrefetchGate()
    for _ in range(10):  # rank 0 always asked for by the next request, rank 1 never
        gate.score_guess([4, 7], {4, 9})
    assert gate.probability(0) == pytest.approx(10.5 / 11)
    assert gate.probability(1) == pytest.approx(0.5 / 11)
    c = RankCounts(used=2, wasted=6, shadow_hits=10, shadow_seen=10)  # reads outweigh the prior as they come
    assert c.probability() == pytest.approx((2 + 8 * 10.5 / 11) / (8 + 8))


# ---------------------------------------------------------------------- precision counted from the cache


def test_precision_counts_used_before_eviction_for_and_evicted_unused_against():
    heard = []
    cache = ExpertCache(2 * 4096, 4096, on_prefetch_outcome=lambda rank, used: heard.append((rank, used)))
    a = cache.try_claim_for_prefetch((1, 1), rank=2)
    cache.loaded(a, "a")
    slot, must = cache.acquire((1, 1))  # first use of a read-ahead expert: counts for rank 2
    assert not must and heard == [(2, True)]
    cache.release(slot, (1, 1))
    slot, _ = cache.acquire((1, 1))  # a second use is a plain hit: no second outcome
    cache.release(slot, (1, 1))
    b = cache.try_claim_for_prefetch((1, 2), rank=0)
    cache.loaded(b, "b")
    # two demand misses: LRU evicts (1, 1) (used: nothing to say), then (1, 2), never asked for
    for e in (3, 4):
        slot, must = cache.acquire((1, e))
        assert must
        cache.loaded(slot, str(e))
        cache.release(slot, (1, e))
    assert heard == [(2, True), (0, False)]
    assert (cache.counters.prefetch_used, cache.counters.prefetch_wasted) == (1, 1)


@pytest.fixture()
def table(tiny_gguf):
    f = GGUFModelFile(tiny_gguf("q4_k_m"))
    return build_expert_table(f, ModelConfig.from_gguf(f))


class CountingReader(DirectReader):
    """A real reader that counts the aligned bytes it was asked for, and can hold reads back."""

    def __init__(self):
        super().__init__()
        self.asked = 0
        self.hold = threading.Event()
        self.hold.set()
        self.started = threading.Event()
        self.lock = threading.Lock()

    def read(self, path, offset, nbytes, buf):
        self.started.set()
        assert self.hold.wait(30)
        with self.lock:
            self.asked += span(offset, nbytes)[1]
        return super().read(path, offset, nbytes, buf)


def test_provider_precision_and_bytes_read_accounting(table):
    slot = slot_bytes_for(table)
    reader = CountingReader()
    p = StreamingExperts(table, ExpertCache(8 * slot, slot), reader, workers=2, gate=False)
    le = table.layers[LAYER]
    try:
        p.prefetch(LAYER, [0, 1])  # ungated: both read ahead (at most a quarter of the 8 slots)
        wait_until(lambda: p.cache.is_ready((LAYER, 0)) and p.cache.is_ready((LAYER, 1)))
        assert [e for e, _ in p.experts(LAYER, [0, 2])] == [0, 2]  # 0 used, 2 a miss; 1 unused so far
        for e in range(3, 9):  # misses that fill the 5 free slots, then evict LRU's oldest: 1, unused
            assert [x for x, _ in p.experts(LAYER, [e])] == [e]
        st = p.stats
        assert (st.prefetch_reads, st.prefetch_used, st.prefetch_wasted) == (2, 1, 1)
        assert st.prefetch_precision == pytest.approx(0.5)
        assert st.misses == 7 and st.prefetched_in_time == 1
        per_expert = sum(span(ext.offset, ext.nbytes)[1] for ext in le.extents(0))
        assert all(sum(span(x.offset, x.nbytes)[1] for x in le.extents(e)) == per_expert for e in range(9))
        assert st.bytes_read == reader.asked == 9 * per_expert  # 2 reads ahead and 7 misses, aligned spans
        assert st.prefetch_bytes_read == 2 * per_expert
        assert st.ideal_bytes == 8 * le.expert_bytes  # what compute used after a read: 7 misses and expert 0
        assert "precision 50.0% (1 used before eviction, 1 evicted unused)" in st.text()
    finally:
        p.close()


def test_demand_reads_overtake_queued_reads_ahead():
    pool = ReadPool(1)
    gate, order = threading.Event(), []
    try:
        pool.submit(DEMAND, gate.wait, 30)  # occupies the only worker
        pool.submit(AHEAD, order.append, "ahead 1")
        pool.submit(AHEAD, order.append, "ahead 2")
        pool.submit(DEMAND, order.append, "demand")
        gate.set()
    finally:
        pool.shutdown()
    assert order == ["demand", "ahead 1", "ahead 2"]
    with pytest.raises(StepstreamError, match="read workers must be >= 1, got 0"):
        ReadPool(0)


def test_a_read_ahead_still_queued_when_its_layer_asks_is_dropped_unread(table):
    slot = slot_bytes_for(table)
    reader = CountingReader()
    reader.hold.clear()
    p = StreamingExperts(table, ExpertCache(8 * slot, slot), reader, workers=1, gate=False)
    try:
        p.prefetch(LAYER + 1, [0])  # takes the only worker, held at its first read
        assert reader.started.wait(10)
        p.prefetch(LAYER, [5, 6])  # queued behind it
        threading.Timer(0.2, reader.hold.set).start()
        assert [e for e, _ in p.experts(LAYER, [7])] == [7]  # the request came first: 5 and 6 are stale
        wait_until(lambda: p.stats.prefetch_cancelled == 2)
        assert not p.cache.is_ready((LAYER, 5)) and not p.cache.is_ready((LAYER, 6))
        assert p.stats.prefetch_reads == 1 and p.stats.misses == 1
    finally:
        p.close()


# ---------------------------------------------------------------------- outputs never change


def test_greedy_output_identical_gated_ungated_and_off(tiny_gguf):
    path = tiny_gguf("q4_k_m")
    ram = load(path)
    total = build_expert_table(ram.file, ram.cfg).total_bytes

    def greedy(m, n=10):
        logits, out, rows = m.eval([1, 5, 9, 200, 17]), [], []  # logits [V] of the last token
        for _ in range(n):
            rows.append(logits)
            out.append(int(np.argmax(logits)))
            logits = m.eval([out[-1]])
        return out, rows

    try:
        want, want_rows = greedy(ram)
    finally:
        ram.close()
    stats = {}
    for mode in ("gated", "ungated", "off"):
        m = load(path, ram_budget=int(total * 0.3), prefetch=mode != "off")
        try:
            if mode == "ungated":
                m.provider.gate = None
            got, rows = greedy(m)
            assert got == want, mode
            assert all(np.array_equal(a, b) for a, b in zip(rows, want_rows)), mode
            stats[mode] = m.provider.stats
        finally:
            m.close()
    assert stats["off"].prefetch_reads == 0 and stats["off"].prefetch_predicted == 0
    assert stats["ungated"].prefetch_reads > 0 and stats["ungated"].prefetch_refused == 0
    g = stats["gated"]
    assert g.prefetch_predicted > 0 and g.prefetch_reads + g.prefetch_refused + g.prefetch_cancelled > 0


def test_reads_ahead_waste_at_most_a_tenth_of_the_bytes_read_for_compute(tiny_gguf, monkeypatch):
    """With the threshold out of the way (every candidate pays), the waste budget alone bounds the
    bytes of reads ahead evicted unused to a tenth of the bytes read for compute, give or take the
    reads pending when the run ends; without the budget the same run wastes more than that."""
    import offload.prefetch_gate as pg

    monkeypatch.setattr(pg, "threshold", lambda *a, **k: 0.0)
    path = tiny_gguf("q4_k_m")
    ram = load(path)
    table = build_expert_table(ram.file, ram.cfg)
    ram.close()
    sizes = {le.expert_bytes for le in table.layers.values()}
    ids = np.random.default_rng(3).integers(4, 200, 60).tolist()
    got = {}
    for max_waste in (pg.MAX_WASTE, float("inf")):
        m = load(path, ram_budget=int(table.total_bytes * 0.3))
        try:
            m.provider.gate.max_waste = max_waste
            m.eval(ids[:4])
            for t in ids[4:]:
                m.eval([t])
            st, gate = m.provider.stats, m.provider.gate
            assert gate.wasted_bytes == sum(st.prefetch_wasted * b for b in sizes) / len(sizes)
            got[max_waste] = (st.prefetch_reads, gate.wasted_bytes, st.ideal_bytes)
        finally:
            m.close()
    reads, wasted, needed = got[pg.MAX_WASTE]
    assert reads > 0 and wasted <= 0.10 * needed + 2 * max(sizes), got
    reads, wasted, needed = got[float("inf")]
    assert wasted > 0.10 * needed + 2 * max(sizes), got


# ---------------------------------------------------------------------- the disk curve


def test_knee_and_disk_curve_on_a_small_file(tmp_path):
    pts = [DiskPoint(1, 1.0, 16), DiskPoint(2, 1.8, 16), DiskPoint(4, 2.3, 16), DiskPoint(8, 2.4, 32)]
    assert knee(pts) == 4  # 2.3 >= 0.9 * 2.4; 1.8 is not
    assert knee(pts, share=0.7) == 2
    f = tmp_path / "blob"
    f.write_bytes(np.random.default_rng(0).integers(0, 256, 40 * 2**16, dtype=np.uint8).tobytes())
    got = measure_read_bandwidth(f, depths=(1, 2), block=2**16, reads_per_depth=16)
    assert [(p.depth, p.reads) for p in got] == [(1, 16), (2, 16)] and all(p.gb_s > 0 for p in got)
    with pytest.raises(StepstreamError, match="hold 40 blocks of 65536; measuring depths .* needs 48"):
        measure_read_bandwidth(f, depths=(1, 2), block=2**16, reads_per_depth=24)


def test_the_streaming_bench_measures_the_disk_on_a_file_too_small_for_8mb_reads(tmp_path):
    """`python -m runtime.bench.streaming` ended in a traceback on every file under 1.2 GB (its
    own default model among them): 8 MiB reads at depths 1-16 need 144 distinct blocks. It now
    reads smaller blocks there, at the depths the file holds, and a file too small for any is
    one line."""
    from runtime.bench.streaming import measure_disk
    from offload.direct_io import depths_that_fit

    assert depths_that_fit(1210 * 2**20, 8 * 2**20) == (1, 2, 4, 8, 16)
    assert depths_that_fit(940 * 2**20, 8 * 2**20) == (1, 2, 4, 8)  # the review's 940 MB file: 112 blocks
    f = tmp_path / "blob"
    f.write_bytes(np.random.default_rng(0).integers(0, 256, 40 * 2**20, dtype=np.uint8).tobytes())
    disk = measure_disk(f, 2**18)
    assert disk["big_bytes"] == 2**19 and [d for d, _ in disk["big"]] == [1, 2, 4, 8]  # 80 blocks of 512 KiB
    assert [d for d, _ in disk["extent"]] == [1, 2, 4, 8] and disk["best_gb_s"] > 0
    small = tmp_path / "small"
    small.write_bytes(bytes(2**20))
    with pytest.raises(StepstreamError, match="too few to measure the disk's reads"):
        measure_disk(small, 2**18)
