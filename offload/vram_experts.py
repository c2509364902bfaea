"""Which routed experts the GPU holds, and what to do with the ones it does not.

Slots are filled as experts are used (learned online) or from a profile's hottest experts
at load, and evicted least recently used. A slot in use by the current step is never
evicted by that step's copies.

For a step's misses, a measured cost model splits the work between two resources that run
at the same time: the CPU computes some misses from RAM while the copy engine moves the
others into VRAM, where the GPU computes them. With c of m misses copied, the step waits
for max(c * t_copy, (m - c) * t_cpu): c = m * t_cpu / (t_cpu + t_copy) balances the two
(t_copy: one expert's bytes over the measured pinned host-to-device rate; t_cpu: the
measured time of one expert on the CPU's int8 kernel). The misses used most often so far
are the ones copied, since they are the likeliest to be used again. With no slots every
miss runs on the CPU (llama.cpp's --n-cpu-moe split).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

Key = tuple[int, int]  # (layer, expert)


@dataclass
class TierCounts:
    gpu_hits: int = 0  # routed experts computed from VRAM that were there already
    copied: int = 0  # misses copied to VRAM, then computed there
    cpu: int = 0  # misses computed on the CPU
    bytes_copied: int = 0

    def as_dict(self) -> dict:
        total = self.gpu_hits + self.copied + self.cpu
        return {**self.__dict__, "vram_hit_rate": self.gpu_hits / total if total else 0.0}


@dataclass
class CostModel:
    copy_seconds_per_byte: float = 1 / 20e9  # replaced by measurements at load
    cpu_seconds_per_expert: float = 1e-3

    def copies(self, misses: int, expert_bytes: int) -> int:
        """How many of `misses` to copy so that copying and CPU compute end together."""
        t_copy = expert_bytes * self.copy_seconds_per_byte
        t_cpu = self.cpu_seconds_per_expert
        return int(round(misses * t_cpu / (t_cpu + t_copy))) if misses else 0


@dataclass
class VRAMExperts:
    n_slots: int
    cost: CostModel = field(default_factory=CostModel)
    counts: TierCounts = field(default_factory=TierCounts)

    def __post_init__(self):
        self._slot: OrderedDict[Key, int] = OrderedDict()  # resident keys, least recently used first
        self._free = list(range(self.n_slots - 1, -1, -1))
        self._uses: Counter[Key] = Counter()

    def __len__(self) -> int:
        return len(self._slot)

    def lookup(self, layer: int, ids: Iterable[int]) -> list[int | None]:
        """The slot of each expert, or None; counts the uses and refreshes the recency of hits."""
        out = []
        for e in ids:
            key = (layer, int(e))
            self._uses[key] += 1
            s = self._slot.get(key)
            if s is not None:
                self._slot.move_to_end(key)
                self.counts.gpu_hits += 1
            out.append(s)
        return out

    def split(self, layer: int, misses: list[int], expert_bytes: int, busy: int,
              most: int | None = None) -> tuple[list[int], list[int]]:
        """(to copy, to compute on the CPU) of this step's misses; `busy` slots are in use by the step,
        and at most `most` copies can be in flight."""
        room = self.n_slots - busy if most is None else min(self.n_slots - busy, most)
        n = min(self.cost.copies(len(misses), expert_bytes), max(0, room))
        ranked = sorted(misses, key=lambda e: -self._uses[(layer, e)])
        copy, cpu = ranked[:n], ranked[n:]
        self.counts.copied += len(copy)
        self.counts.cpu += len(cpu)
        self.counts.bytes_copied += len(copy) * expert_bytes
        return copy, [e for e in misses if e in set(cpu)]

    def assign(self, layer: int, e: int, keep: set[int]) -> int:
        """A slot for (layer, e): a free one, else the least recently used one not in `keep`."""
        key = (layer, e)
        if key in self._slot:
            return self._slot[key]
        if self._free:
            s = self._free.pop()
        else:
            victim = next((k for k, s in self._slot.items() if s not in keep), None)
            if victim is None:
                raise RuntimeError("every VRAM expert slot is in use by this step")
            s = self._slot.pop(victim)
        self._slot[key] = s
        return s

    def forget(self, layer: int, e: int) -> None:
        """Drop (layer, e), whose copy did not complete: its slot is free again."""
        s = self._slot.pop((layer, e), None)
        if s is not None:
            self._free.append(s)
