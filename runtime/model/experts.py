"""How compute gets routed-expert weights: the provider interface, and the in-RAM provider.

Compute never opens files. An MoE block asks its provider for the experts the router
chose, and the provider hands them back in whatever order they become ready (a
streaming provider yields cached experts first while it reads the rest). `offload/`
implements the streaming provider against the same interface; it also offers `arriving`
(offload.provider.StreamingExperts), with which a decode step computes the resident experts
while the others are read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from runtime.model.weights import FFN


class ExpertProvider(Protocol):
    prefetches: bool  # whether `prefetch` reads anything ahead (the model guesses experts only then)
    stats: object | None  # what the provider measured (offload.stats.StreamStats), None when nothing streams

    def experts(self, layer: int, ids: Iterable[int], scan: bool = False) -> Iterator[tuple[int, FFN]]:
        """Yield (expert id, weights) once for each id, in any order. `scan`: the request is a
        prefill chunk's, which passes over every layer's experts (a cache may keep what it
        held before instead of what this reads)."""
        ...

    def held(self, layer: int, ids: Iterable[int]) -> AbstractContextManager[list[tuple[int, FFN]] | None]:
        """All of `ids` at once, as [(id, weights)] kept valid until the context exits (a decode step
        runs a token's experts in one kernel call); None when they cannot all be held at once (the
        caller then uses `experts`)."""
        ...

    def prefetch(self, layer: int, ids: Iterable[int]) -> None:
        """Start reading `ids` of `layer` (most likely first) ahead of their use; a hint only."""
        ...

    def descriptors(self, layer: int) -> np.ndarray | None:
        """int64 [E, 6]: row e expert e's fused-kernel descriptor (FFN.descriptor), valid as long as
        the provider, when every expert of `layer` stays where it is and needs no request (a decode
        step then picks its rows in the routing kernel); None when each step must ask (`held`)."""
        ...

    def close(self) -> None: ...


@dataclass
class InMemoryExperts:
    """Every routed expert resident: views of the memory-mapped file (or copies of them)."""

    table: dict[int, list[FFN]]  # layer -> [E] experts
    prefetches = False
    stats = None
    _descriptors: dict[int, np.ndarray | None] = field(default_factory=dict)

    def experts(self, layer: int, ids: Iterable[int], scan: bool = False) -> Iterator[tuple[int, FFN]]:
        bank = self.table[layer]
        for e in ids:
            yield e, bank[e]

    @contextmanager
    def held(self, layer: int, ids: Iterable[int]) -> Iterator[list[tuple[int, FFN]]]:
        yield list(self.experts(layer, ids))

    def prefetch(self, layer: int, ids: Iterable[int]) -> None:
        pass  # everything is resident

    def descriptors(self, layer: int) -> np.ndarray | None:
        if layer not in self._descriptors:
            rows = [ffn.descriptor for ffn in self.table[layer]]
            self._descriptors[layer] = None if any(r is None for r in rows) else np.stack(rows)
        return self._descriptors[layer]

    def close(self) -> None:
        self.table = {}
        self._descriptors = {}
