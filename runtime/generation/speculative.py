"""Speculative decoding with the model's MTP heads: draft k tokens, verify them in one pass.

    step:  d1..dk = model.mtp_draft(x, k)                  (greedy drafts, runtime.model.mtp)
           logits = model.eval([x, d1..dk], all_logits)   (one trunk pass, k+1 positions)
           y_i    = sampler(logits[i], history + [x, d1..d_i])   for i = 0.. until y_i != d_{i+1}
           emit d1..da, y_a;  model.trim(k - a)

Acceptance. The standard rule (`accept_or_resample`) accepts a draft d with probability
min(1, p(d)/q(d)), else samples from norm(max(0, p - q)); the result is distributed as p.
Our drafts are greedy, so q is one-hot at d and the rule becomes: accept with probability
p(d), else sample from p without d. Drawing y ~ p with the sampler's own random stream and
accepting d exactly when y == d realizes that law (P(y = d) = p(d); given y != d, y follows p
without d, renormalized), and it consumes one draw per emitted token, in order, as plain
decoding does. So with the same seed the output is token-for-token the plain one, greedy
(where the draw is an argmax) or sampled, whatever draft lengths were chosen; the trunk's
batch invariance (a position's logits are bit-identical in any chunk) makes the logits the
same too.

The draft length (`DraftLength`) is chosen each step to maximize expected tokens per second:
    E(k) = 1 + a1 + a1 a2 + ... + a1..ak     (a_j: measured acceptance of head j, given j-1 accepted)
    C(k) = t_verify(k + 1) + t_head(0) + ... + t_head(k - 1)
each time the median of the last WINDOW measurements of that length: a step the scheduler
preempted (on a shared machine, one in a few dozen takes ten times as long) is an outlier a
running mean would carry for many steps, enough to make a plain step look dearer than a
draft and verify. A verify length not measured yet is
assumed to cost what the shorter ones do (optimism that makes auto try it once), and only a
length one above the longest measured is tried.
When drafting does not pay (random weights: acceptance near 1/V), k = 0 wins and decoding is
the plain one-token step; after PROBE_EVERY such steps one draft probes whether that changed,
and each probe doubles the wait before the next (a useless probe costs ever less).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np

from runtime.base.errors import StepstreamError

PROBE_EVERY = 256  # steps at k = 0 before the first one-draft probe
DECAY = 0.97  # how much of the acceptance counts each new observation keeps (forgets old text)
WINDOW = 9  # the time of a step of a given length: the median of its last WINDOW measurements
RECHECK = 16  # steps a decision not to draft stands before it is recomputed


def _median(xs) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


def accept_or_resample(p: np.ndarray, q: np.ndarray, draft: int, rng: np.random.Generator) -> tuple[bool, int]:
    """The speculative-sampling rule for one drafted token: (accepted, token). p: the target's
    probabilities [V], q: the distribution the draft was drawn from [V]. The token is `draft`
    when accepted, else a draw from norm(max(0, p - q)); either way it is distributed as p."""
    if not 0 <= draft < p.size or q[draft] <= 0:
        raise StepstreamError(f"draft {draft} has probability 0 under the draft distribution q")
    if rng.random() < min(1.0, p[draft] / q[draft]):
        return True, draft
    r = np.maximum(p - q, 0.0)
    return False, int(rng.choice(r.size, p=r / r.sum()))


def verify(sampler, logits: np.ndarray, drafts: Sequence[int], history: Sequence[int]) -> list[int]:
    """The tokens one verify pass emits: the accepted drafts, then the first sample that differs
    from its draft (or the sample after the last draft). logits [k+1, V]: row i follows
    history + drafts[:i] (history ends with the token the pass started from)."""
    history = list(history)
    out: list[int] = []
    for i in range(len(drafts) + 1):
        y = sampler(logits[i], history)
        out.append(y)
        if i == len(drafts) or y != drafts[i]:
            return out
        history.append(y)
    return out


class DraftLength:
    """Chooses how many tokens to draft each step from measured acceptance and step times."""

    def __init__(self, n_heads: int, fixed: int | None = None, step_seconds: dict[int, float] | None = None):
        self.n_heads = n_heads
        self.fixed = fixed  # a forced draft length, or None for auto
        self.hits = [1.0] * n_heads  # acceptance counts per head, with a prior of 1 in 2
        self.trials = [2.0] * n_heads
        self.tried = [0] * n_heads  # drafts each head made (0: its acceptance is still the prior)
        self.accepted = [0] * n_heads  # of those, how many verification accepted
        # verify length -> its last measurements (seconds), seeded with the model's (warm_up's)
        self._verify: dict[int, deque] = {n: deque([t], WINDOW) for n, t in (step_seconds or {}).items()}
        self._head = [deque(maxlen=WINDOW) for _ in range(n_heads)]  # seconds a head takes to draft
        self.t_verify: dict[int, float] = dict(step_seconds or {})  # verify length -> median seconds
        self.t_head = [0.0] * n_heads  # median seconds a head takes to draft (0: not measured yet)
        self.steps = 0
        self.idle = 0  # steps since the last draft
        self.probe_every = PROBE_EVERY  # steps at k = 0 before a one-draft probe (doubles each time)
        self.chosen: list[int] = []  # k of every step, for reports

    def acceptance(self) -> list[float]:
        return [h / t for h, t in zip(self.hits, self.trials)]

    def expected_tokens(self, k: int) -> float:
        e, run = 1.0, 1.0
        for a in self.acceptance()[:k]:
            run *= a
            e += run
        return e

    def cost(self, k: int) -> float:
        """C(k). A pass over more tokens does the work of one over fewer and more, so a verify
        length costs at least every shorter one measured: with the same kernels, a cheaper
        figure is noise (a preempted plain step), and with drafts never accepted it would
        still make drafting look worth it."""
        known = [self.t_verify[n] for n in self.t_verify if n <= k + 1]
        return (max(known) if known else 0.0) + sum(self.t_head[:k])

    def choose(self, room: int) -> int:
        """k for the next step; room: the most drafts that could still be used."""
        if self.fixed is not None:
            k = self.fixed
        elif self.chosen and self.chosen[-1] == 0 and self.idle % RECHECK:
            k = 0  # a decision not to draft stands for RECHECK steps: its arithmetic costs 10 us a step
        else:
            k = self._best()
        if self.fixed is None and k == 0:
            self.idle += 1
            if self.idle >= self.probe_every:  # try one draft; wait twice as long before the next
                k, self.probe_every = 1, 2 * self.probe_every
        k = max(0, min(k, self.n_heads, room))
        if k:
            self.idle = 0
        self.chosen.append(k)
        return k

    def _best(self) -> int:
        """The k with the most expected tokens per second. A length is tried only once the one
        below it was measured: exploring costs one step of the next length, never more."""
        if 1 not in self.t_verify:
            return 0  # the first step measures a plain decode step
        top = min(self.n_heads, max(self.t_verify))
        rates = [self.expected_tokens(k) / max(self.cost(k), 1e-9) for k in range(top + 1)]
        return int(np.argmax(rates))

    def observe(self, n_drafts: int, accepted: int, t_head: float | None, t_verify: float) -> None:
        """One step: drafts made and accepted, seconds per head's draft (None: no drafts),
        seconds of the trunk pass."""
        self.steps += 1
        n = n_drafts + 1
        times = self._verify.setdefault(n, deque(maxlen=WINDOW))
        times.append(t_verify)
        self.t_verify[n] = _median(times)
        for j in range(n_drafts if t_head is not None else 0):
            self._head[j].append(t_head)
            self.t_head[j] = _median(self._head[j])
        for j in range(min(accepted + 1, n_drafts)):  # head j was tried when heads 0..j-1 were accepted
            self.hits[j] = DECAY * self.hits[j] + (1.0 if j < accepted else 0.0)
            self.trials[j] = DECAY * self.trials[j] + 1.0
            self.tried[j] += 1
            self.accepted[j] += j < accepted

    def report(self) -> dict:
        ks = self.chosen[-16:]
        if self.fixed is not None:  # forced: the steps near the end of the context or of -n draft fewer
            settled = min(self.fixed, self.n_heads)
        else:
            settled = int(np.bincount(ks).argmax()) if ks else 0
        # "acceptance": what was measured, accepted / drafted per head; "acceptance_estimate": the
        # chooser's decayed figure with its prior, which decides k. None: a head that never drafted.
        return {"acceptance": [round(a / n, 4) if n else None for a, n in zip(self.accepted, self.tried)],
                "acceptance_estimate": [round(a, 4) if n else None for a, n in zip(self.acceptance(), self.tried)],
                "drafts_per_head": list(self.tried), "settled_k": settled}


def owned(model):
    """The model's lock (a no-op context for a model without one), held from a generation's
    check that the cache is still its own through its next evaluation and sampling, and never
    across a yield: another thread's evaluation then comes before or after a whole step, and a
    generation it overtook is refused as stale instead of going on from the other's tokens."""
    return getattr(model, "lock", None) or contextlib.nullcontext()


def still_current(model, mine) -> None:
    """Refuse to go on with a generation after the model's cache changed under it (another
    generate, eval, trim or reset since its last step): its next token would continue someone
    else's text. `mine`: model.version after the generation's own last change."""
    if getattr(model, "version", mine) != mine:
        raise StepstreamError("this generation is stale: the model evaluated other tokens since its last step "
                              "(another generate, eval, trim or reset); start a new generation")


def generate(model, prompt: Sequence[int], sampler, max_tokens: int | None, eog: frozenset,
             chooser: DraftLength, stats: dict | None = None, cancelled=None) -> Iterator[int]:
    """Yield sampled tokens after `prompt`, drafting with the model's MTP heads. The model is
    left as plain decoding leaves it: holding the prompt and every emitted token but the last.
    `stats`, when given, receives the trunk passes and tokens per pass (all, and those with
    drafts), the tokens drafted, and the chooser's report (acceptance per head, the k it settled
    on); and, once the prompt is evaluated, the positions it reused ("cached") and when it was
    done ("prompt_done", a perf_counter time). `cancelled()`: as loop.generate's."""
    prompt = list(prompt)
    with owned(model):
        logits, cached = model.eval_prompt(prompt, mtp=True, cancelled=cancelled)
        if logits is None:  # cancelled during the prompt
            return
        if stats is not None:
            stats.update(cached=cached, prompt_done=time.perf_counter())
        mine = getattr(model, "version", None)  # after this generation's own last change to the cache
        tok = sampler(logits, model.history)
    params = getattr(sampler, "params", None)  # a Sampler reads only its last repeat_last_n tokens
    recent = params.repeat_last_n if params is not None else model.n_ctx
    if params is not None and params.dry_multiplier:  # and DRY its last dry_penalty_last_n (-1: all)
        recent = model.n_ctx if params.dry_penalty_last_n < 0 else max(recent, params.dry_penalty_last_n)
    n, passes, emitted, drafting, by_drafting, drafted = 0, 0, 0, 0, 0, 0
    try:
        while True:
            n += 1
            yield tok
            if tok in eog or model.n_past + 1 > model.n_ctx or n == max_tokens:
                return
            with owned(model):  # from the check that the cache is still ours to the next token's sampling
                room = min(model.n_ctx - model.n_past - 1, model.options.rollback,
                           (max_tokens - n - 1) if max_tokens is not None else model.n_ctx)
                still_current(model, mine)
                k = chooser.choose(room)
                if k == 0:  # a plain step, as lean as plain decoding's
                    t1 = time.perf_counter()
                    logits = model.eval([tok])
                    mine = getattr(model, "version", None)
                    chooser.observe(0, 0, None, time.perf_counter() - t1)
                    passes, emitted = passes + 1, emitted + 1
                    tok = sampler(logits, model.history)
                    continue
                drafts = model.mtp_draft(tok, k)
                drafted += len(drafts)
                t1 = time.perf_counter()
                base = model.n_past
                logits = model.eval([tok] + drafts, all_logits=True)  # [k+1, V]
                t2 = time.perf_counter()
                mine = getattr(model, "version", None)
                out = verify(sampler, logits, drafts, model.history[max(0, base + 1 - recent) : base + 1])
                chooser.observe(len(drafts), len(out) - 1,
                                model.mtp_draft_seconds / len(drafts) if drafts else None, t2 - t1)
                passes, emitted = passes + 1, emitted + len(out)
                drafting, by_drafting = drafting + 1, by_drafting + len(out)
                if len(out) - 1 < len(drafts):
                    model.trim(len(drafts) - (len(out) - 1))  # the rejected drafts
                    mine = getattr(model, "version", None)
            for y in out[:-1]:  # the accepted drafts, each emitted as its own step would be
                with owned(model):
                    still_current(model, mine)  # a consumer may have run another generation since the last one
                n += 1
                yield y
                if y in eog or n == max_tokens:
                    return
            tok = out[-1]
            with owned(model):
                still_current(model, mine)
    finally:
        # Accepted drafts after a stop; only while the cache is still this generation's: a
        # generator closed late (dropped, collected) must not trim another generation's tokens.
        with owned(model):
            surplus = model.n_past - (len(prompt) + n - 1)
            if surplus > 0 and getattr(model, "version", None) == mine:
                model.trim(surplus)
        if hasattr(model, "step_seconds"):  # the next generation starts from what this one measured
            model.step_seconds.update(chooser.t_verify)
        if stats is not None:
            stats.update(passes=passes, tokens_per_pass=emitted / passes if passes else 0.0, draft_passes=drafting,
                         drafted=drafted,
                         tokens_per_draft_pass=by_drafting / drafting if drafting else 0.0, **chooser.report())
