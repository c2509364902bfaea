"""The KV cache in f16 and q8_0 (llama.cpp's --cache-type-k/-v): storage rounding, attention over
each type against a float64 reference that rounds the same way, the shipped model's logits against
a float32 cache, transactions, trim, rings and checkpoints per type, and the byte accounting.

The references round independently of runtime.model.kv_types: numpy's float16 cast, and
llama.cpp's quantize_row_q8_0_ref written here in numpy (d = max|x| / 127, q = roundf(x / d)
with halves away from zero, the scale kept as f16)."""

import numpy as np
import pytest

import runtime
from runtime.base.errors import StepstreamError
from runtime.base.options import RuntimeOptions
from runtime.cli import main
from runtime.model import kv_checkpoint, kv_types
from runtime.model.attention_kernels import chunk_attention
from runtime.model.kv_cache import KVCache, LayerKV

MODEL = "runtime/data/step35-mini-q4_k_m.gguf"
TYPES = ("f32", "f16", "q8_0")


# ---------------------------------------------------------------- independent references

def q8_0_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 [..., D], d float16 [..., D/32]) as llama.cpp's quantize_row_q8_0_ref makes them."""
    b = x.astype(np.float32).reshape(*x.shape[:-1], -1, 32)
    amax = np.abs(b).max(axis=-1, keepdims=True)
    d = amax / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    v = (b * inv).astype(np.float64)
    q = np.sign(v) * np.floor(np.abs(v) + 0.5)  # roundf: halves away from zero
    return q.astype(np.int8).reshape(x.shape), d[..., 0].astype(np.float16)


def rounded(kind: str, x: np.ndarray) -> np.ndarray:
    """x as the cache of `kind` gives it back, in float64."""
    if kind == "f32":
        return x.astype(np.float64)
    if kind == "f16":
        return x.astype(np.float16).astype(np.float64)
    q, d = q8_0_reference(x)
    return (q.reshape(*x.shape[:-1], -1, 32).astype(np.float64) * d.astype(np.float64)[..., None]).reshape(x.shape)


def stored(kind: str, data: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The cache's arrays read back in float64 (the reading side of `rounded`)."""
    if kind == "f32":
        return data.astype(np.float64)
    if kind == "f16":
        return data.view(np.float16).astype(np.float64)
    d = scale.view(np.float16).astype(np.float64)
    return (data.reshape(*data.shape[:-1], -1, 32).astype(np.float64) * d[..., None]).reshape(data.shape)


# ---------------------------------------------------------------- storage

def test_f16_storage_is_numpys_cast_to_the_bit():
    rng = np.random.default_rng(0)
    edge = np.array([0, -0.0, 65504, 65519.99, 65520, -70000, np.inf, -np.inf, 6.1e-5, 6.09e-5, 5.96e-8, 2.98e-8,
                     2.99e-8, 1e-9, -3e-6, 1 + 2**-11, 1 + 3 * 2**-11, 2049, 2051], np.float32)
    x = np.concatenate([edge] + [rng.standard_normal(4000).astype(np.float32) * s for s in (1e-6, 1e-3, 1, 1e3)])
    x = x[: x.size // 64 * 64].reshape(-1, 2, 32)
    data, scale = kv_types.allocate("f16", x.shape[0], 2, 32)
    kv_types.store(data, scale, np.arange(x.shape[0]), x)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(data, x.astype(np.float16).view(np.uint16))
    assert scale.size == 0


def test_q8_0_storage_is_llama_cpps_reference():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 2, 64)).astype(np.float32) * rng.uniform(1e-3, 30, (50, 2, 1)).astype(np.float32)
    x[0, 0] = 0  # an all-zero block: d = 0, every q = 0
    x[1, 0, :32] = np.arange(32) - 15.5  # halves after scaling: roundf's away-from-zero side
    x[2, 1, 5] = -1e4  # one large element: the rest round to small integers
    data, scale = kv_types.allocate("q8_0", 60, 2, 64)
    slots = rng.permutation(60)[:50]
    kv_types.store(data, scale, slots, x)
    q, d = q8_0_reference(x)
    np.testing.assert_array_equal(data[slots], q)
    np.testing.assert_array_equal(scale[slots], d.view(np.uint16))
    assert np.abs(q).max() == 127


def test_head_dim_and_type_errors_name_the_value():
    with pytest.raises(StepstreamError, match="q8_0 needs a head dim that is a multiple of 32.* 48"):
        LayerKV(1, 48, 8, ring=False, window=4, types=("f32", "q8_0"))
    LayerKV(1, 48, 8, ring=False, window=4, types=("f16", "f16"))  # any head dim
    for bad in ("q4_0", "F16", "fp16"):
        with pytest.raises(StepstreamError, match=f"'{bad}' is not a KV cache type; choose f32, f16, q8_0"):
            RuntimeOptions.from_kwargs(cache_type_v=bad)
    assert RuntimeOptions().kv_types == ("f16", "f16")


# ---------------------------------------------------------------- attention over each type

@pytest.mark.parametrize("kt, vt", [("f32", "f32"), ("f16", "f16"), ("q8_0", "q8_0"), ("q8_0", "f16")])
@pytest.mark.parametrize("ring", [False, True])
def test_chunk_attention_on_each_type_against_float64(kt, vt, ring):
    """Prefill's path: keys appended to a LayerKV of the types, then the chunk kernel over view();
    the reference attends in float64 over the same keys and values rounded as the type rounds."""
    rng = np.random.default_rng(2)
    Nh, Nk, D, T, window = 4, 2, 64, 40, 24
    cap = window + 8
    kv = LayerKV(Nk, D, cap if ring else 16, ring=ring, window=window, types=(kt, vt))
    k = rng.standard_normal((T, Nk, D)).astype(np.float32) * 3
    v = rng.standard_normal((T, Nk, D)).astype(np.float32)
    q = rng.standard_normal((T, Nh, D)).astype(np.float32)
    gate = rng.standard_normal((T, Nh)).astype(np.float32) * 2  # the model always passes its head gates
    pos = np.arange(T, dtype=np.int64)
    out = np.empty_like(q)
    step = cap - window + 1 if ring else T  # as attention.prefill cuts a chunk for a ring
    for a in range(0, T, step):
        b = min(T, a + step)
        kv.append(k[a:b], v[a:b], pos[a:b])
        keys, ks, vals, vs, kpos = kv.view()
        chunk_attention(q[a:b], keys, vals, kpos, pos[a:b], window if ring else 0, out[a:b], gate[a:b], ks, vs)
    kr, vr = rounded(kt, k), rounded(vt, v)
    keys, ks, vals, vs, kpos = kv.view()
    held = kpos >= 0
    np.testing.assert_array_equal(stored(kt, keys, ks)[held], kr[kpos[held]])  # the cache holds the rounding
    np.testing.assert_array_equal(stored(vt, vals, vs)[held], vr[kpos[held]])
    want = np.empty(q.shape)
    for t in range(T):
        lo = t - window if ring else -1
        seen = np.arange(t + 1)[np.arange(t + 1) > lo]
        for h in range(Nh):
            s = kr[seen, h // 2] @ q[t, h].astype(np.float64) / np.sqrt(D)
            w = np.exp(s - s.max())
            want[t, h] = (w / w.sum()) @ vr[seen, h // 2] / (1 + np.exp(-np.float64(gate[t, h])))
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)


def test_decode_attention_stores_and_reads_each_type():
    """decode_attention writes the token's key and value in the cache's type, then attends; the
    same query over the stored cache through chunk_attention gives the same bits."""
    from runtime.model.attention_kernels import decode_attention

    rng = np.random.default_rng(3)
    Nh, Nk, D, S, qpos = 4, 2, 64, 20, 19
    for kind in TYPES:
        kv = LayerKV(Nk, D, S, ring=False, window=S, types=(kind, kind))
        kv.append(rng.standard_normal((qpos, Nk, D)).astype(np.float32), rng.standard_normal((qpos, Nk, D)).astype(np.float32),
                  np.arange(qpos, dtype=np.int64))
        slot = kv.reserve(qpos)
        q = rng.standard_normal(Nh * D).astype(np.float32)
        k, v = rng.standard_normal(Nk * D).astype(np.float32), rng.standard_normal(Nk * D).astype(np.float32)
        gate = np.full(Nh, 30, np.float32)  # sigmoid = 1
        ones, half = np.ones(D, np.float32), D // 4
        cos, sin = np.ones(half, np.float32), np.zeros(half, np.float32)  # no rotation
        out = np.empty(Nh * D, np.float32)
        qn = q.copy()
        decode_attention(qn, k.copy(), v, gate, ones, ones, np.float32(1e-6), cos, sin, kv.k, kv.v, kv.pos, slot,
                         qpos, 0, np.zeros((Nh, S), np.float32), out, kv.ks, kv.vs)
        kn = k.reshape(Nk, D) / np.sqrt(np.mean(k.reshape(Nk, D).astype(np.float64) ** 2, axis=1, keepdims=True) + 1e-6)
        np.testing.assert_allclose(stored(kind, kv.k, kv.ks)[slot], rounded(kind, kn.astype(np.float32)),
                                   rtol=0, atol=2e-6 if kind == "f32" else 3e-3 if kind == "f16" else 0.05)
        np.testing.assert_array_equal(stored(kind, kv.v, kv.vs)[slot], rounded(kind, v.reshape(Nk, D)))
        again = np.empty((1, Nh, D), np.float32)
        keys, ks, vals, vs, kpos = kv.view()
        chunk_attention(qn.reshape(1, Nh, D), keys, vals, kpos, np.array([qpos]), 0, again, gate[None], ks, vs)
        assert np.array_equal(again.reshape(-1), out), kind


# ---------------------------------------------------------------- transactions, trim, rings, checkpoints

def _drive(cache: KVCache, rng, n: int) -> None:
    """Append n positions to every layer, as a chunk of the model does."""
    for layer in cache.layers:
        pos = np.arange(cache.n_past, cache.n_past + n, dtype=np.int64)
        k = rng.standard_normal((n, 2, 32)).astype(np.float32)
        layer.append(k, -k, pos)
    cache.advance(n)


def _state(cache: KVCache):
    """Copies of what each layer holds: a ring's whole arrays, a growing block's first n slots."""
    return [tuple((a if layer.ring else a[: layer.n]).copy() for a in layer.arrays()) for layer in cache.layers]


def _same(a, b) -> bool:
    return all(len(x) == len(y) and all(np.array_equal(p, q) for p, q in zip(x, y)) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", TYPES)
def test_abort_trim_and_checkpoint_restore_every_array(kind):
    """A ring block and a growing block: abort after a chunk that wrapped the ring and grew the
    full block puts back every array, q8_0 scales included; trim then the same positions again
    gives the same cache; a checkpoint returns to its position after the ring moved on."""
    rng = np.random.default_rng(4)
    cache = KVCache((2, 2), 32, (True, False), window=8, n_ctx=1024, rollback=4, types=(kind, kind))
    assert cache.layers[0].k.dtype == kv_types.DTYPES[kind]
    _drive(cache, rng, 10)
    before = _state(cache)
    cache.begin()
    _drive(cache, np.random.default_rng(5), 7)  # overwrites ring slots
    _drive(cache, np.random.default_rng(6), 300)  # grows the full block past its start capacity
    cache.abort()
    assert cache.n_past == 10 and _same(_state(cache), before)

    cp = kv_checkpoint.take(cache)
    assert cp.nbytes == sum(a.nbytes for a in cache.layers[0].arrays())
    after = _state(cache)
    _drive(cache, np.random.default_rng(7), 3)
    again = _state(cache)
    cache.trim(3)
    _drive(cache, np.random.default_rng(7), 3)  # the same positions again
    assert _same(_state(cache), again)
    _drive(cache, np.random.default_rng(8), 20)  # the ring has moved far past the checkpoint
    with pytest.raises(StepstreamError, match="reaches past the sliding-window cache"):
        cache.trim(20)
    kv_checkpoint.restore(cache, cp)
    assert cache.n_past == 10 and _same(_state(cache), after)


@pytest.mark.parametrize("kind", TYPES)
def test_abort_puts_back_the_ring_slots_decode_steps_overwrote(kind):
    """Decode steps (reserve, then the kernel writes the slot) that wrap a ring inside a
    transaction: abort puts back the positions and every array of each slot that holds one.
    (A slot that was empty is empty again; what its arrays hold is never read.)"""
    rng = np.random.default_rng(9)
    cache = KVCache((2,), 32, (True,), window=8, n_ctx=1024, rollback=4, types=(kind, kind))
    layer = cache.layers[0]
    _drive(cache, rng, 11)
    held = lambda: [a[layer.pos >= 0].copy() for a in layer.arrays()] + [layer.pos.copy()]
    before = held()
    cache.begin()
    for _ in range(6):  # positions 11..16: the empty slot 11, then over positions 0..4 in slots 0..4
        pos = cache.n_past
        slot = layer.reserve(pos)
        kv_types.store(layer.k, layer.ks, np.array([slot]), rng.standard_normal((1, 2, 32)).astype(np.float32))
        kv_types.store(layer.v, layer.vs, np.array([slot]), rng.standard_normal((1, 2, 32)).astype(np.float32))
        layer.pos[slot] = pos
        cache.advance(1)
    cache.abort()
    after = held()
    assert cache.n_past == 11 and all(np.array_equal(a, b) for a, b in zip(after, before))


@pytest.fixture(scope="module")
def models():
    return {t: runtime.load(MODEL, n_ctx=256, cache_type_k=t, cache_type_v=t) for t in TYPES}


def _ids(m):
    return m.tokenize("import os\n\ndef walk(top):\n    for name in os.listdir(top):\n        path = os.path.join("
                      "top, name)\n        if os.path.isdir(path):\n            yield from walk(path)\n")[:64]


def test_model_logits_track_float32(models):
    """The shipped model: f16 and q8_0 caches against float32's, position by position. With int8
    activations (the default) a cache's rounding can flip an activation's int8 rounding, which
    the next blocks amplify: measured 0.99992 mean cosine and 98% top-1 over 300 tokens for both."""
    ids = _ids(models["f32"])
    want = models["f32"].logits(ids)
    for kind in ("f16", "q8_0"):
        got = models[kind].logits(ids)
        cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert cos.mean() > 0.9995 and cos.min() > 0.99, (kind, cos.mean(), cos.min())
        assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9, kind


def test_float32_activations_make_f16_all_but_exact():
    """Without int8 activations the cache's rounding is the only difference: f16 keys and values
    (11-bit mantissas) give float32's logits to cosine 1 - 1e-6, q8_0 to 1 - 1e-4."""
    ms = {t: runtime.load(MODEL, n_ctx=64, cache_type_k=t, cache_type_v=t, activations="f32") for t in TYPES}
    ids = _ids(ms["f32"])[:32]
    want = ms["f32"].logits(ids)
    for kind, floor in (("f16", 1 - 1e-6), ("q8_0", 1 - 1e-4)):
        got = ms[kind].logits(ids)
        cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert cos.min() > floor, (kind, cos.min())
        assert np.array_equal(got.argmax(1), want.argmax(1)), kind


@pytest.mark.parametrize("kind", ("f16", "q8_0"))
def test_decode_prefill_and_trim_agree_to_the_bit(models, kind):
    """Each type: a prompt in one chunk, the same positions one token at a time, as a few-token
    pass, and after a trim and re-evaluation: the same logits to the bit."""
    m = models[kind]
    ids = _ids(m)[:24]
    full = m.logits(ids)
    m.reset()
    m.eval(ids[:16])
    steps = [m.eval([t]) for t in ids[16:20]]
    assert all(np.array_equal(s, full[16 + i]) for i, s in enumerate(steps))
    few = m.eval(ids[20:24])
    assert np.array_equal(few if few.ndim == 1 else few[-1], full[23])
    m.trim(10)
    again = m.eval(ids[14:24])
    assert np.array_equal(again if again.ndim == 1 else again[-1], full[23])


# ---------------------------------------------------------------- accounting

def test_kv_cache_bytes_per_type_match_the_allocated_cache(models):
    """kv_cache_bytes at each type's element size against the arrays a cache of the model allocates
    for its whole context; the placement's needs and `plan` at the same types."""
    from offload import plan as P
    from offload.placement import kv_cache_bytes, runtime_needs
    from runtime.base.memory_limit import MemoryLimit

    m = models["f32"]
    cfg, n = m.cfg, m.n_ctx
    per_elem = {"f32": 4, "f16": 2, "q8_0": 34 / 32}
    elements = sum((min(cfg.window, n) + 16 if cfg.sliding[i] else n) * cfg.n_head_kv[i] * cfg.head_dim
                   for i in range(cfg.n_layers))
    for kind in TYPES:
        want = kv_cache_bytes(cfg, n, 16, kv_types=(kind, kind))
        assert want == int(2 * per_elem[kind] * elements)
        cache = KVCache(cfg.n_head_kv[: cfg.n_layers], cfg.head_dim, cfg.sliding[: cfg.n_layers], cfg.window, n, 16,
                        (kind, kind))  # n = 256: a full block starts at the whole context (START_CAPACITY)
        assert cache.nbytes == want, kind
    mixed = kv_cache_bytes(cfg, n, 16, kv_types=("q8_0", "f16"))
    assert mixed == int((34 / 32 + 2) * elements)
    needs = runtime_needs(cfg, n, 16, MemoryLimit("cgroup v1", 0, 0, 0), ("q8_0", "q8_0"))
    assert needs.kv_bytes == kv_cache_bytes(cfg, n, 16, kv_types=("q8_0", "q8_0"))
    plans = {k: P.make_plan(MODEL, ram=64 * 2**30, ram_gbps=10, n_ctx=4096, cache_type_k=k, cache_type_v=k)
             for k in TYPES}
    # `run` drafts with the file's MTP heads by default: plan counts their caches too
    heads = cfg.n_mtp
    assert plans["f32"].kv_bytes == kv_cache_bytes(cfg, 4096, 16, mtp_heads=heads) == 2 * plans["f16"].kv_bytes
    assert plans["q8_0"].kv_bytes == kv_cache_bytes(cfg, 4096, 16, kv_types=("q8_0", "q8_0"), mtp_heads=heads)
    assert "(q8_0)" in plans["q8_0"].text() and plans["q8_0"].kv_types == ("q8_0", "q8_0")


def test_cache_type_flags_refuse_a_bad_value_in_one_line(capsys):
    for argv in (["run", "-m", MODEL, "-p", "x", "--cache-type-k", "q4_0"],
                 ["bench", "-m", MODEL, "-ctv", "bf16"],
                 ["plan", "-m", MODEL, "--cache-type-v", "q8"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1, err
        assert "is not a KV cache type; choose f32, f16, q8_0" in err and argv[-1] in err, err


def test_a_loaded_model_places_and_drafts_with_its_cache_types():
    """`run`'s placement counts the KV cache at the options' types (as `plan` does), and the MTP
    heads' caches store the trunk's types."""
    from offload.placement import kv_cache_bytes

    m = runtime.load(MODEL, experts="stream", n_ctx=1024, cache_type_k="q8_0", cache_type_v="f16", mtp=2)
    try:
        assert m.placement.kv_types == ("q8_0", "f16")
        assert m.placement.kv_bytes == kv_cache_bytes(m.cfg, 1024, 16, kv_types=("q8_0", "f16"), mtp_heads=m.n_mtp)
        assert "K q8_0, V f16" in m.placement.text()
        from runtime.model.mtp import Drafter

        d = Drafter(m)
        assert all(kv.types == ("q8_0", "f16") for kv in d.kv)
    finally:
        m.close()


def test_the_four_slot_f16_widening_gives_every_half_the_one_slot_float():
    """key_dot4 and add_values4 widen stored halves with kv_types.widen4 (F16C's vcvtph2ps where
    the host has it), key_dot and add_value with the integer decoder `half`: every half that is
    not a NaN gives the same float32 both ways (and numpy's), so the mixed loops keep their bits."""
    import numba as nb

    @nb.njit
    def both(bits, a, b):
        for i in range(bits.shape[0]):
            a[i] = kv_types.widen4(bits[i])
            b[i] = kv_types.half(bits[i])

    bits = np.arange(65536, dtype=np.uint16)
    bits = bits[~np.isnan(bits.view(np.float16))]
    a, b = np.empty(bits.size, np.float32), np.empty(bits.size, np.float32)
    both(bits, a, b)
    expect = bits.view(np.float16).astype(np.float32)
    assert np.array_equal(a.view(np.uint32), expect.view(np.uint32))
    assert np.array_equal(b.view(np.uint32), expect.view(np.uint32))


@pytest.mark.parametrize("n_ctx, chunk", [(3000, 64), (700, 1), (4100, 512)])
def test_a_full_block_never_grows_past_the_context_the_placement_counts(n_ctx, chunk):
    """A cache filled in chunks doubled past n_ctx (3000 -> 4096 slots, 4100 -> 8192): up to twice
    the KV bytes the placement line and `plan` count (a review's finding). Now it holds at most
    n_ctx positions, and full it is exactly kv_cache_bytes' figure."""
    from offload.placement import kv_cache_bytes

    cfg = runtime.load(MODEL, n_ctx=8).cfg
    cache = KVCache(cfg.n_head_kv[: cfg.n_layers], cfg.head_dim, cfg.sliding[: cfg.n_layers], cfg.window, n_ctx, 16,
                    ("f16", "f16"))
    kv = np.zeros((chunk, max(cfg.n_head_kv), cfg.head_dim), np.float32)
    for start in range(0, n_ctx, chunk):
        T = min(chunk, n_ctx - start)
        for i, layer in enumerate(cache.layers):
            layer.append(kv[:T, : cfg.n_head_kv[i]], kv[:T, : cfg.n_head_kv[i]], np.arange(start, start + T))
        cache.advance(T)
        assert all(layer.capacity <= n_ctx for layer in cache.layers if not layer.ring)
    assert cache.nbytes == kv_cache_bytes(cfg, n_ctx, 16, kv_types=("f16", "f16"))


def test_the_mtp_heads_caches_are_what_the_placement_counts_for_them():
    """The heads' KV caches grew with the context uncounted (a review: 3 x 4 KiB a position on the
    real model). A generation that drafts to the end of the context allocates exactly the bytes
    kv_cache_bytes adds for the heads, and never more than n_ctx positions each."""
    from offload.placement import kv_cache_bytes

    n_ctx = 300
    m = runtime.load(MODEL, n_ctx=n_ctx, n_threads=1, cache_type_k="f16", cache_type_v="f16", mtp=3)
    list(m.generate(m.tokenize("def fib(n):"), max_tokens=None, temperature=0))
    assert m.n_past >= n_ctx - 4
    heads = sum(kv.k.nbytes + kv.ks.nbytes + kv.v.nbytes + kv.vs.nbytes for kv in m.drafter.kv)
    assert all(kv.capacity <= n_ctx for kv in m.drafter.kv)
    full = kv_cache_bytes(m.cfg, n_ctx, 16, kv_types=("f16", "f16"), mtp_heads=m.n_mtp)
    assert heads == full - kv_cache_bytes(m.cfg, n_ctx, 16, kv_types=("f16", "f16"))
