"""The streaming expert provider: routed experts from the cache, misses read from disk.

It implements runtime.model.experts.ExpertProvider. For one layer's request it takes a
reference on every requested expert (so none of them can be evicted while compute uses
it), starts reads for the misses on a small thread pool, yields the resident experts
first and the others as their reads finish, and drops the references when the consumer
is done. `prefetch(layer, ids)` starts background reads for a guess of the next layer's
experts; the real routing still decides what is computed, so outputs never change.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from offload.cache import ExpertCache, Outcome, Slot
from offload.direct_io import DirectReader, ReadError, span, span_bytes
from offload.expert_table import ExpertTable
from offload.stats import StreamStats
from runtime.base.gguf_schema import expert_name
from runtime.model.weights import FFN
from runtime.model.matrix import matrix_from_bytes

def slot_bytes_for(table: ExpertTable) -> int:
    return max(sum(span_bytes(s) for s in layer.strides) for layer in table.layers.values())


class StreamingExperts:
    prefetches = True  # runtime.model.experts.ExpertProvider: prefetch reads ahead

    def __init__(self, table: ExpertTable, cache: ExpertCache, reader: DirectReader | None = None,
                 workers: int = 4, stats: StreamStats | None = None, prefetch_depth: int | None = None):
        self.table = table
        self.cache = cache
        self.reader = reader or DirectReader()
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="expert-read")
        self.stats = stats or StreamStats()
        self._predicted: dict[int, set[int]] = {}
        # Read ahead only the most likely guesses: a wrong guess costs a whole expert's read.
        self.prefetch_depth = prefetch_depth if prefetch_depth is not None else max(1, cache.n_slots // 4)

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

    def experts(self, layer: int, ids: Iterable[int]) -> Iterator[tuple[int, FFN]]:
        """Resident experts first, then the others as their reads finish.

        At most half the cache is held at once (a chunk of many tokens can ask for more
        experts than fit); each expert is released as soon as the consumer moves on.
        """
        ids = list(ids)
        return self._serve(layer, ids, max(1, min(len(ids), self.cache.n_slots // 2)), None)

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

    def _serve(self, layer: int, ids: list[int], window: int, kept: list | None):
        """Yield (id, weights), holding at most `window` slots; each is released when the consumer
        moves on, or, when `kept` is a list, appended to it for the caller to release."""
        predicted = self._predicted.pop(layer, None)
        if predicted is not None:
            self.stats.prefetch_scored(predicted, set(ids))
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
                    slot, must_load, outcome = self.cache.acquire_counted((layer, e))
                    self.stats.stalled(time.perf_counter() - t0, slot_wait=True)  # blocked while no slot was free
                    held.append((e, slot))
                    first_use_after_read = must_load or outcome in (Outcome.PREFETCHED_IN_TIME, Outcome.PREFETCHED_LATE)
                    self.stats.count(layer, outcome.value, expert_bytes if first_use_after_read else 0)
                    if must_load:
                        self.pool.submit(self._load_quietly, layer, e, slot)
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

    def prefetch(self, layer: int, ids: Iterable[int]) -> None:
        """Start background reads of the first `prefetch_depth` of `ids` (most likely first) of `layer`."""
        ids = [int(e) for e in ids][: min(self.prefetch_depth, max(1, self.cache.n_slots // 4))]
        self._predicted[layer] = set(ids)
        for e in ids:
            slot = self.cache.try_claim_for_prefetch((layer, e))
            if slot is not None:
                self.stats.prefetch_reads += 1
                self.pool.submit(self._load_quietly, layer, e, slot, True)

    def pin(self, keys: Iterable[tuple[int, int]]) -> int:
        """Load `keys` into slots eviction never touches; how many were pinned."""
        n = 0
        for layer, e in keys:
            slot = self.cache.pin((layer, e))
            self._load(layer, e, slot)
            n += 1
        return n

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.reader.close()
