"""A sliding block's ring is sized by what the context can hold, not by the file's window alone.

The window may be as large as the file's context length (65,536 in the shipped model, up to
2^31 - 1 in a file the config accepts); a model loaded for a short context must not allocate a
ring of that size, and must compute the same logits as with a ring of window + rollback.
"""

import numpy as np

import runtime
from runtime.model.kv_cache import KVCache

MODEL = "runtime/data/step35-mini-q4_k_m.gguf"


def test_ring_capacity_follows_the_context_when_the_window_is_larger():
    cache = KVCache((2, 2), 8, (True, False), window=2**30, n_ctx=64, rollback=4)
    assert [layer.capacity for layer in cache.layers] == [64 + 4, 64]
    assert cache.layers[0].k.nbytes == (64 + 4) * 2 * 8 * 4


def test_a_context_shorter_than_the_window_gives_the_same_logits():
    long = runtime.load(MODEL, n_ctx=512)
    short = runtime.load(MODEL, n_ctx=48)
    assert short.cfg.window == 128 > short.n_ctx  # the shipped model's window is larger than this context
    assert max(layer.capacity for layer in short.cache.layers) < 128
    ids = long.tokenize("def fibonacci(n):\n    if n < 2:\n        return n\n    return fib")[:40]
    want = long.logits(ids)
    got = short.logits(ids)
    assert np.array_equal(got, want)
    # decode one position at a time as well, up to the short context's end
    for m in (long, short):
        m.reset()
        m.eval(ids[:30])
    for t in ids[30:40]:
        a, b = long.eval([t]), short.eval([t])
        assert np.array_equal(a, b)
