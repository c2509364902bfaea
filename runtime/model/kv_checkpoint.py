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

Keys and values are copied in the cache's stored types (runtime.model.kv_types), their
q8_0 scales with them.

Shape legend:  C ring capacity (slots)   Nk KV heads   D head dim
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RingCopy:
    index: int  # the block
    k: np.ndarray  # [C, Nk, D] in the cache's key type
    v: np.ndarray  # [C, Nk, D] in its value type
    pos: np.ndarray  # [C]
    ks: np.ndarray | None = None  # [C, Nk, D/32 | 0] q8_0 key scales; None on the GPU tier's float32 cache
    vs: np.ndarray | None = None


@dataclass(frozen=True)
class KVCheckpoint:
    n_past: int
    rings: tuple[RingCopy, ...]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for r in self.rings for a in (r.k, r.v, r.pos, r.ks, r.vs) if a is not None)


def _host(a) -> np.ndarray:
    """A host copy of a ring array: numpy, or a device array (the GPU tier's cache)."""
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.array(a, copy=True)


def take(cache) -> KVCheckpoint:
    """Copy every ring of `cache` (runtime.model.kv_cache.KVCache or the GPU tier's) as it is now."""
    rings = tuple(RingCopy(i, _host(layer.k), _host(layer.v), layer.pos.copy(),
                           None if layer.ks is None else layer.ks.copy(), None if layer.vs is None else layer.vs.copy())
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
        else:  # (a card's copy has no scales: a float32 cache's are zero-wide)
            layer.k[...], layer.v[...] = r.k, r.v
            if r.ks is not None:
                layer.ks[...], layer.vs[...] = r.ks, r.vs
        layer.pos[...] = r.pos
    cache.n_past = cp.n_past
