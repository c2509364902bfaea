"""What streaming did: how each expert request was served, bytes read, stalls, prefetch quality.

Every request for an expert ends in one of four outcomes (offload.cache.Outcome), counted
apart so that a prefetch never passes for a cache hit:
    hits                 resident and used before
    prefetched in time   read by a prefetch, ready when compute asked
    prefetched late      read by a prefetch, still loading when compute asked (compute waited)
    misses               read on demand (compute waited)
Stall time is every second compute spent blocked on the expert cache: waiting for a read
(a miss or a late prefetch), and acquiring a slot (the cache's lock, or no slot free).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field

from runtime.base.system import peak_rss_bytes

OUTCOMES = ("hits", "prefetched_in_time", "prefetched_late", "misses")
_FIELD = {"hit": "hits", "prefetched_in_time": "prefetched_in_time", "prefetched_late": "prefetched_late",
          "miss": "misses"}


@dataclass
class LayerCounts:
    hits: int = 0  # resident and used before
    prefetched_in_time: int = 0  # a prefetch had read it by the time compute asked
    prefetched_late: int = 0  # a prefetch was still reading it when compute asked
    misses: int = 0  # read on demand

    @property
    def requests(self) -> int:
        return self.hits + self.prefetched_in_time + self.prefetched_late + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def ready_rate(self) -> float:
        """Share of requests served without waiting: hits and prefetches in time."""
        return (self.hits + self.prefetched_in_time) / self.requests if self.requests else 0.0


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


@dataclass
class StreamStats:
    layers: dict[int, LayerCounts] = field(default_factory=dict)
    bytes_read: int = 0  # aligned bytes that came from disk, prefetches included
    prefetch_bytes_read: int = 0  # the part of bytes_read that prefetches read
    ideal_bytes: int = 0  # bytes of the experts compute used whose first use followed a read (misses and prefetches)
    reads: int = 0
    read_seconds: float = 0.0  # wall time with at least one read in flight
    _inflight: int = 0
    _busy_since: float = 0.0
    stall_seconds: float = 0.0  # compute blocked on the cache: all of the two below
    stall_read_seconds: float = 0.0  # waiting for a read (a miss or a late prefetch)
    stall_slot_seconds: float = 0.0  # in acquire: waiting for the cache's lock or for a slot to come free
    prefetch_predicted: int = 0  # candidates guessed (scored against the next request for their layer)
    prefetch_correct: int = 0  # of those, asked for by that request
    prefetch_actual: int = 0  # experts asked for by requests that had a guess
    prefetch_reads: int = 0  # reads ahead started
    prefetch_used: int = 0  # reads ahead whose expert was asked for before its eviction
    prefetch_wasted: int = 0  # reads ahead whose expert was evicted unused
    prefetch_refused: int = 0  # candidates the gate judged unlikely enough not to pay
    prefetch_cancelled: int = 0  # admitted, still queued when their layer's request came: dropped unread
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def restart(self) -> None:
        """Count from now on: every figure back to zero (a warm-up's requests and reads are not the
        run's: `--stats` showed a 5-token run's 14.7% hit rate, all of it the warm-up's). Reads
        still in flight stay in flight, their wall time counted from now."""
        with self.lock:
            fresh = StreamStats()
            for f in dataclasses.fields(self):
                if f.name not in ("lock", "_inflight", "_busy_since"):
                    setattr(self, f.name, getattr(fresh, f.name))
            if self._inflight:
                self._busy_since = time.perf_counter()

    def count(self, layer: int, outcome: str, read_bytes: int = 0) -> None:
        """One request served with `outcome` (an offload.cache.Outcome value); `read_bytes` is the
        expert's size when this was its first use after a read."""
        c = self.layers.setdefault(layer, LayerCounts())
        name = _FIELD[outcome]
        setattr(c, name, getattr(c, name) + 1)
        self.ideal_bytes += read_bytes

    def stalled(self, seconds: float, slot_wait: bool) -> None:
        self.stall_seconds += seconds
        if slot_wait:
            self.stall_slot_seconds += seconds
        else:
            self.stall_read_seconds += seconds

    def read_started(self) -> None:
        with self.lock:
            if self._inflight == 0:
                self._busy_since = time.perf_counter()
            self._inflight += 1

    def read_done(self, aligned_bytes: int, prefetch: bool = False) -> None:
        """A read finished (or failed); read GB/s is over the wall time any read was in flight."""
        with self.lock:
            self.bytes_read += aligned_bytes
            if prefetch:
                self.prefetch_bytes_read += aligned_bytes
            self.reads += 1
            self._inflight -= 1
            if self._inflight == 0:
                self.read_seconds += time.perf_counter() - self._busy_since

    def busy_seconds(self) -> float:
        """Wall seconds with at least one read in flight so far, the current stretch included."""
        with self.lock:
            return self.read_seconds + (time.perf_counter() - self._busy_since if self._inflight else 0.0)

    def prefetch_scored(self, predicted: set[int], actual: set[int]) -> None:
        self.prefetch_predicted += len(predicted)
        self.prefetch_actual += len(actual)
        self.prefetch_correct += len(predicted & actual)

    def _total(self, name: str) -> int:
        return sum(getattr(c, name) for c in self.layers.values())

    @property
    def hits(self) -> int:
        return self._total("hits")

    @property
    def prefetched_in_time(self) -> int:
        return self._total("prefetched_in_time")

    @property
    def prefetched_late(self) -> int:
        return self._total("prefetched_late")

    @property
    def misses(self) -> int:
        return self._total("misses")

    @property
    def requests(self) -> int:
        return sum(c.requests for c in self.layers.values())

    @property
    def hit_rate(self) -> float:
        """Hits alone over all requests: a prefetched expert is not a hit."""
        return _rate(self.hits, self.requests)

    @property
    def ready_rate(self) -> float:
        """Requests served without waiting (hits and prefetches in time) over all requests."""
        return _rate(self.hits + self.prefetched_in_time, self.requests)

    @property
    def prefetch_unused(self) -> int:
        """Prefetch reads whose expert compute has not asked for (evicted first, or not yet asked)."""
        return max(0, self.prefetch_reads - self.prefetched_in_time - self.prefetched_late)

    @property
    def read_gb_s(self) -> float:
        return self.bytes_read / 1e9 / self.read_seconds if self.read_seconds else 0.0

    def prefetch_outcome(self, rank: int, used: bool) -> None:
        """An expert read ahead was used before eviction, or evicted unused (offload.cache reports it)."""
        if used:
            self.prefetch_used += 1
        else:
            self.prefetch_wasted += 1

    @property
    def prefetch_recall(self) -> float:
        """Share of the experts requests asked for that the guess before them named."""
        return _rate(self.prefetch_correct, self.prefetch_actual)

    @property
    def guess_precision(self) -> float:
        """Share of guessed candidates (read or not) that the next request for their layer asked for."""
        return _rate(self.prefetch_correct, self.prefetch_predicted)

    @property
    def prefetch_precision(self) -> float:
        """Share of reads ahead used before their eviction, over those whose fate is known."""
        return _rate(self.prefetch_used, self.prefetch_used + self.prefetch_wasted)

    def as_dict(self) -> dict:
        return {
            "hits": self.hits,
            "prefetched_in_time": self.prefetched_in_time,
            "prefetched_late": self.prefetched_late,
            "misses": self.misses,
            "requests": self.requests,
            "hit_rate": self.hit_rate,
            "ready_rate": self.ready_rate,
            "hit_rate_per_layer": {str(k): v.hit_rate for k, v in sorted(self.layers.items())},
            "bytes_read": self.bytes_read,
            "prefetch_bytes_read": self.prefetch_bytes_read,
            "ideal_bytes": self.ideal_bytes,
            "read_gb_s": self.read_gb_s,
            "stall_seconds": self.stall_seconds,
            "stall_read_seconds": self.stall_read_seconds,
            "stall_slot_seconds": self.stall_slot_seconds,
            "prefetch_reads": self.prefetch_reads,
            "prefetch_unused": self.prefetch_unused,
            "prefetch_recall": self.prefetch_recall,
            "prefetch_precision": self.prefetch_precision,
            "guess_precision": self.guess_precision,
            "prefetch_used": self.prefetch_used,
            "prefetch_wasted": self.prefetch_wasted,
            "prefetch_refused": self.prefetch_refused,
            "prefetch_cancelled": self.prefetch_cancelled,
            "peak_rss_bytes": peak_rss_bytes(),
        }

    def text(self) -> str:
        fetched = self.misses + self.prefetched_in_time + self.prefetched_late
        lines = [
            f"experts: {self.requests} requests: {self.hits} hits, {self.prefetched_in_time} prefetched in time, "
            f"{self.prefetched_late} prefetched late, {self.misses} misses (hit rate {self.hit_rate:.1%}; "
            f"{self.ready_rate:.1%} ready without waiting)",
            f"  read {self.bytes_read / 1e6:.1f} MB ({self.prefetch_bytes_read / 1e6:.1f} MB by prefetches) "
            f"at {self.read_gb_s:.2f} GB/s: {self.bytes_read / max(self.ideal_bytes, 1):.2f}x the "
            f"{self.ideal_bytes / 1e6:.1f} MB of the {fetched} experts read for compute (misses and used prefetches); "
            f"{self.prefetch_unused} prefetches not used",
            f"  stalled {self.stall_seconds:.2f} s ({self.stall_read_seconds:.2f} s waiting for reads, "
            f"{self.stall_slot_seconds:.2f} s acquiring slots: the cache's lock, or no slot free); "
            f"peak RSS {peak_rss_bytes() / 2**20:.0f} MiB",
            f"  prefetch: {self.prefetch_reads} reads ahead, precision {self.prefetch_precision:.1%} "
            f"({self.prefetch_used} used before eviction, {self.prefetch_wasted} evicted unused); "
            f"{self.prefetch_refused} candidates refused by the gate, {self.prefetch_cancelled} dropped unread; "
            f"prefetch recall {self.prefetch_recall:.1%}, guess precision {self.guess_precision:.1%}",
            "  per layer hit rate: " + ", ".join(f"{k}: {v.hit_rate:.0%}" for k, v in sorted(self.layers.items())),
        ]
        return "\n".join(lines)
