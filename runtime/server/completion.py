"""One request's generation on the model: the prompt evaluated reusing the cache, then tokens
until a stop, as text pieces that carry their tokens' log-probabilities.

    steps = Completion(model, job).run()     # yields Step ... the last one has finish_reason

The model is used by one request at a time (the engine's worker thread), so nothing here
locks. `cancelled()` is checked before the prompt and after every token: a client that goes
away stops its generation within one token.

Log-probabilities are those of the model's distribution (log-softmax of the raw logits), as
OpenAI and llama-server report them, not of the filtered sampling distribution.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from runtime.generation.loop import StopStrings
from runtime.generation.sampling import Sampler, SamplingParams


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    text: bytes  # the token's bytes (a token may hold part of a UTF-8 character)
    logprob: float
    top: tuple[tuple[int, bytes, float], ...]  # the most likely alternatives, most likely first


@dataclass(frozen=True)
class Step:
    text: str  # text safe to show now (stop strings never shown)
    logprobs: tuple[TokenLogprob, ...] = ()  # tokens generated since the previous step
    finish_reason: str | None = None  # on the last step: "stop" or "length"


def merge(steps: list[Step]) -> Step:
    """Consecutive steps as one: their text and log-probabilities, the last one's finish."""
    if len(steps) == 1:
        return steps[0]
    return Step("".join(s.text for s in steps), tuple(lp for s in steps for lp in s.logprobs),
                steps[-1].finish_reason)


@dataclass
class Timings:
    """What one request measured, in the spirit of llama-server's `timings`."""

    prompt_n: int = 0  # prompt tokens evaluated (not reused from the cache)
    cached_n: int = 0  # prompt tokens reused from the previous request's cache
    prompt_ms: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0
    first_token_ms: float = 0.0  # from the start of the prompt's evaluation to the first token

    def as_dict(self) -> dict:
        per_s = self.predicted_n / (self.predicted_ms / 1000) if self.predicted_ms > 0 else None
        return {"prompt_n": self.prompt_n, "cache_n": self.cached_n, "prompt_ms": round(self.prompt_ms, 3),
                "predicted_n": self.predicted_n, "predicted_ms": round(self.predicted_ms, 3),
                "predicted_per_second": per_s, "first_token_ms": round(self.first_token_ms, 3)}


@dataclass
class Request:
    """What the model needs to know about a request (validated by runtime.server.requests)."""

    prompt: list[int]
    params: SamplingParams
    max_tokens: int  # already capped by the context
    stop: Sequence[str] = ()
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's and k alternatives'
    cancelled: Callable[[], bool] = lambda: False
    timings: Timings = field(default_factory=Timings)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def _logprob(model, logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    lp = log_softmax(logits)
    top = np.argsort(-lp, kind="stable")[:k] if k else np.zeros(0, np.int64)
    text = model.tokenizer.decode_bytes([token], special=True)
    return TokenLogprob(token, text, float(lp[token]),
                        tuple((int(t), model.tokenizer.decode_bytes([int(t)], special=True), float(lp[t])) for t in top))


def run(model, req: Request) -> Iterator[Step]:
    """Steps of the continuation of req.prompt; nothing at all when cancelled before the prompt."""
    t = req.timings
    if req.cancelled():
        return
    t0 = time.perf_counter()
    logits, t.cached_n = model.eval_prompt(req.prompt)
    t.prompt_n = len(req.prompt) - t.cached_n
    t.prompt_ms = (time.perf_counter() - t0) * 1000
    t1 = time.perf_counter()
    sampler = Sampler(req.params)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stops = StopStrings(req.stop)
    eog = model.tokenizer.eog_ids
    pending: list[TokenLogprob] = []
    finish = "length"
    while t.predicted_n < req.max_tokens:
        tok = sampler(logits, model.history)
        t.predicted_n += 1
        if t.predicted_n == 1:
            t.first_token_ms = (time.perf_counter() - t0) * 1000
        if tok in eog:  # not part of the reply: no text, no log-probability
            finish = "stop"
            break
        if req.logprobs is not None:
            pending.append(_logprob(model, logits, tok, req.logprobs))
        text, hit = stops.push(utf8.decode(model.tokenizer.decode_bytes([tok])))
        if hit:
            finish = "stop"
            yield Step(text, tuple(pending), "stop")
            t.predicted_ms = (time.perf_counter() - t1) * 1000
            return
        if text or pending:
            yield Step(text, tuple(pending))
            pending = []
        if req.cancelled() or t.predicted_n == req.max_tokens or model.n_past + 1 > model.n_ctx:
            break  # the last token is not evaluated: nothing would read its logits
        logits = model.eval([tok])
    t.predicted_ms = (time.perf_counter() - t1) * 1000
    tail = stops.push(utf8.decode(b"", final=True))[0] + stops.flush()
    yield Step(tail, tuple(pending), finish)
