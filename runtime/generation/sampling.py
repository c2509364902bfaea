"""Choosing the next token: small functions over a logit vector, composed into a sampler.

Each filter takes logits [V] float32 and returns a copy with the tokens it rules out set
to -inf. The order is llama.cpp's default chain: logit bias, penalties (repetition,
frequency, presence), DRY, top-n-sigma, top-k, typical, top-p, min-p, XTC, temperature, then a
draw (or, when temperature <= 0, the most likely token the filters left: top-k, top-p, min-p
and top-n-sigma always leave it, so the chain runs then only where typical or XTC is on).
With mirostat on, the chain is llama.cpp's mirostat one: logit bias, temperature, mirostat.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from runtime.base.errors import StepstreamError
from runtime.generation.dry import dry

NEG_INF = np.float32(-np.inf)
_F32_MAX = np.finfo(np.float32).max


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # <= 0: greedy
    top_k: int = 40  # <= 0: off
    top_p: float = 0.95  # >= 1: off; 0: the most likely token alone
    min_p: float = 0.05  # <= 0: off
    repeat_penalty: float = 1.0  # 1: off
    repeat_last_n: int = 64  # how many recent tokens the penalty looks at; -1: all of them
    seed: int | None = None  # None (or -1, llama.cpp's and llama-cpp-python's "random"): fresh entropy
    # subtracted from a token's logit for each time it occurs in the last repeat_last_n tokens
    # (frequency), and once if it occurs there at all (presence): OpenAI's and llama.cpp's; 0: off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple = ()  # ((token id, bias), ...): added to the logits before everything else
    # llama.cpp's other default samplers (llama-server's fields, llama-cpp-python's typical_p)
    typical_p: float = 1.0  # locally typical sampling; >= 1: off
    xtc_probability: float = 0.0  # exclude top choices, at each step with this chance; 0: off
    xtc_threshold: float = 0.1  # ... the tokens at least this likely but the least of them; > 0.5: off
    top_n_sigma: float = -1.0  # keep logits within n standard deviations of the largest; <= 0: off
    # mirostat 1 or 2 (llama.cpp's): the chain is then logit bias, temperature and mirostat alone,
    # aiming at `mirostat_tau` bits of surprise per token, learning at `mirostat_eta`; 0: off
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    # dynamic temperature (llama.cpp's temp-ext): the temperature moves within temperature +- range
    # with the candidates' normalized entropy raised to `dynatemp_exponent`; 0: off
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    # DRY (runtime.generation.dry), after the penalties: 0 multiplier: off; -1 last_n: every token
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1
    dry_sequence_breakers: tuple = ("\n", ":", '"', "*")

    def __post_init__(self):
        # -1 is "off" / "all" on the command line, in llama-server's and in llama-cpp-python's
        # calls, so the Python API takes it too (it was refused here alone)
        if self.seed is not None and not isinstance(self.seed, bool) and self.seed == -1:
            object.__setattr__(self, "seed", None)
        if not isinstance(self.repeat_last_n, bool) and self.repeat_last_n == -1:
            object.__setattr__(self, "repeat_last_n", 2**31 - 1)  # more than any context holds
        for name in ("temperature", "top_p", "min_p", "repeat_penalty", "frequency_penalty", "presence_penalty",
                     "typical_p", "xtc_probability", "xtc_threshold", "top_n_sigma", "mirostat_tau", "mirostat_eta",
                     "dynatemp_range", "dynatemp_exponent", "dry_multiplier", "dry_base"):
            if not math.isfinite(getattr(self, name)):
                raise StepstreamError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.seed is not None and not (isinstance(self.seed, numbers.Integral) and not isinstance(self.seed, bool)):
            raise StepstreamError(f"seed must be an integer, or None for fresh entropy, got {self.seed!r}")
        if self.seed is not None and self.seed < 0:
            raise StepstreamError(f"seed must be >= 0, or None (or -1) for fresh entropy, got {self.seed}")
        if self.top_p < 0:
            raise StepstreamError(f"top_p must be >= 0, got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise StepstreamError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repeat_penalty <= 0:
            raise StepstreamError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if not (isinstance(self.dry_sequence_breakers, tuple) and all(isinstance(b, str) for b in self.dry_sequence_breakers)):
            raise StepstreamError(f"dry_sequence_breakers must be strings, got {self.dry_sequence_breakers!r:.80}")
        for name in ("dry_allowed_length", "dry_penalty_last_n"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < -1:
                raise StepstreamError(f"{name} must be an integer >= -1, got {v!r}")
        if isinstance(self.mirostat, bool) or self.mirostat not in (0, 1, 2):
            raise StepstreamError(f"mirostat must be 0 (off), 1 or 2, got {self.mirostat!r}")
        for name in ("xtc_probability", "xtc_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise StepstreamError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        bias = self.logit_bias
        if not isinstance(bias, tuple) or not all(
                isinstance(b, tuple) and len(b) == 2 and isinstance(b[0], numbers.Integral) and not isinstance(b[0], bool)
                and b[0] >= 0 and isinstance(b[1], numbers.Real) and not isinstance(b[1], bool) and _finite(b[1])
                for b in bias):
            raise StepstreamError(f"logit_bias must be pairs of a token id >= 0 and a finite bias, got {bias!r:.80}")
        if len({t for t, _ in bias}) != len(bias):
            raise StepstreamError("logit_bias names a token twice")
        if self.repeat_last_n < 0:
            raise StepstreamError(f"repeat_last_n must be >= 0, or -1 for the whole context, got {self.repeat_last_n}")


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max())
    return z / z.sum()


def repetition_penalty(logits: np.ndarray, recent: Sequence[int], penalty: float, frequency: float = 0.0,
                       presence: float = 0.0) -> np.ndarray:
    """Seen tokens get less likely, as llama.cpp's penalties sampler makes them: positive logits
    divided by `penalty`, negative ones multiplied; then `frequency` times the token's count in
    `recent` subtracted, and `presence` once."""
    out = logits.copy()
    if (penalty == 1.0 and frequency == 0.0 and presence == 0.0) or not len(recent):
        return out
    ids, counts = np.unique(np.asarray(recent, dtype=np.int64), return_counts=True)
    v = out[ids]
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # extremes stay in float32: no new +-inf
        new = np.where(v > 0, v / np.float32(penalty), v * np.float32(penalty))
        new = new - (counts.astype(np.float32) * np.float32(frequency) + np.float32(presence))
    out[ids] = np.where(np.isfinite(v), np.clip(new, -_F32_MAX, _F32_MAX), v)
    return out


def bias_arrays(bias: tuple) -> tuple[np.ndarray, np.ndarray]:
    """((token id, bias), ...) as (ids [n] int64, biases [n] float32), for `biased`."""
    return (np.fromiter((t for t, _ in bias), np.int64, len(bias)),
            np.fromiter((b for _, b in bias), np.float32, len(bias)))


def biased(logits: np.ndarray, bias: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The logits with the biases added (OpenAI's logit_bias: -100 all but bans a token); `bias`:
    bias_arrays' (ids, biases), each token at most once."""
    ids, add = bias
    if not ids.size:
        return logits
    out = logits.copy()
    if ids.max() >= out.size:
        raise StepstreamError(f"logit_bias names token {int(ids.max())}, outside the vocabulary (0..{out.size - 1})")
    v = out[ids]
    with np.errstate(over="ignore"):
        new = np.where(np.isfinite(v), np.clip(v + add, -_F32_MAX, _F32_MAX), v)
    out[ids] = np.where(add <= -_F32_MAX, NEG_INF, new)  # a ban (llama-server's `false`): never drawn
    return out


def top_k(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.size:
        return logits.copy()
    kth = np.partition(logits, -k)[-k]
    return np.where(logits >= kth, logits, NEG_INF)


def top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the most likely tokens whose probabilities first sum to at least p, and at least one
    (llama.cpp's min_keep = 1): p = 0 keeps the most likely token alone."""
    if p >= 1.0:
        return logits.copy()
    order = np.argsort(-logits, kind="stable")
    cum = np.cumsum(softmax(logits)[order])
    n = int(np.searchsorted(cum, p) + 1)
    out = np.full_like(logits, NEG_INF)
    out[order[:n]] = logits[order[:n]]
    return out


def min_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep tokens at least p times as likely as the most likely one."""
    if p <= 0:
        return logits.copy()
    keep = logits >= logits.max() + np.log(p)
    return np.where(keep, logits, NEG_INF)


def top_n_sigma(logits: np.ndarray, n: float) -> np.ndarray:
    """Keep the tokens whose logit is within n standard deviations of the largest, the mean and
    deviation taken over the tokens still in (llama.cpp's top-n-sigma; n <= 0: off). A token a
    bias banned (-inf in llama.cpp, float32's lowest here) is not one of them."""
    live = np.isfinite(logits) & (logits > -_F32_MAX)
    if n <= 0 or live.sum() <= 1:
        return logits.copy()
    v = logits[live].astype(np.float64)
    spread = math.sqrt(float(np.mean((v - v.mean()) ** 2)))
    return np.where(logits >= v.max() - n * spread, logits, NEG_INF)


def typical(logits: np.ndarray, p: float) -> np.ndarray:
    """Locally typical sampling (llama.cpp's typical sampler; p >= 1: off): the tokens whose
    surprise -log p is closest to the distribution's entropy, in that order, until their
    probabilities sum past p (at least one)."""
    if p >= 1.0:
        return logits.copy()
    live = np.flatnonzero(np.isfinite(logits))
    probs = softmax(logits[live])
    with np.errstate(divide="ignore"):
        surprise = -np.log(probs)
    entropy = float(np.sum(np.where(probs > 0, probs * surprise, 0.0)))
    order = np.argsort(np.abs(surprise - entropy), kind="stable")
    past = np.flatnonzero(np.cumsum(probs[order]) > p)
    n = int(past[0]) + 1 if past.size else order.size
    out = np.full_like(logits, NEG_INF)
    keep = live[order[:n]]
    out[keep] = logits[keep]
    return out


def xtc(logits: np.ndarray, probability: float, threshold: float, rng: np.random.Generator) -> np.ndarray:
    """Exclude top choices (llama.cpp's XTC): with chance `probability`, the tokens at least
    `threshold` likely are removed but the least likely of them, so the reply leaves its most
    predictable paths (probability 0 or threshold over 0.5: off; draws from rng only when on)."""
    live = np.flatnonzero(np.isfinite(logits))
    if probability <= 0 or threshold > 0.5 or live.size < 2:
        return logits.copy()
    if rng.random() > probability:
        return logits.copy()
    order = live[np.argsort(-logits[live], kind="stable")]
    probs = softmax(logits[order])
    above = int(np.sum(probs >= threshold))  # (sorted: they lead)
    out = logits.copy()
    if above > 1:
        out[order[:above - 1]] = NEG_INF
    return out


def mirostat_candidates(logits: np.ndarray, mu: float, version: int, m: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """The tokens mirostat draws from at target surprise `mu` and their probabilities, most likely
    first (llama.cpp's samplers). Version 2 keeps the tokens whose surprise -log2 p is at most mu
    (at least one); version 1 estimates the distribution's Zipf exponent from its m most likely
    tokens and keeps the top k that exponent and mu give."""
    live = np.flatnonzero(np.isfinite(logits))
    order = live[np.argsort(-logits[live], kind="stable")]
    probs = softmax(logits[order])
    if version == 2:
        with np.errstate(divide="ignore"):
            over = np.flatnonzero(-np.log2(probs) > mu)
        n = max(int(over[0]), 1) if over.size else order.size
    else:
        i = np.arange(min(m - 1, order.size - 1))
        t = np.log((i + 2) / (i + 1))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            s_hat = float(np.sum(t * np.log(probs[i] / probs[i + 1])) / np.sum(t * t)) if i.size else 1.0
            eps = s_hat - 1
            try:
                k = ((eps * 2.0 ** mu) / (1 - float(logits.size) ** (-eps))) ** (1 / s_hat)
            except (OverflowError, ZeroDivisionError):
                k = math.inf
        # (k past int's range: llama.cpp's int(k) is the lowest int, and max(that, 1) keeps one token)
        n = min(max(int(k), 1), order.size) if isinstance(k, float) and math.isfinite(k) else 1
    keep = order[:n]
    return keep, softmax(logits[keep])


def dynamic_temperature(logits: np.ndarray, t: float, spread: float, exponent: float, size: int | None = None) -> float:
    """llama.cpp's dynamic temperature: between max(0, t - spread) and t + spread, by the
    candidates' entropy over its largest possible value (`size` equally likely tokens), to
    `exponent`. size: the candidates llama.cpp's array holds, -inf ones that top-n-sigma leaves
    in it included (default: the finite logits)."""
    live = logits[np.isfinite(logits)]
    size = live.size if size is None else size
    if size <= 1 or live.size == 0:
        return t
    probs = softmax(live)
    entropy = float(-np.sum(np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0)))
    low, high = max(0.0, t - spread), t + spread
    return low + (high - low) * (entropy / math.log(size)) ** exponent


def mirostat_update(mu: float, prob: float, tau: float, eta: float) -> float:
    """mu after drawing a token of probability `prob`: moved by eta toward the target surprise tau."""
    return mu - eta * (-math.log2(prob) - tau)


def temperature(logits: np.ndarray, t: float) -> np.ndarray:
    """Logits divided by t > 0. Where t is so small that the largest logit over t leaves float32's
    range (t below about 1e-38), the limit is taken instead: the most likely tokens share all
    the probability, as they would for any t small enough."""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        z = logits / np.float32(t)
    if np.isfinite(z.max()):
        return z
    return np.where(logits == logits.max(), np.float32(0), NEG_INF)


def greedy(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def draw(logits: np.ndarray, rng: np.random.Generator) -> int:
    probs = softmax(logits)
    return int(rng.choice(probs.size, p=probs))


class Sampler:
    """The composed chain with its own random stream (reproducible for a given seed).

    DRY's breakers are tokens of a vocabulary: runtime.generation.loop.generate sets `dry_heads`
    from the model's (a Sampler called directly with DRY on has none unless its caller sets them).

    `constraint` (runtime.text.json_constraint.JsonObjectReply: allows, candidates, take), when
    set, decides which tokens may come: a drawn token it refuses is drawn again from the logits
    of the tokens it allows (llama.cpp's way with a grammar: the chain, then, only if needed,
    the grammar over all logits and the chain again).

    `budget` (runtime.generation.reasoning_budget.ReasoningBudget: forced, took, give_up), when
    set, may force the next tokens (the end of a reasoning section whose budget is spent); a
    forced token draws nothing from the random stream."""

    def __init__(self, params: SamplingParams, constraint=None, budget=None):
        self.params = params
        self._bias = bias_arrays(params.logit_bias)  # once, not at every token
        self.rng = np.random.default_rng(params.seed)
        self.constraint = constraint
        self.budget = budget
        self.mu = 2.0 * params.mirostat_tau  # mirostat's target surprise, as llama.cpp starts it
        self.dry_heads: dict = {}  # DRY's breakers in the vocabulary's tokens (runtime.generation.dry.heads_for)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        b = self.budget
        if b is None:
            return self._sampled(logits, history)
        tok = b.forced()
        if tok is not None and self.constraint is not None and not self.constraint.allows(tok):
            b.give_up()  # the grammar has no room for the closer here: the reply goes on as sampled
            tok = None
        if tok is None:
            tok = self._sampled(logits, history)
        elif self.constraint is not None:
            self.constraint.take(tok)
        b.took(tok)
        return tok

    def _sampled(self, logits: np.ndarray, history: Sequence[int]) -> int:
        z = self._penalized(logits, history)
        tok = self._pick(z)
        c = self.constraint
        if c is None:
            return tok
        if not c.allows(tok):
            allowed = c.candidates()
            # the penalized logits of the allowed tokens; when a penalty took them all to -inf,
            # their raw logits (each pick is then a finite logit, so the loops end)
            tok = self._pick_allowed(np.where(allowed, z, NEG_INF))
            if tok is None:  # (the biased logits: a banned token stays out)
                tok = self._pick_allowed(np.where(allowed, biased(np.asarray(logits, dtype=np.float32), self._bias),
                                                  NEG_INF))
            if tok is None:
                raise StepstreamError("no token of the vocabulary can continue the constrained reply")
        c.take(tok)
        return tok

    def _pick_allowed(self, z: np.ndarray) -> int | None:
        """A token the constraint allows, drawn from z (the allowed tokens' logits, -inf elsewhere),
        or None when none of z's finite ones is (candidates() may be a superset)."""
        while np.isfinite(z).any():
            tok = self._pick(z)
            if self.constraint.allows(tok):
                return tok
            z[tok] = NEG_INF
        return None

    def _penalized(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        p = self.params
        recent = history[-p.repeat_last_n :] if p.repeat_last_n else ()
        z = biased(np.asarray(logits, dtype=np.float32), self._bias)
        if p.mirostat:  # (llama.cpp's mirostat chain has no penalties)
            return z
        z = repetition_penalty(z, recent, p.repeat_penalty, p.frequency_penalty, p.presence_penalty)
        if p.dry_multiplier:
            z = dry(z, history, self.dry_heads, p.dry_multiplier, p.dry_base, p.dry_allowed_length,
                    p.dry_penalty_last_n)
        return z

    def _pick(self, z: np.ndarray) -> int:
        """The chain after the penalty: top-n-sigma, top-k, typical, top-p, min-p, XTC, then
        temperature and a draw, or the argmax (where only typical and XTC can change it)."""
        p = self.params
        if p.mirostat and p.temperature > 0:
            keep, probs = mirostat_candidates(temperature(z, p.temperature), self.mu, p.mirostat)
            i = int(self.rng.choice(keep.size, p=probs))
            self.mu = mirostat_update(self.mu, float(probs[i]), p.mirostat_tau, p.mirostat_eta)
            return int(keep[i])
        dynamic = p.dynatemp_range > 0 and not p.mirostat
        if p.temperature <= 0 and not dynamic and (p.mirostat or (p.typical_p >= 1.0 and p.xtc_probability <= 0)):
            return greedy(z)  # (the other filters always leave the most likely token)
        z = top_k(top_n_sigma(z, p.top_n_sigma), p.top_k)
        # the tokens llama.cpp's array holds: top-n-sigma leaves -inf ones in it, top-k cuts it to k,
        # and the later filters to the tokens they keep (dynamic temperature divides by its size)
        size = min(p.top_k, z.size) if p.top_k > 0 else z.size
        z = typical(z, p.typical_p)
        z = min_p(top_p(z, p.top_p), p.min_p)
        if p.typical_p < 1.0 or p.top_p < 1.0 or p.min_p > 0:
            size = int(np.isfinite(z).sum())
        z, before = xtc(z, p.xtc_probability, p.xtc_threshold, self.rng), z
        if z is not before and not np.array_equal(np.isfinite(z), np.isfinite(before)):
            size -= int(np.isfinite(before).sum() - np.isfinite(z).sum())
        t = (dynamic_temperature(z, p.temperature, p.dynatemp_range, p.dynatemp_exponent, size) if dynamic
             else p.temperature)
        if t <= 0:  # (a dynamic temperature may be above 0 where the set one is 0, as in llama.cpp)
            return greedy(z)
        return draw(temperature(z, t), self.rng)
