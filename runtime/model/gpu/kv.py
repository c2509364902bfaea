"""The KV cache in VRAM: the host keeps the bookkeeping, the card keeps the keys and values.

`DeviceLayerKV` is a runtime.model.kv_cache.LayerKV whose keys and values live in device
arrays. Everything that decides which slot holds which position (reserve, trim, the
transaction's undo log, growth) stays the host class's code over the host `pos` array, so
rings, rollback and all-or-nothing evaluations behave exactly as on the CPU. The card has
its own copy of `pos` (`dpos`), which the KV-store kernel writes as it stores a token;
whenever the host changes `pos` another way (trim, abort, growth) the layer marks it stale
and the executor uploads it before the next attention.

The card's keys and values are float32 whatever the load options' cache types
(RuntimeOptions.cache_type_k/v): the GPU kernels (runtime.model.gpu.ops) read float32, the
cache is written on the card by them and never goes through the host's types, so a GPU run
falls back to float32 and says so in `types`. VRAM is the tier's budget: offload.gpu_placement
counts the cache at 4 bytes an element.

Shape legend:  C capacity (slots)   Nk KV heads   D head dim
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from runtime.model.kv_cache import KVCache, LayerKV


class DeviceLayerKV(LayerKV):
    def __init__(self, n_kv: int, head_dim: int, capacity: int, ring: bool, window: int):
        # not LayerKV.__init__: it would allocate the keys and values in RAM
        self.ring, self.window = ring, window
        self.types = ("f32", "f32")
        self.ks = self.vs = None  # float32 has no scales
        self.k = cuda.to_device(np.zeros((capacity, n_kv, head_dim), np.float32))  # [C, Nk, D]
        self.v = cuda.to_device(np.zeros((capacity, n_kv, head_dim), np.float32))
        self.pos = np.full(capacity, -1, np.int64)  # [C], the authority
        self.dpos = cuda.to_device(self.pos)  # [C], the card's copy
        self.stale = False  # dpos differs from pos
        self.n = 0
        self._start = None
        self._undo = []

    @property
    def nbytes(self) -> int:
        return 2 * 4 * int(np.prod(self.k.shape))

    def sync_positions(self, stream=0) -> None:
        """Upload pos when the host changed it since the card last saw it."""
        if self.stale:
            self.dpos.copy_to_device(self.pos, stream=stream)
            self.stale = False

    def view(self):
        raise TypeError("a device KV cache is read by the GPU kernels, not through view()")

    def append(self, k, v, pos) -> None:
        raise TypeError("a device KV cache is written by the GPU's KV-store kernel, not through append()")

    def _save_one(self, slot: int) -> None:
        self._save(np.array([slot]))

    def _save(self, slots: np.ndarray) -> None:
        if self._start is None:
            return
        old = self.pos[slots]
        slots = slots[(old > self._start - self.capacity) & (old < self._start)]
        for s in slots.tolist():  # one slot per decoded token: a small copy back each
            self._undo.append((np.array([s]), self.k[s].copy_to_host()[None], self.v[s].copy_to_host()[None],
                               self.pos[[s]].copy()))

    def abort(self) -> None:
        if self._start is None:
            return
        self.trim_to(self._start)
        for slots, k, v, pos in reversed(self._undo):
            s = int(slots[0])
            self.k[s].copy_to_device(np.ascontiguousarray(k[0]))
            self.v[s].copy_to_device(np.ascontiguousarray(v[0]))
            self.pos[s] = pos[0]
        self.stale = True
        self.commit()

    def _grow(self, need: int) -> None:
        cap = self._new_capacity(need)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = cuda.to_device(np.zeros((cap,) + tuple(old.shape[1:]), np.float32))
            if self.n:
                new[: self.n].copy_to_device(old[: self.n])
            setattr(self, name, new)
        pos = np.full(cap, -1, np.int64)
        pos[: self.n] = self.pos[: self.n]
        self.pos = pos
        self.dpos = cuda.to_device(pos)
        self.stale = False

    def trim_to(self, n: int) -> None:
        super().trim_to(n)
        self.stale = True


class DeviceKVCache(KVCache):
    """runtime.model.kv_cache.KVCache over DeviceLayerKV layers."""

    def __init__(self, n_kv, head_dim, sliding, window, n_ctx, rollback, start_capacity: int):
        super().__init__((), head_dim, (), window, n_ctx, rollback)  # the bookkeeping, no host layers
        self.types = ("f32", "f32")  # see the module doc
        self.layers = [DeviceLayerKV(nk, head_dim, self.window + rollback if s else min(n_ctx, start_capacity),
                                     ring=s, window=self.window)
                       for nk, s in zip(n_kv, sliding)]
        for layer in self.layers:
            layer.limit = n_ctx

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)
