"""What streaming did: cache hits and misses per layer, bytes read, stalls, prefetch quality."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from runtime.base.system import peak_rss_bytes


@dataclass
class LayerCounts:
    hits: int = 0  # resident, or already being read by a prefetch, when compute asked
    misses: int = 0  # read on demand

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


@dataclass
class StreamStats:
    layers: dict[int, LayerCounts] = field(default_factory=dict)
    bytes_read: int = 0  # aligned bytes that came from disk
    ideal_bytes: int = 0  # bytes of the experts compute needed that were not resident (read on demand or prefetched)
    reads: int = 0
    read_seconds: float = 0.0  # wall time with at least one read in flight
    _inflight: int = 0
    _busy_since: float = 0.0
    stall_seconds: float = 0.0  # compute waiting for an expert
    prefetch_predicted: int = 0
    prefetch_correct: int = 0
    prefetch_actual: int = 0
    prefetch_reads: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, layer: int, hit: bool) -> None:
        c = self.layers.setdefault(layer, LayerCounts())
        if hit:
            c.hits += 1
        else:
            c.misses += 1

    def read_started(self) -> None:
        with self.lock:
            if self._inflight == 0:
                self._busy_since = time.perf_counter()
            self._inflight += 1

    def read_done(self, aligned_bytes: int) -> None:
        """A read finished (or failed); read GB/s is over the wall time any read was in flight."""
        with self.lock:
            self.bytes_read += aligned_bytes
            self.reads += 1
            self._inflight -= 1
            if self._inflight == 0:
                self.read_seconds += time.perf_counter() - self._busy_since

    def prefetch_scored(self, predicted: set[int], actual: set[int]) -> None:
        self.prefetch_predicted += len(predicted)
        self.prefetch_actual += len(actual)
        self.prefetch_correct += len(predicted & actual)

    @property
    def hits(self) -> int:
        return sum(c.hits for c in self.layers.values())

    @property
    def misses(self) -> int:
        return sum(c.misses for c in self.layers.values())

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    @property
    def read_gb_s(self) -> float:
        return self.bytes_read / 1e9 / self.read_seconds if self.read_seconds else 0.0

    @property
    def prefetch_recall(self) -> float:
        return self.prefetch_correct / self.prefetch_actual if self.prefetch_actual else 0.0

    @property
    def prefetch_precision(self) -> float:
        return self.prefetch_correct / self.prefetch_predicted if self.prefetch_predicted else 0.0

    def as_dict(self) -> dict:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hit_rate,
            "hit_rate_per_layer": {str(k): v.hit_rate for k, v in sorted(self.layers.items())},
            "bytes_read": self.bytes_read,
            "ideal_bytes": self.ideal_bytes,
            "read_gb_s": self.read_gb_s,
            "stall_seconds": self.stall_seconds,
            "prefetch_recall": self.prefetch_recall,
            "prefetch_precision": self.prefetch_precision,
            "peak_rss_bytes": peak_rss_bytes(),
        }

    def text(self) -> str:
        lines = [f"experts: {self.hits} hits, {self.misses} misses (hit rate {self.hit_rate:.1%}); "
                 f"read {self.bytes_read / 1e6:.1f} MB at {self.read_gb_s:.2f} GB/s "
                 f"({self.bytes_read / max(self.ideal_bytes, 1):.2f}x the bytes of the experts that missed); "
                 f"stalled {self.stall_seconds:.2f} s; prefetch recall {self.prefetch_recall:.1%}, "
                 f"precision {self.prefetch_precision:.1%}; peak RSS {peak_rss_bytes() / 2**20:.0f} MiB"]
        lines.append("  per layer hit rate: " + ", ".join(f"{k}: {v.hit_rate:.0%}" for k, v in sorted(self.layers.items())))
        return "\n".join(lines)
