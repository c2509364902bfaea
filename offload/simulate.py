"""Replaying a routing trace against expert cache policies, and Belady's optimum.

    python -m offload.simulate TRACE [--slots N[,N..]] [--slots-pct 25,50] [--json]

Each MoE layer of each token is one request for its K experts, in the order decoding
makes them (token by token, layer by layer). The simulated cache is the one
offload/cache.py runs: one pool of equal slots shared by every layer (keys are
(layer, expert)), no bypass (a missed expert is read into a slot), and the K experts of
the current request are all held at once, so none of them can be the victim while the
request is served. Hits are counted on demand requests only (no prefetch), and the
first use of every expert is a miss under every policy: a pinned expert is read before
decoding starts, but it is a read all the same, and counting it keeps the policies
comparable on short traces.

Policies (each kernel takes the requests [Q, K] and a slot count, returns hits [Q, K]):
    lru      victim: least recently released; a request's hits are released before its
             misses (offload.cache.LruEvictable)
    lfu      victim: fewest uses since it was read, ties least recently released
             (offload.cache.LfuEvictable: a count starts again when an expert is re-read)
    pinned   cache.py's `pinned` policy: the hottest half of the slots pinned from the
             counts, LRU for the rest (counts taken from the trace itself: a profile
             recorded on the very text replayed, so an upper bound for a profile)
    hot      a fixed hot set: the N - K hottest experts pinned, K slots to stream the rest
             through (nothing else is ever kept)
    belady   the offline optimum: evict the expert whose next request is farthest away
             (Belady's MIN; with unit sizes and costs it stays optimal when a request's
             K experts must be co-resident: the exchange argument goes through unchanged)

Shape legend:  T tokens  L MoE layers  K experts per token  Q = T*L requests
               N slots   X = sum over layers of n_expert (distinct keys)
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import sys
from collections.abc import Callable

import numpy as np

from offload.trace import RoutingTrace
from runtime.base.errors import StepstreamError

PIN_SHARE = 0.5  # as offload.placement.build_streaming pins from a profile
NEVER = np.iinfo(np.int64).max  # a next use that never comes


# ---------------------------------------------------------------- requests

def requests(ids: np.ndarray, n_expert: np.ndarray) -> np.ndarray:
    """ids [T, L, K] -> keys [Q, K] int64, each request's experts ascending (as decode asks for
    them); key = the layer's offset (sum of n_expert of the layers before it) + expert."""
    T, L, K = ids.shape
    offsets = np.concatenate([[0], np.cumsum(n_expert, dtype=np.int64)[:-1]])  # [L]
    keys = ids.astype(np.int64) + offsets[None, :, None]  # [T, L, K]
    return np.sort(keys.reshape(T * L, K), axis=1)


def key_counts(keys: np.ndarray, n_keys: int) -> np.ndarray:
    """[X] how many requests name each key."""
    return np.bincount(keys.ravel(), minlength=n_keys)


def hottest(counts: np.ndarray, n: int) -> np.ndarray:
    """The n most-requested keys, ties by key (that is, by (layer, expert), as ExpertProfile.hottest);
    keys never requested are never chosen."""
    order = np.lexsort((np.arange(len(counts)), -counts))
    return order[: max(0, min(n, int((counts > 0).sum())))]


def first_uses(keys: np.ndarray) -> np.ndarray:
    """[Q, K] bool: whether this is the first request naming the key."""
    flat = keys.ravel()
    first = np.zeros(flat.size, bool)
    first[np.unique(flat, return_index=True)[1]] = True
    return first.reshape(keys.shape)


def next_use(keys: np.ndarray) -> np.ndarray:
    """[Q, K] the index of the next request naming the same key, NEVER when none does."""
    Q, K = keys.shape
    flat = keys.ravel()
    order = np.lexsort((np.arange(flat.size), flat))  # by key, then by position
    nxt = np.full(flat.size, NEVER, np.int64)
    same = flat[order[1:]] == flat[order[:-1]]
    nxt[order[:-1][same]] = order[1:][same] // K
    return nxt.reshape(Q, K)


def _check(keys: np.ndarray, slots: int) -> None:
    if keys.ndim != 2:
        raise StepstreamError(f"requests must be [Q, K], got shape {list(keys.shape)}")
    if slots < keys.shape[1]:
        raise StepstreamError(f"{slots} slots cannot hold one request's {keys.shape[1]} experts at once "
                              f"(the cache needs at least K = {keys.shape[1]})")


# ---------------------------------------------------------------- the replay engine

def _replay(keys: np.ndarray, slots: int, priority: Callable[[int, int, int, int], tuple],
            pinned: np.ndarray | None = None) -> np.ndarray:
    """Replay requests [Q, K] on `slots` slots; hits [Q, K] bool.

    The victim is the evictable key of least `priority(key, q, j, uses)`, a tuple computed when
    the key is released after request q (j: its column, uses: requests since it was read).
    Keys in `pinned` start resident (their first use still counts as a miss) and are never
    evicted. A min-heap holds (priority, key);
    an entry is stale when its key was taken again (held, so not evictable) or evicted since.
    """
    _check(keys, slots)
    Q, K = keys.shape
    hits = np.zeros((Q, K), bool)
    pin = set() if pinned is None else set(int(k) for k in pinned)
    if slots - len(pin) < K:
        raise StepstreamError(f"{len(pin)} pinned of {slots} slots leave fewer than K = {K} for a request")
    live: dict[int, tuple | None] = {k: None for k in pin}  # resident key -> its heap priority (None: held/pinned)
    uses: dict[int, int] = {}
    heap: list[tuple] = []
    rows = keys.tolist()
    for q in range(Q):
        row = rows[q]
        resident = [j for j in range(K) if row[j] in live]
        missed = [j for j in range(K) if row[j] not in live]
        for j in resident:
            k = row[j]
            if k not in pin:
                hits[q, j] = True
                live[k] = None  # held: no longer evictable
                uses[k] += 1
        for j in missed:
            k = row[j]
            if len(live) >= slots:
                while True:
                    prio, victim = heapq.heappop(heap)  # never empty: slots - pinned >= K
                    if live.get(victim) == prio:
                        break
                del live[victim]
            live[k] = None
            uses[k] = 1
        for j in resident + missed:  # released in the order acquired (offload.provider._serve)
            k = row[j]
            if k not in pin:
                prio = priority(k, q, j, uses[k])
                live[k] = prio
                heapq.heappush(heap, (prio, k))
    if pin:
        hits |= np.isin(keys, list(pin)) & ~first_uses(keys)
    return hits


def lru(keys: np.ndarray, slots: int) -> np.ndarray:
    """Least recently released goes first."""
    clock = iter(range(keys.size))
    return _replay(keys, slots, lambda k, q, j, n: (next(clock),))


def lfu(keys: np.ndarray, slots: int) -> np.ndarray:
    """Fewest uses since the expert was read goes first; ties: least recently released."""
    clock = iter(range(keys.size))
    return _replay(keys, slots, lambda k, q, j, n: (n, next(clock)))


def belady(keys: np.ndarray, slots: int) -> np.ndarray:
    """The key whose next request is farthest away goes first (ties: the larger key)."""
    nxt = next_use(keys)
    return _replay(keys, slots, lambda k, q, j, n: (-int(nxt[q, j]), -k))


def pinned(keys: np.ndarray, slots: int, counts: np.ndarray, share: float = PIN_SHARE) -> np.ndarray:
    """offload.cache's `pinned`: the int(slots * share) hottest keys pinned (at most slots - K, so
    a request still fits), LRU for the rest."""
    _check(keys, slots)
    n_pin = min(int(slots * share), slots - keys.shape[1])
    clock = iter(range(keys.size))
    return _replay(keys, slots, lambda k, q, j, n: (next(clock),), hottest(counts, n_pin))


def hot(keys: np.ndarray, slots: int, counts: np.ndarray) -> np.ndarray:
    """A fixed hot set of the slots - K hottest keys; every other expert is a miss."""
    _check(keys, slots)
    fixed = np.zeros(len(counts), bool)
    fixed[hottest(counts, slots - keys.shape[1])] = True
    return fixed[keys] & ~first_uses(keys)


POLICIES = ("lru", "lfu", "pinned", "hot", "belady")


def simulate(keys: np.ndarray, n_keys: int, slots: int, policies=POLICIES) -> dict[str, np.ndarray]:
    """{policy: hits [Q, K]} for one cache size."""
    counts = key_counts(keys, n_keys)
    run = {"lru": lambda: lru(keys, slots), "lfu": lambda: lfu(keys, slots),
           "pinned": lambda: pinned(keys, slots, counts), "hot": lambda: hot(keys, slots, counts),
           "belady": lambda: belady(keys, slots)}
    unknown = [p for p in policies if p not in run]
    if unknown:
        raise StepstreamError(f"unknown policy {unknown[0]!r}; choose from {', '.join(POLICIES)}")
    return {p: run[p]() for p in policies}


# ---------------------------------------------------------------- report

def report(trace: RoutingTrace, sizes: list[int], policies=POLICIES) -> dict:
    """Hit rates of every policy at every size, and what bounds them."""
    keys = requests(trace.ids, trace.n_expert)
    n_keys = int(trace.n_expert.sum())
    distinct = int(np.unique(keys).size)
    out = {"trace": trace.model, "tokens": trace.tokens, "moe_layers": int(len(trace.layers)), "top_k": trace.top_k,
           "experts": n_keys, "experts_used": distinct, "requests": int(keys.size),
           "best_possible": 1.0 - distinct / keys.size if keys.size else 0.0, "sizes": []}
    for n in sizes:
        hits = simulate(keys, n_keys, n, policies)
        out["sizes"].append({"slots": n, "share": n / n_keys,
                             "hit_rate": {p: float(h.mean()) if h.size else 0.0 for p, h in hits.items()}})
    return out


def table(rep: dict) -> str:
    pol = list(rep["sizes"][0]["hit_rate"]) if rep["sizes"] else []
    lines = [f"{rep['trace']}: {rep['tokens']} tokens x {rep['moe_layers']} MoE layers x top-{rep['top_k']} "
             f"({rep['requests']} expert requests); {rep['experts_used']} of {rep['experts']} experts used, "
             f"so at most {rep['best_possible']:.1%} can hit",
             f"{'slots':>7} {'share':>6} " + " ".join(f"{p:>7}" for p in pol)
             + ("   belady-lru" if "lru" in pol and "belady" in pol else "")]
    for s in rep["sizes"]:
        r = s["hit_rate"]
        gap = f"   {100 * (r['belady'] - r['lru']):+9.1f} pt" if "lru" in r and "belady" in r else ""
        lines.append(f"{s['slots']:>7} {s['share']:>6.0%} " + " ".join(f"{r[p]:>7.1%}" for p in pol) + gap)
    return "\n".join(lines)


def _ints(text: str, what: str) -> list:
    """--slots (positive integers) or --slots-pct (percents in (0, 100], 12.5 included)."""
    parts = [v.strip() for v in text.split(",")]
    try:
        values = [float(v) if what == "pct" else int(v) for v in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                         + ("numbers" if what == "pct" else "integers")) from None
    if not values or any(not math.isfinite(v) or v <= 0 or (what == "pct" and v > 100) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: each value must be " + ("more than 0 and at most 100"
                                                                             if what == "pct" else "positive"))
    return values


def _write(text: str) -> int:
    """Print to stdout: 0, or 141 when the reader went away (`| head`), as the command line does,
    or 2 with one line when stdout cannot be written (a full disk)."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return 0
    except BrokenPipeError:
        code = 141
    except OSError as e:
        print(f"error: could not write standard output ({e.strerror or e})", file=sys.stderr)
        code = 2
    try:  # Python flushes stdout again at exit and would fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m offload.simulate", description=__doc__.splitlines()[0])
    p.add_argument("trace", help="routing trace (.npz) from `stepstream profile --trace`")
    p.add_argument("--slots", type=lambda t: _ints(t, "slots"), default=[], help="cache sizes in experts, e.g. 64,128")
    p.add_argument("--slots-pct", type=lambda t: _ints(t, "pct"), default=None,
                   help="cache sizes as percents of all experts (default: 25,50 when --slots is not given)")
    p.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated (default: {','.join(POLICIES)})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    try:
        policies = [s.strip() for s in args.policies.split(",") if s.strip()]
        if not policies:
            raise StepstreamError(f"--policies {args.policies!r}: name at least one of {', '.join(POLICIES)}")
        trace = RoutingTrace.load(args.trace)
        if trace.tokens == 0 or len(trace.layers) == 0:
            raise StepstreamError(f"{args.trace}: the routing trace holds no requests ({trace.tokens} tokens, "
                                  f"{len(trace.layers)} MoE layers); record one on some text with "
                                  "`stepstream profile -m MODEL -f PROMPTS.txt --trace T.npz`")
        n_keys = int(trace.n_expert.sum())
        pct = args.slots_pct if args.slots_pct is not None else ([] if args.slots else [25, 50])
        sizes = sorted(set(args.slots + [max(trace.top_k, round(n_keys * v / 100)) for v in pct]))
        too_big = [n for n in sizes if n > n_keys]
        if too_big:
            raise StepstreamError(f"--slots {too_big[0]} exceeds the trace's {n_keys} experts")
        rep = report(trace, sizes, policies)
    except StepstreamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _write(json.dumps(rep) if args.json else table(rep))


if __name__ == "__main__":
    sys.exit(main())
