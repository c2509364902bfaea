"""DRY ("don't repeat yourself"), llama.cpp's sampler against verbatim repetition: a token that
would extend a sequence already seen in the recent tokens loses

    multiplier * base ** (length - allowed_length)

from its logit, `length` being the longest such sequence it would extend (at least
allowed_length). Sequence breakers (by default a newline, ":", '"' and "*") end a repetition:
none is counted across the last one in the text, and a token holding one is never penalized.

A breaker is text, and tokens split it differently: llama.cpp's way is kept. A token whose text
holds the breaker is a breaker alone; a token whose text ends with the breaker's first bytes is
one when the tokens of the rest of the breaker follow it (at most MAX_TAIL of them).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import numpy as np

DEFAULT_BREAKERS = ("\n", ":", '"', "*")  # llama.cpp's and llama-server's
MAX_BREAKER_BYTES = 40  # longer breakers are cut, as llama.cpp cuts them
MAX_TAIL = 20  # tokens after a breaker's head token
MAX_KEPT = 8  # breaker sets kept per vocabulary
_LOG_F32_MAX = 88.7228391  # the largest exponent whose power of e float32 holds
SHORT = 64  # match lengths followed a step at a time before the linear way takes over

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def breaker_heads(pieces: Sequence[bytes], tokenize, breakers: Sequence[str]) -> dict[int, tuple[tuple, ...]]:
    """head token -> the token sequences that, after it, finish a breaker (() when the head token
    holds a whole breaker). pieces: each token's text as bytes; tokenize(text) -> ids (no BOS,
    special tokens not parsed). The rest of a breaker that a token ends inside one of its
    characters is not text: its bytes are the byte tokens of the vocabulary, as a byte-level
    tokenizer gives them."""
    heads: dict[int, list] = {}
    byte_token = {p[0]: t for t, p in enumerate(pieces) if len(p) == 1}

    def tail_tokens(rest: bytes) -> tuple | None:
        try:
            return tuple(tokenize(rest.decode("utf-8"))[:MAX_TAIL])
        except UnicodeDecodeError:  # (the breaker's next character begins before the head token ends)
            cut = 0
            while cut < len(rest) and 0x80 <= rest[cut] < 0xC0:
                cut += 1
            lead = [byte_token.get(b) for b in rest[:cut]]
            if None in lead:
                return None
            try:
                more = tokenize(rest[cut:].decode("utf-8")) if cut < len(rest) else []
            except UnicodeDecodeError:
                return None
            return tuple((lead + list(more))[:MAX_TAIL])

    def add(tok: int, tail: tuple) -> None:
        tails = heads.setdefault(tok, [])
        if tail not in tails:
            tails.append(tail)

    for text in breakers:
        b = text.encode("utf-8")[:MAX_BREAKER_BYTES]
        if not b:
            continue
        first = b[:1]
        for tok, word in enumerate(pieces):
            if b in word:
                add(tok, ())
                continue
            pos = word.find(first)
            while pos != -1:
                n = len(word) - pos  # the word's last n bytes begin the breaker?
                if n < len(b) and word[pos:] == b[:n]:
                    tail = tail_tokens(b[n:])
                    if tail is not None:
                        add(tok, tail)
                pos = word.find(first, pos + 1)
    return {tok: tuple(tails) for tok, tails in heads.items()}


def heads_for(tokenizer, breakers: Sequence[str]) -> dict[int, tuple[tuple, ...]]:
    """breaker_heads for a runtime tokenizer, built once per tokenizer and breakers (a pass over
    the vocabulary for each breaker)."""
    per = _CACHE.setdefault(tokenizer, {})
    key = tuple(breakers)
    if key not in per:
        if len(per) >= MAX_KEPT:  # (each client may send its own breakers: the oldest set goes)
            per.pop(next(iter(per)))
        pieces = [tokenizer.decode_bytes([t], special=True) for t in range(len(tokenizer.tokens))]
        per[key] = breaker_heads(pieces, lambda s: tokenizer.encode(s, add_bos=False, special=False), key)
    return per[key]


def _repeat_limit(w: list[int], heads: dict) -> int:
    """How far back a repetition may reach: the tokens after the last breaker in `w`."""
    n = len(w)
    for i in range(n):  # the i-th token from the end
        tails = heads.get(w[n - 1 - i])
        if tails is None:
            continue
        longest = -1
        for tail in tails:
            if longest < len(tail) <= i and all(tail[o] == w[n - i + o] for o in range(len(tail))):
                longest = len(tail)
        if longest >= 0:
            return i - longest
    return n


def _repeat_counts(w: np.ndarray, limit: int) -> np.ndarray:
    """counts[e] for e < len(w) - 1: how many tokens ending at e equal the ones ending the window
    (its longest common suffix), at most `limit`. A step per length, over the positions still
    matching: cheap on text, and past SHORT steps (a loop the text is stuck in, where it would
    take len(w) steps over len(w) positions) the Z-function of the reversed window, linear."""
    n = w.size
    counts = np.zeros(n - 1, np.int64)
    active = np.arange(n - 1)
    j = 0
    while active.size and j < limit:
        if j == SHORT:
            return np.minimum(_suffix_matches(w), limit)
        ok = active - j >= 0
        active = active[ok]
        active = active[w[active - j] == w[n - 1 - j]]
        counts[active] += 1
        j += 1
    return counts


def _suffix_matches(w: np.ndarray) -> np.ndarray:
    """For each e < len(w) - 1, the longest common suffix of w[:e + 1] and w: the Z-function of
    the reversed window (z[k] pairs with e = len(w) - 1 - k)."""
    r = w[::-1].tolist()
    n = len(r)
    z = [0] * n
    lo = hi = 0
    for k in range(1, n):
        m = min(hi - k, z[k - lo]) if k < hi else 0
        while k + m < n and r[m] == r[k + m]:
            m += 1
        z[k] = m
        if k + m > hi:
            lo, hi = k, k + m
    return np.asarray(z[1:][::-1], np.int64)


def dry(logits: np.ndarray, history: Sequence[int], heads: dict, multiplier: float, base: float,
        allowed_length: int, last_n: int) -> np.ndarray:
    """The logits after DRY's penalties over the last `last_n` tokens of `history` (-1: all of
    them; multiplier 0, base below 1 or last_n 0: off)."""
    if multiplier == 0 or base < 1 or last_n == 0:
        return logits
    w = list(history[-last_n:]) if last_n > 0 else list(history)
    if len(w) <= allowed_length or len(w) < 2:
        return logits
    limit = _repeat_limit(w, heads)
    if limit < allowed_length:
        return logits
    counts = _repeat_counts(np.asarray(w, dtype=np.int64), limit)
    longest: dict[int, int] = {}
    for e in np.flatnonzero(counts >= allowed_length).tolist():
        tok = w[e + 1]  # the token that followed the earlier occurrence
        longest[tok] = max(longest.get(tok, 0), int(counts[e]))
    top = int(_LOG_F32_MAX / math.log(base)) if base > 1.000001 else 0
    out = logits.copy()
    for tok, length in longest.items():
        if tok >= out.size or () in heads.get(tok, ()):  # (a token that is a breaker alone is never penalized)
            continue
        exponent = length - allowed_length
        if top > 0 and exponent > top:
            exponent = top
        out[tok] = out[tok] - np.float32(multiplier * base ** exponent)
    return out
