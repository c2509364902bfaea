"""A copy of the sliding-window rings at one position, so the cache can return there later.

A full-attention block can be trimmed back to any position; a sliding block keeps only
W + rollback slots, so `trim` cannot go further back than `rollback` positions. A server that
keeps the previous request's cache wants to return to the end of the previous prompt after
generating a reply of any length (the next prompt usually differs from what was generated:
the reasoning is dropped, or the reply is tokenized differently). A checkpoint taken right
after a prompt was evaluated holds every ring's keys, values and positions at that point;
restoring it trims the growing blocks to that position and puts the rings back.

A checkpoint is only valid while the positions before it are unchanged: `restorable(n)` is
checked by the owner (the model), which forgets its checkpoint whenever it trims or resets
below it.

Shape legend:  C ring capacity (slots)   Nk KV heads   D head dim
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RingCopy:
    index: int  # the block
    k: np.ndarray  # [C, Nk, D]
    v: np.ndarray  # [C, Nk, D]
    pos: np.ndarray  # [C]


@dataclass(frozen=True)
class KVCheckpoint:
    n_past: int
    rings: tuple[RingCopy, ...]

    @property
    def nbytes(self) -> int:
        return sum(r.k.nbytes + r.v.nbytes + r.pos.nbytes for r in self.rings)


def _host(a) -> np.ndarray:
    """A host copy of a ring array: numpy, or a device array (the GPU tier's cache)."""
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.array(a, copy=True)


def take(cache) -> KVCheckpoint:
    """Copy every ring of `cache` (runtime.model.kv_cache.KVCache or the GPU tier's) as it is now."""
    rings = tuple(RingCopy(i, _host(layer.k), _host(layer.v), layer.pos.copy())
                  for i, layer in enumerate(cache.layers) if layer.ring)
    return KVCheckpoint(cache.n_past, rings)


def restore(cache, cp: KVCheckpoint) -> None:
    """Return `cache` to the checkpoint's position. The caller guarantees that the positions
    before cp.n_past are the ones the checkpoint was taken over and that n_past >= cp.n_past."""
    for layer in cache.layers:
        layer.trim_to(cp.n_past)
    for r in cp.rings:
        layer = cache.layers[r.index]
        if hasattr(layer.k, "copy_to_device"):  # device arrays: write back in place
            layer.k.copy_to_device(r.k)
            layer.v.copy_to_device(r.v)
            layer.stale = True
        else:
            layer.k[...], layer.v[...] = r.k, r.v
        layer.pos[...] = r.pos
    cache.n_past = cp.n_past
