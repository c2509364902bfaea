"""One call at a time on a model (runtime.model.model): the lock its public methods take."""

from __future__ import annotations

import functools


def serialized(method):
    """One call at a time on a model: a call from another thread waits for the running one to
    end. The cache, the token history and the MTP heads' state are the model's, not a thread's:
    two threads evaluating at once interleaved their steps, gave wrong logits without a word
    and rolled back each other's work (a review's finding). A re-entrant lock: a method calls
    others freely. A generation from one thread meeting another thread's evaluation between
    its tokens is stale, as with any evaluation between them (loop.generate)."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            self._own_threads()
            return method(self, *args, **kwargs)
    return locked
