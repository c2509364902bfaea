"""The streaming expert provider: routed experts from the cache, misses read from disk.

It implements runtime.model.experts.ExpertProvider. For one layer's request it takes a
reference on every requested expert (so none of them can be evicted while compute uses
it), queues reads for the misses on a pool of reader threads, yields the resident experts
first and the others as their reads finish, and drops the references when the consumer
is done. The real routing decides what is computed, so outputs never depend on reads ahead.

`prefetch(layer, ids)` takes a guess of the next layer's experts, best first. Each
candidate passes a gate (offload.prefetch_gate) that reads it ahead only when the
measured chance it is used, against the disk's speed, makes the read pay. Reads ahead
queue behind demand reads (offload.direct_io.ReadPool), claim their slot only when a
reader starts them, and are dropped unread when their layer's request came first.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from offload.cache import ExpertCache, Outcome, Slot
from offload.direct_io import AHEAD, DEMAND, DirectReader, ReadError, ReadPool, span, span_bytes
from offload.expert_table import ExpertTable
from offload.prefault import Prefault
from offload.prefetch_gate import PrefetchGate
from offload.stats import StreamStats
from runtime.base.errors import StepstreamError
from runtime.base.gguf_schema import expert_name
from runtime.model.weights import FFN
from runtime.model.matrix import matrix_from_bytes

LEAD_SMOOTHING = 0.2  # weight of the newest lead time in its running average
MIN_READ_SECONDS = 0.05  # busy read time after which the measured disk rate replaces the gate's default


def slot_bytes_for(table: ExpertTable) -> int:
    return max(sum(span_bytes(s) for s in layer.strides) for layer in table.layers.values())


class StreamingExperts:
    prefetches = True  # runtime.model.experts.ExpertProvider: prefetch reads ahead

    def __init__(self, table: ExpertTable, cache: ExpertCache, reader: DirectReader | None = None,
                 workers: int = 4, stats: StreamStats | None = None, prefetch_depth: int | None = None,
                 gate: PrefetchGate | None | bool = True, prefault: bool = True):
        """`gate`: True for a PrefetchGate measured online, a gate to share, or False/None to read
        ahead every candidate up to `prefetch_depth` (ungated: for comparisons). `prefault`: back
        the cache's memory with pages on a background thread (offload.prefault)."""
        self.table = table
        self.filled_keys: list[tuple[int, int]] = []  # what `fill` read, for `refill`
        self.cache = cache
        self.reader = reader or DirectReader()
        self.reads = ReadPool(workers)
        self.prefault = Prefault(cache.arena) if prefault else None
        self.stats = stats or StreamStats()
        self.gate = PrefetchGate() if gate is True else (gate or None)
        cache.on_prefetch_outcome = self._prefetch_outcome
        self._predicted: dict[int, list[int]] = {}  # layer -> its pending guess, best first
        self._issued: dict[int, float] = {}  # layer -> when its pending guess came
        self._generation: dict[int, int] = {}  # layer -> requests served: a read ahead issued before is stale
        self._lead: dict[int, float] = {}  # layer -> running average of seconds from its guess to its request
        self._busy: dict[int, tuple[float, float]] = {}  # layer -> (wall, disk busy seconds) at its last guess
        self.disk_busy = 0.0  # running average of the share of time a read was in flight, guess to guess
        # At most a quarter of the cache is read ahead at once: guesses must not flush what is resident.
        self.prefetch_depth = prefetch_depth if prefetch_depth is not None else max(1, cache.n_slots // 4)

    def _prefetch_outcome(self, rank: int, used: bool) -> None:
        self.stats.prefetch_outcome(rank, used)
        if self.gate is not None:
            self.gate.record(rank, used)

    # ------------------------------------------------------------------ loading

    def _load(self, layer: int, e: int, slot: Slot, prefetch: bool = False) -> None:
        """Read expert (layer, e) into `slot` and mark it READY (or failed)."""
        self.stats.read_started()
        aligned = 0
        try:
            le = self.table.layers[layer]
            mats, pos = [], 0
            for k, ext in enumerate(le.extents(e)):
                room = span_bytes(ext.nbytes)
                raw = self.reader.read(ext.path, ext.offset, ext.nbytes, slot.buffer[pos : pos + room])
                if raw.nbytes != ext.nbytes:  # DirectReader checks this too; a reader passed in may not
                    raise ReadError(f"{ext.path}: read of {ext.nbytes} bytes at offset {ext.offset} "
                                    f"returned {raw.nbytes} bytes")
                pos += room
                aligned += span(ext.offset, ext.nbytes)[1]
                mats.append(matrix_from_bytes(expert_name(layer, k, e), le.qtypes[k], le.shapes[k], raw))
        except BaseException as err:
            self.cache.failed(slot, err)
            raise
        else:
            self.cache.loaded(slot, FFN(*mats))
        finally:
            self.stats.read_done(aligned, prefetch)

    def _load_quietly(self, layer: int, e: int, slot: Slot, prefetch: bool = False) -> None:
        try:
            self._load(layer, e, slot, prefetch)
        except BaseException:
            pass  # the slot carries the error: the consumer waiting on it raises it

    # ------------------------------------------------------------------ provider interface

    def experts(self, layer: int, ids: Iterable[int], scan: bool = False) -> Iterator[tuple[int, FFN]]:
        """Resident experts first, then the others as their reads finish.

        At most half the cache is held at once (a chunk of many tokens can ask for more
        experts than fit); each expert is released as soon as the consumer moves on. `scan`:
        the request is part of a prefill chunk's pass over every layer (ExpertCache's scan).
        """
        ids = list(ids)
        return self._serve(layer, ids, max(1, min(len(ids), self.cache.n_slots // 2)), None, scan=scan)

    @contextmanager
    def held(self, layer: int, ids: Iterable[int]) -> Iterator[list[tuple[int, FFN]]]:
        """All of `ids` at once (one token's experts), kept until exit; None instead when the
        slots that can take them (not pinned, or pinned to one of them) are too few, and the
        caller then streams them through `experts`."""
        ids = list(ids)
        if len(ids) > self.cache.usable_slots((layer, e) for e in ids):
            yield None
            return
        kept: list = []
        try:
            yield list(self._serve(layer, ids, max(1, len(ids)), kept))
        finally:
            for e, slot in kept:
                self.cache.release(slot, (layer, e))

    @contextmanager
    def arriving(self, layer: int, ids: Iterable[int]):
        """All of `ids` (one token's experts) held until exit, handed over as they become ready:
        (ready, later), where `ready` lists the (id, weights) resident when asked and `later` yields
        the others as their reads finish (every read is queued before anything is handed over);
        None when they cannot all be held at once, as for `held`. A decode step computes the ready
        experts while the others are read."""
        ids = list(ids)
        if len(ids) > self.cache.usable_slots((layer, e) for e in ids):
            yield None
            return
        kept: list = []
        gen = self._serve(layer, ids, max(1, len(ids)), kept, announce=True)
        try:
            _, n_ready = next(gen)
            yield [next(gen) for _ in range(n_ready)], gen
        finally:
            gen.close()  # releases what it still holds
            for e, slot in kept:
                self.cache.release(slot, (layer, e))

    def _serve(self, layer: int, ids: list[int], window: int, kept: list | None, announce: bool = False,
               scan: bool = False):
        """Yield (id, weights), holding at most `window` slots; each is released when the consumer
        moves on, or, when `kept` is a list, appended to it for the caller to release. `announce`:
        first yield (None, n) once the first `window` are acquired and their reads queued, n the
        number of them at the front that are ready now (yielded next, without waiting)."""
        self._generation[layer] = self._generation.get(layer, 0) + 1  # queued reads ahead for it are stale now
        predicted = self._predicted.pop(layer, None)
        if predicted is not None:
            actual = set(ids)
            self.stats.prefetch_scored(set(predicted), actual)
            if self.gate is not None:
                self.gate.score_guess(predicted, actual)
            lead = time.perf_counter() - self._issued.pop(layer)
            old = self._lead.get(layer)
            self._lead[layer] = lead if old is None else old + LEAD_SMOOTHING * (lead - old)
        resident = set(e for e in ids if self.cache.is_ready((layer, e)))
        order = [e for e in ids if e in resident] + [e for e in ids if e not in resident]
        expert_bytes = self.table.layers[layer].expert_bytes
        held: deque = deque()
        nxt = 0
        try:
            while nxt < len(order) or held:
                while nxt < len(order) and len(held) < window:
                    e = order[nxt]
                    nxt += 1
                    t0 = time.perf_counter()
                    slot, must_load, outcome = self.cache.acquire_counted((layer, e), scan=scan)
                    self.stats.stalled(time.perf_counter() - t0, slot_wait=True)  # blocked while no slot was free
                    held.append((e, slot))
                    first_use_after_read = must_load or outcome in (Outcome.PREFETCHED_IN_TIME, Outcome.PREFETCHED_LATE)
                    self.stats.count(layer, outcome.value, expert_bytes if first_use_after_read else 0)
                    if must_load:
                        self.reads.submit(DEMAND, self._load_quietly, layer, e, slot)
                if announce:
                    announce = False
                    n_ready = 0
                    for e, slot in held:
                        if self.cache.ready_payload(slot, (layer, e)) is None:
                            break
                        n_ready += 1
                    yield None, n_ready
                e, slot = held[0]
                # Checked under the lock: a slot whose read failed can be reclaimed for another key.
                payload = self.cache.ready_payload(slot, (layer, e))
                if payload is None:
                    t0 = time.perf_counter()
                    payload = self.cache.wait_ready(slot, (layer, e))
                    self.stats.stalled(time.perf_counter() - t0, slot_wait=False)
                yield e, payload
                held.popleft()
                if kept is None:
                    self.cache.release(slot, (layer, e))
                else:
                    kept.append((e, slot))
        finally:
            for e, slot in held:
                self.cache.release(slot, (layer, e))

    def descriptors(self, layer: int) -> None:
        return None  # experts come and go: each step asks through `held`

    def prefetch(self, layer: int, ids: Iterable[int]) -> None:
        """Read ahead the candidates of `ids` (best first) of `layer` that the gate admits, at most
        `prefetch_depth` of them; the reads queue behind demand reads."""
        ranked = [int(e) for e in ids]
        self._predicted[layer] = ranked
        self._issued[layer] = time.perf_counter()
        gen = self._generation.get(layer, 0)
        depth = min(self.prefetch_depth, max(1, self.cache.n_slots // 4))
        if self.gate is not None and self.stats.read_seconds > MIN_READ_SECONDS:
            self.gate.disk_bytes_per_s = self.stats.bytes_read / self.stats.read_seconds
        expert_bytes = self.table.layers[layer].expert_bytes
        lead = self._lead.get(layer, float("inf"))  # not measured yet: assume a read ahead has time to finish
        hit_rate = self.stats.hit_rate
        self._measure_busy(layer)
        for rank, e in enumerate(ranked[:depth]):
            if self.cache.is_ready((layer, e)):
                continue  # resident: nothing to read (a read in flight is skipped at claim time)
            if self.gate is not None and not self.gate.admit(rank, expert_bytes, lead, hit_rate, self.disk_busy,
                                                             self.stats.ideal_bytes):
                self.stats.prefetch_refused += 1
                continue
            self.reads.submit(AHEAD, self._read_ahead, layer, e, rank, gen)

    def _measure_busy(self, layer: int) -> None:
        """Update disk_busy over the time since this layer's last guess (one token's cycle)."""
        now, busy = time.perf_counter(), self.stats.busy_seconds()
        last = self._busy.get(layer)
        self._busy[layer] = (now, busy)
        if last is not None and now > last[0]:
            share = min(1.0, (busy - last[1]) / (now - last[0]))
            self.disk_busy += LEAD_SMOOTHING * (share - self.disk_busy)

    def _read_ahead(self, layer: int, e: int, rank: int, gen: int) -> None:
        """On a reader thread: claim a slot and read, unless the layer's request came meanwhile."""
        if self._generation.get(layer, 0) != gen:
            with self.stats.lock:
                self.stats.prefetch_cancelled += 1
            self._not_read(rank)
            return
        slot = self.cache.try_claim_for_prefetch((layer, e), rank)
        if slot is None:  # resident or being read already, or no slot free
            self._not_read(rank)
            return
        with self.stats.lock:
            self.stats.prefetch_reads += 1
        try:
            self._load(layer, e, slot, True)
        except BaseException:
            self._not_read(rank)  # the slot carries the error: the consumer waiting on it raises it

    def _not_read(self, rank: int) -> None:
        if self.gate is not None:
            self.gate.dropped(rank)

    def pin(self, keys: Iterable[tuple[int, int]]) -> int:
        """Load `keys` into slots eviction never touches; how many were pinned."""
        n = 0
        for layer, e in keys:
            slot = self.cache.pin((layer, e))
            self._load(layer, e, slot)
            n += 1
        return n

    def refill(self) -> int:
        """Read again the experts `fill` read, where a warm-up's passes evicted them: the warm-up's
        own experts leave their slots, the filled ones that stayed are kept, the others are read.
        Returns how many were read. (The fill was mostly undone: 2 of 17 experts left after the
        warm-up, a review.)"""
        keys = self.filled_keys
        if not keys:
            return 0
        self.cache.evict_all_but(keys)
        return self.fill(keys)

    def fill(self, keys: Iterable[tuple[int, int]]) -> int:
        """Read `keys` into free slots, on the read workers, and wait for them: the cache starts
        warm instead of reading these at random as tokens miss them. Stops at the first key for
        which no slot is free; evicts nothing. Returns how many were read. A failed read (or an
        interrupt) raises at once, and the reads not yet started are dropped, their slots freed.
        The keys are kept for `refill`."""
        keys = list(keys)
        self.filled_keys = keys
        cancelled = threading.Event()

        def load(layer: int, e: int, slot: Slot) -> None:
            if cancelled.is_set():
                self.cache.failed(slot, StepstreamError("the fill at load was stopped"))
            else:
                self._load_quietly(layer, e, slot)

        claimed = []
        for layer, e in keys:
            if (layer, e) in self.cache.index:
                continue
            slot = self.cache.claim_free((layer, e))
            if slot is None:
                break
            claimed.append((slot, (layer, e)))
            self.reads.submit(DEMAND, load, layer, e, slot)
        try:
            for slot, key in claimed:
                self.cache.wait_ready(slot, key)
        except BaseException:
            cancelled.set()
            raise
        return len(claimed)

    def close(self) -> None:
        if self.prefault is not None:
            self.prefault.stop()
        self.reads.shutdown()
        self.reader.close()
