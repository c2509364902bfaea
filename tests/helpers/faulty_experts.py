"""An expert provider that fails on purpose, for tests of what an error leaves behind."""

from __future__ import annotations

from contextlib import contextmanager


class FaultyExperts:
    """Wraps an expert provider; once armed, the n-th request for `layer`'s experts raises `exc`
    (the first request when n = 1). Prefetching is off, so every request reaches the wrapper."""

    prefetches = False
    stats = None

    def __init__(self, inner, layer: int):
        self.inner, self.layer = inner, layer
        self.exc: BaseException | None = None
        self.countdown = 0

    def arm(self, exc: BaseException, n: int = 1) -> None:
        self.exc, self.countdown = exc, n

    def _maybe_fail(self, layer: int) -> None:
        if self.exc is None or layer != self.layer:
            return
        self.countdown -= 1
        if self.countdown == 0:
            exc, self.exc = self.exc, None
            raise exc

    def experts(self, layer, ids, scan=False):
        self._maybe_fail(layer)
        yield from self.inner.experts(layer, ids, scan=scan)

    @contextmanager
    def held(self, layer, ids):
        self._maybe_fail(layer)
        with self.inner.held(layer, ids) as got:
            yield got

    def prefetch(self, layer, ids):
        pass

    def descriptors(self, layer):
        return None  # every request must reach the wrapper

    def close(self):
        self.inner.close()
