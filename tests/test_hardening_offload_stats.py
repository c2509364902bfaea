"""Issue 12, item 5: streaming telemetry that does not flatter.

Each request for an expert is a hit, a prefetch in time, a late prefetch (still loading
when compute asked) or a miss, counted apart; stall time includes waiting for a free
slot; the stats line no longer calls the bytes of prefetched experts "the bytes of the
experts that missed". Driven through the real provider on the tiny GGUF, with a reader
that holds chosen reads back.
"""

import threading
import time

import pytest

from offload.cache import ExpertCache
from offload.direct_io import DirectReader
from offload.expert_table import build_expert_table
from offload.provider import StreamingExperts, slot_bytes_for
from runtime.base.config import ModelConfig
from runtime.base.gguf_file import GGUFModelFile

LAYER = 1  # the tiny model's first MoE layer


class GatedReader(DirectReader):
    """A real reader whose reads of the gated offsets wait until `gate` is set."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()
        self.gated: set[int] = set()

    def read(self, path, offset, nbytes, buf):
        if offset in self.gated:
            assert self.gate.wait(30), "the test never opened the gate"
        return super().read(path, offset, nbytes, buf)


@pytest.fixture()
def streaming(tiny_gguf):
    f = GGUFModelFile(tiny_gguf("q4_k_m"))
    table = build_expert_table(f, ModelConfig.from_gguf(f))
    slot = slot_bytes_for(table)
    made = []

    def make(n_slots: int):
        reader = GatedReader()
        p = StreamingExperts(table, ExpertCache(n_slots * slot, slot), reader, workers=2)
        made.append(p)
        return p, reader

    yield make, table
    for p in made:
        p.close()


def open_gate_after(reader: GatedReader, seconds: float) -> threading.Timer:
    t = threading.Timer(seconds, reader.gate.set)
    t.start()
    return t


def wait_until(cond, timeout: float = 20.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout
        time.sleep(0.005)


def test_hits_prefetches_in_time_late_prefetches_and_misses_are_counted_apart(streaming):
    make, table = streaming
    p, reader = make(8)
    le = table.layers[LAYER]
    reader.gated = {ext.offset for ext in le.extents(1)}  # expert 1's reads wait for the gate

    p.prefetch(LAYER, [0])
    wait_until(lambda: p.cache.is_ready((LAYER, 0)))
    assert [e for e, _ in p.experts(LAYER, [0])] == [0]  # prefetched, ready: in time

    p.prefetch(LAYER, [1])
    # A read ahead still queued when its layer's request comes is dropped unread: wait until it started.
    wait_until(lambda: (LAYER, 1) in p.cache.index)
    timer = open_gate_after(reader, 0.3)
    assert [e for e, _ in p.experts(LAYER, [1])] == [1]  # prefetched, still loading: late, and waited for
    timer.join()

    assert [e for e, _ in p.experts(LAYER, [0, 1])] == [0, 1]  # both resident and used before: hits
    assert [e for e, _ in p.experts(LAYER, [2])] == [2]  # never read: a miss

    st = p.stats
    assert st.hits == 2, f"{st.hits} hits: a prefetched expert is not a hit"
    assert (st.hits, st.prefetched_in_time, st.prefetched_late, st.misses) == (2, 1, 1, 1)
    assert st.requests == 5 and st.hit_rate == pytest.approx(2 / 5) and st.ready_rate == pytest.approx(3 / 5)
    assert st.stall_read_seconds >= 0.25, "waiting for the late prefetch is a stall"
    assert st.ideal_bytes == 3 * le.expert_bytes  # the in-time and late prefetches and the miss were read for compute
    d = st.as_dict()
    assert (d["hits"], d["prefetched_in_time"], d["prefetched_late"], d["misses"]) == (2, 1, 1, 1)
    text = st.text()
    assert "2 hits, 1 prefetched in time, 1 prefetched late, 1 misses" in text
    assert "the experts that missed" not in text, "prefetched experts are not misses"
    assert "misses and used prefetches" in text


def test_waiting_for_a_free_slot_is_stall_time(streaming):
    make, table = streaming
    p, reader = make(4)
    taken = []
    for e in range(4):  # another user holds every slot
        slot, must = p.cache.acquire((LAYER, 10 + e))
        p.cache.loaded(slot, "held elsewhere")
        taken.append((slot, (LAYER, 10 + e)))

    def give_one_back():
        time.sleep(0.3)
        p.cache.release(*taken.pop())

    t = threading.Thread(target=give_one_back)
    t.start()
    assert [e for e, _ in p.experts(LAYER, [5])] == [5]
    t.join()
    st = p.stats
    assert st.misses == 1
    assert st.stall_seconds >= 0.25, f"stalled {st.stall_seconds:.3f} s while waiting 0.3 s for a free slot"
    assert st.stall_slot_seconds >= 0.25 and st.stall_seconds >= st.stall_slot_seconds
    assert "no slot free" in st.text()
