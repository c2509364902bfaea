"""Whether reading a guessed expert ahead pays, judged by measured precision and the disk's speed.

The model guesses the next MoE layer's experts from the current hidden state and offers
them best first (runtime.model.ffn.guess_experts). A guess read ahead is worth `gain`
when it is used: the read overlaps the compute before its use instead of stalling it,
at most the read's own time `r` (bytes / the disk's measured rate) and at most the time
`lead` between the guess and the use. A guess read for nothing costs `cost`:

- its bytes of disk time, r, which a true miss queued behind it then waits for;
- the slot it holds until LRU evicts it, a whole turn of the cache. With a hit rate h
  that grows in proportion to the cache's size (uniform routing, as in a synth file's;
  real routing is skewed and costs less), one slot held for a turn costs h / (1 - h)
  misses: the cache's n slots give h over the n / (1 - h) requests of a turn, so one
  slot gives h / n of them.

A used guess hides its read only where the disk would otherwise sit idle: with the disk
busy a share u of the time (measured), a read ahead competes with demand reads the rest
of the time. So cost = r / (1 - h), gain = min(r, lead) * (1 - u), and a candidate is
read when

    p * gain >= (1 - p) * cost,   i.e.   p >= cost / (gain + cost)

with p the probability it is used. With a read shorter than the lead time, a cold
cache and an idle disk the threshold is 1/2; at a hit rate of 1/2 it is 2/3; on a
busy disk, or a slow one where a read outlasts the compute it could hide behind, it
rises towards 1: reading ahead pays when compute leaves the disk idle, not when the
disk is the bottleneck.

p is measured per rank (the candidate's position in the guess): the share of
read-ahead experts of that rank used before they were evicted. A rank the gate keeps
refusing would never be measured again, so each rank also keeps a shadow score, for
every candidate whether read or not: whether the very next request for its layer
asked for it. The shadow score is a lower bound of "used before eviction" (a guess can
also be used by a later token) and acts as the prior the read outcomes update.

Bytes read for nothing are also capped as a whole: reads ahead may waste at most
`max_waste` (a tenth) of the bytes read for compute (misses and used reads ahead), plus
one expert's bytes so that the first tokens may read ahead too, so that over a run the
disk reads at most 1.1 times what decoding needs. A candidate that clears the threshold
is still refused when the bytes already wasted, plus the expected waste of the reads
ahead whose fate is not known yet ((1 - p) of each) and of this one, would pass that. On a fast disk and an idle one the threshold alone admits guesses of middling
precision, whose waste this bounds; the best ranks, which waste least, keep the budget.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

PRIOR_WEIGHT = 8.0  # pseudo-outcomes the shadow score is worth against measured reads
MAX_RANK = 64  # ranks past this share one set of counters


@dataclass
class RankCounts:
    used: int = 0  # read ahead and used before eviction
    wasted: int = 0  # read ahead and evicted unused
    shadow_hits: int = 0  # the next request for its layer asked for it (read or not)
    shadow_seen: int = 0  # candidates of this rank scored against the next request

    def probability(self, prior_weight: float = PRIOR_WEIGHT) -> float:
        """Posterior mean of P(used): the shadow score as prior, the reads' outcomes as evidence."""
        shadow = (self.shadow_hits + 0.5) / (self.shadow_seen + 1.0)  # 1/2 before anything is seen
        return (self.used + prior_weight * shadow) / (self.used + self.wasted + prior_weight)


MAX_WASTE = 0.10  # reads ahead may waste at most this share of the bytes read for compute
MAX_HIT_RATE = 0.95  # past this the pollution term h / (1 - h) says more about noise than about the cache


def threshold(read_s: float, lead_s: float, hit_rate: float = 0.0, disk_busy: float = 0.0) -> float:
    """The least probability of use at which a read ahead pays: cost / (gain + cost), with
    cost = read_s / (1 - hit_rate) (the disk time a wasted read takes, and the misses the slot
    it holds for a turn of the cache causes) and gain = min(read_s, lead_s) * (1 - disk_busy)
    (the stall a used one hides, in the disk's idle time)."""
    if read_s <= 0:
        return 0.0
    cost = read_s / (1.0 - min(max(hit_rate, 0.0), MAX_HIT_RATE))
    gain = min(read_s, max(lead_s, 0.0)) * (1.0 - min(max(disk_busy, 0.0), 1.0))
    return cost / (gain + cost)


@dataclass
class PrefetchGate:
    """Per-rank counters and the decision. Thread-safe: outcomes arrive from the cache's lock
    (evictions happen on reader threads too)."""

    disk_bytes_per_s: float = 2e9  # until reads measure it
    counts: list[RankCounts] = field(default_factory=lambda: [RankCounts() for _ in range(MAX_RANK)])
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    max_waste: float = MAX_WASTE
    admitted: int = 0
    refused: int = 0
    over_budget: int = 0  # of the refused, those that cleared the threshold but not the waste budget
    wasted_bytes: float = 0.0  # bytes of reads ahead evicted unused
    pending: list[int] = field(default_factory=lambda: [0] * MAX_RANK)  # admitted, fate not known yet
    pending_bytes: list[float] = field(default_factory=lambda: [0.0] * MAX_RANK)

    def _rank(self, rank: int) -> RankCounts:
        return self.counts[min(max(rank, 0), MAX_RANK - 1)]

    def _resolve(self, rank: int) -> float:
        """One admitted read of `rank` is settled: its bytes (0 if none was pending)."""
        r = min(max(rank, 0), MAX_RANK - 1)
        if self.pending[r] == 0:
            return 0.0
        b = self.pending_bytes[r] / self.pending[r]
        self.pending[r] -= 1
        self.pending_bytes[r] = self.pending_bytes[r] - b if self.pending[r] else 0.0
        return b

    def record(self, rank: int, used: bool) -> None:
        """A read-ahead expert of `rank` was used (first asked for) or evicted unused."""
        with self.lock:
            c = self._rank(rank)
            b = self._resolve(rank)
            if used:
                c.used += 1
            else:
                c.wasted += 1
                self.wasted_bytes += b

    def dropped(self, rank: int) -> None:
        """An admitted read of `rank` was not made (stale, already resident, or failed)."""
        with self.lock:
            self._resolve(rank)

    def _expected_waste(self) -> float:
        """Bytes wasted so far plus the expected waste of the pending reads ahead (under the lock)."""
        return self.wasted_bytes + sum((1.0 - self.counts[r].probability()) * self.pending_bytes[r]
                                       for r in range(MAX_RANK) if self.pending[r])

    def score_guess(self, ranked: list[int], actual: set[int]) -> None:
        """The shadow score: which of a layer's ranked candidates its next request asked for."""
        with self.lock:
            for rank, e in enumerate(ranked):
                c = self._rank(rank)
                c.shadow_seen += 1
                c.shadow_hits += e in actual

    def probability(self, rank: int) -> float:
        with self.lock:
            return self._rank(rank).probability()

    def admit(self, rank: int, expert_bytes: int, lead_s: float, hit_rate: float = 0.0,
              disk_busy: float = 0.0, needed_bytes: float | None = None) -> bool:
        """Whether to read ahead a candidate of `rank` of `expert_bytes`, `lead_s` seconds before
        its layer is expected to ask, with the cache's measured `hit_rate` and the share of
        time the disk was busy, `disk_busy`. `needed_bytes`: the bytes read for compute so far,
        which set the waste budget, max_waste of them plus `expert_bytes` (None: no budget). An admitted read must later be settled
        by `record` (used or evicted unused) or `dropped`."""
        read_s = expert_bytes / self.disk_bytes_per_s if self.disk_bytes_per_s > 0 else 0.0
        with self.lock:
            p = self._rank(rank).probability()
            ok = p >= threshold(read_s, lead_s, hit_rate, disk_busy)
            if ok and needed_bytes is not None:
                budget = self.max_waste * needed_bytes + expert_bytes
                within = self._expected_waste() + (1.0 - p) * expert_bytes <= budget
                self.over_budget += not within
                ok = within
            if ok:
                self.admitted += 1
                r = min(max(rank, 0), MAX_RANK - 1)
                self.pending[r] += 1
                self.pending_bytes[r] += expert_bytes
            else:
                self.refused += 1
        return ok

    @property
    def used(self) -> int:
        return sum(c.used for c in self.counts)

    @property
    def wasted(self) -> int:
        return sum(c.wasted for c in self.counts)

    @property
    def precision(self) -> float:
        """Share of read-ahead experts used before eviction, over those whose fate is known."""
        n = self.used + self.wasted
        return self.used / n if n else 0.0

    def per_rank(self) -> list[dict]:
        """Ranks read ahead so far: measured reads, shadow score and the probability the gate uses."""
        with self.lock:
            return [{"rank": r, "used": c.used, "wasted": c.wasted, "shadow_hits": c.shadow_hits,
                     "shadow_seen": c.shadow_seen, "p": round(c.probability(), 4)}
                    for r, c in enumerate(self.counts) if c.used or c.wasted]
