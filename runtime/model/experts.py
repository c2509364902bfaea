"""How compute gets routed-expert weights: the provider interface, and the in-RAM provider.

Compute never opens files. An MoE block asks its provider for the experts the router
chose, and the provider hands them back in whatever order they become ready (a
streaming provider yields cached experts first while it reads the rest). `offload/`
implements the streaming provider against the same interface.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

from runtime.model.matrix import Matrix, ffn_descriptor


@dataclass(frozen=True)
class ExpertWeights:
    gate: Matrix  # [I, H]
    up: Matrix  # [I, H]
    down: Matrix  # [H, I]

    @cached_property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes

    @cached_property
    def descriptor(self):
        """For the fused decode kernel (runtime.model.matrix.ffn_descriptor); computed once."""
        return ffn_descriptor(self.gate, self.up, self.down)


class ExpertProvider(Protocol):
    def experts(self, layer: int, ids: Iterable[int]) -> Iterator[tuple[int, ExpertWeights]]:
        """Yield (expert id, weights) once for each id, in any order."""
        ...

    # Optional: `held(layer, ids)`, a context manager giving [(id, weights)] for all ids at once,
    # kept valid until it exits (a decode step runs a token's experts in one kernel call), or
    # None when it cannot hold them all (the caller then uses `experts`).

    def close(self) -> None: ...


@dataclass
class ProviderStats:
    requests: int = 0  # expert weights handed out
    bytes: int = 0  # their total size


@dataclass
class InMemoryExperts:
    """Every routed expert resident: views of the memory-mapped file (or copies of them)."""

    table: dict[int, list[ExpertWeights]]  # layer -> [E] experts
    stats: ProviderStats = field(default_factory=ProviderStats)

    def experts(self, layer: int, ids: Iterable[int]) -> Iterator[tuple[int, ExpertWeights]]:
        bank = self.table[layer]
        for e in ids:
            w = bank[e]
            self.stats.requests += 1
            self.stats.bytes += w.nbytes
            yield e, w

    @contextmanager
    def held(self, layer: int, ids: Iterable[int]) -> Iterator[list[tuple[int, ExpertWeights]]]:
        yield list(self.experts(layer, ids))

    def close(self) -> None:
        self.table = {}
