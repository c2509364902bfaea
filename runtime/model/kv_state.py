"""A whole copy of the KV cache and the tokens it holds, to return to later: llama-cpp-python's
`save_state()` / `load_state(state)`.

The model already reuses the longest prefix its cache shares with a new prompt; a saved state
lets a caller keep several (a long system prompt, then each conversation) and go back to any of
them without evaluating it again. A state holds every block's slots in use, in the cache's
stored types, so it costs what the cache holds: `nbytes`. It pickles, and it loads only into a
model of the same file and cache layout (the same n_ctx, rollback and cache types), which
`restore` checks before it changes anything.

Shape legend:  S slots in use   Nk KV heads   D head dim
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.base.errors import StepstreamError
from runtime.model import kv_types


class StateMismatch(StepstreamError, ValueError):
    """A saved state from another model or cache layout."""


@dataclass(frozen=True)
class SavedState:
    model: str  # the GGUF file's name and size, as "name (bytes)"
    layout: tuple  # per block: (ring, capacity of a ring or 0, Nk, D, key type, value type)
    tokens: tuple[int, ...]  # what the cache holds, position by position
    slots: tuple[tuple[np.ndarray, ...], ...]  # per block: (k [S, Nk, D], k scales, v, v scales, pos [S])
    # the rings at the end of the last prompt (runtime.model.kv_checkpoint), when the state was
    # taken with it: restored too, a later prompt that shares that prompt but not the reply after
    # it reuses the prompt, as the live cache would (the server's prompt cache takes them so)
    checkpoint: object = None

    def oldest_kept(self) -> list[int]:
        """Per sliding block holding positions, the oldest it keeps (KVCache.can_trim's input)."""
        out = []
        for (ring, *_), arrays in zip(self.layout, self.slots):
            used = arrays[-1][arrays[-1] >= 0]
            if ring and used.size:
                out.append(int(used.min()))
        return out

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def input_ids(self) -> np.ndarray:
        """The tokens as llama-cpp-python's LlamaState holds them."""
        return np.array(self.tokens, np.int64)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for arrays in self.slots for a in arrays) + (
            self.checkpoint.nbytes if self.checkpoint is not None else 0)

    llama_state_size = nbytes


def layout(cache) -> tuple:
    return tuple((layer.ring, layer.capacity if layer.ring else 0, layer.k.shape[1], layer.k.shape[2], *layer.types)
                 for layer in cache.layers)


def _on_device(layer) -> bool:
    """A layer of the GPU tier's cache (runtime.model.gpu.kv), whose keys and values are on the card."""
    return hasattr(layer.k, "copy_to_host")


def _in_use(layer) -> int:
    return layer.capacity if layer.ring else layer.n


def _host_arrays(layer, copy: bool = True) -> tuple[np.ndarray, ...]:
    """(k, ks, v, vs, pos) of the slots in use, in host memory: a CPU layer's own (copied, or
    views), a card's copied back (its float32 keys and values, with the zero-width scales a
    float32 cache on the CPU has, so that the two load each other's states)."""
    if not _on_device(layer):
        return tuple(a.copy() if copy else a for a in layer.view())
    n = _in_use(layer)
    k, v = layer.k[:n].copy_to_host(), layer.v[:n].copy_to_host()
    none = np.zeros(k.shape[:2] + (0,), kv_types.SCALE)
    return k, none, v, none.copy(), layer.pos[:n].copy()


def _shapes(layer, n: int) -> tuple[tuple[np.dtype, tuple], ...]:
    """(dtype, shape) of each array a state holds for this layer at n positions."""
    rows = layer.capacity if layer.ring else n
    if _on_device(layer):
        k = (np.dtype(np.float32), (rows,) + tuple(layer.k.shape[1:]))
        none = (np.dtype(kv_types.SCALE), (rows,) + tuple(layer.k.shape[1:2]) + (0,))
        return k, none, k, none, (layer.pos.dtype, (rows,))
    return tuple((a.dtype, (rows,) + a.shape[1:]) for a in layer.arrays())


def size(cache, checkpoint=None) -> int:
    """The bytes `take` would copy now (the checkpoint counted whole, as SavedState.nbytes counts it)."""
    total = 0
    for layer in cache.layers:
        for dtype, shape in _shapes(layer, layer.n):
            total += int(np.prod(shape)) * dtype.itemsize
    return total + (checkpoint.nbytes if checkpoint is not None else 0)


def take(cache, tokens: list[int], model: str, checkpoint=None, copy: bool = True) -> SavedState:
    """Copy what `cache` (runtime.model.kv_cache.KVCache) holds now: its slots in use (and, given,
    the checkpoint of its rings, which is not copied: a checkpoint is never written to). Without
    `copy`, the state's arrays are views of the cache, valid until it changes (to write it out)."""
    if len(tokens) != cache.n_past:
        raise AssertionError((len(tokens), cache.n_past))
    return SavedState(model, layout(cache), tuple(tokens), tuple(_host_arrays(layer, copy) for layer in cache.layers),
                      checkpoint)


def restore(cache, state: SavedState, model: str) -> None:
    """Make `cache` hold exactly what it held when `state` was taken. Everything is checked
    before the first array is written, so a refused state leaves the cache as it was."""
    if not isinstance(state, SavedState):
        raise StateMismatch(f"load_state: expected a state from save_state(), got {type(state).__name__}")
    if state.model != model:
        raise StateMismatch(f"load_state: the state was saved from {state.model}, this model is {model}")
    mine = layout(cache)
    if state.layout != mine:
        raise StateMismatch(f"load_state: the state's cache layout (n_ctx, rollback or cache types) differs from "
                            f"this model's: {_first_difference(state.layout, mine)}")
    n = len(state.tokens)
    limit = cache.layers[0].limit if cache.layers else None
    if limit is not None and n > limit:
        raise StateMismatch(f"load_state: the state holds {n} tokens, more than this model's context of {limit}")
    _check_slots(cache, state, n)
    for layer, arrays in zip(cache.layers, state.slots):
        if _on_device(layer):
            _to_device(layer, arrays, n)
        elif layer.ring:
            for dst, src in zip(layer.arrays(), arrays):
                dst[...] = src
        else:
            if layer.capacity < n:
                layer._grow(n)
            for dst, src in zip(layer.arrays(), arrays):
                dst[:n] = src
            layer.pos[n:] = -1
        layer.n = n
    cache.n_past = n


def _to_device(layer, arrays: tuple, n: int) -> None:
    """A state's arrays into a layer on the card: its keys and values copied up, its positions
    the host's (the card's copy uploaded before the next attention)."""
    k, _, v, _, pos = arrays
    rows = layer.capacity if layer.ring else n
    if not layer.ring and layer.capacity < n:
        layer._grow(n)
    if rows:
        layer.k[:rows].copy_to_device(np.ascontiguousarray(k, np.float32))
        layer.v[:rows].copy_to_device(np.ascontiguousarray(v, np.float32))
    layer.pos[:rows] = pos
    layer.pos[rows:] = -1
    layer.stale = True


def _check_slots(cache, state: SavedState, n: int) -> None:
    """Every block's arrays as this cache stores them: a growing block's n rows, a ring's all of
    its slots (an edited or truncated state was written partway, then read as another cache)."""
    if len(state.slots) != len(cache.layers) or not all(isinstance(t, int) for t in state.tokens):
        raise StateMismatch("load_state: the state is damaged (its blocks or tokens do not match its layout)")
    for i, (layer, arrays) in enumerate(zip(cache.layers, state.slots)):
        mine = _shapes(layer, n)
        if len(arrays) != len(mine):
            raise StateMismatch(f"load_state: the state is damaged (block {i} holds {len(arrays)} arrays)")
        for name, a, (dtype, shape) in zip(("keys", "key scales", "values", "value scales", "positions"), arrays, mine):
            if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != shape:
                raise StateMismatch(f"load_state: the state is damaged (block {i}'s {name} are "
                                    f"{getattr(a, 'shape', type(a).__name__)} {getattr(a, 'dtype', '')}, "
                                    f"expected {shape} {dtype})")
    _check_checkpoint(cache, state.checkpoint, n)


def _check_checkpoint(cache, cp, n: int) -> None:
    """A state's checkpoint as restoring it on this cache needs: one ring copy per sliding block,
    each array its ring's shape and type (a card's copy has no scales, a float32 cache zero-wide
    ones), at a position the state holds."""
    if cp is None:
        return
    rings = [i for i, layer in enumerate(cache.layers) if layer.ring]
    n_past = getattr(cp, "n_past", None)
    copies = getattr(cp, "rings", None)
    if not isinstance(n_past, int) or not 0 <= n_past <= n or not isinstance(copies, tuple) or \
            sorted(getattr(r, "index", -1) for r in copies) != rings:
        raise StateMismatch("load_state: the state is damaged (its checkpoint does not match its rings)")
    for r in copies:
        layer = cache.layers[r.index]
        k, ks, v, vs, pos = _shapes(layer, layer.capacity)
        want = {"k": k, "v": v, "pos": pos, "ks": ks, "vs": vs}
        for name, (dtype, shape) in want.items():
            a = getattr(r, name, None)
            if a is None and name in ("ks", "vs") and shape[-1] == 0:
                continue  # a card's copy: a float32 cache has no scales
            if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != shape:
                raise StateMismatch(f"load_state: the state is damaged (block {r.index}'s checkpoint {name} are "
                                    f"{getattr(a, 'shape', type(a).__name__)} {getattr(a, 'dtype', '')}, "
                                    f"expected {shape} {dtype})")


def _first_difference(theirs: tuple, mine: tuple) -> str:
    if len(theirs) != len(mine):
        return f"{len(theirs)} blocks against {len(mine)}"
    names = ("sliding", "ring slots", "KV heads", "head dim", "key type", "value type")
    for i, (a, b) in enumerate(zip(theirs, mine)):
        for name, x, y in zip(names, a, b):
            if x != y:
                return f"block {i}'s {name} is {x} in the state, {y} here"
    return "none found"
