"""One request's generation on the model: the prompt evaluated reusing the cache, then tokens
until a stop, as text pieces that carry their tokens' log-probabilities.

    steps = run(model, request)     # yields Step ... the last one has finish_reason

The tokens come from runtime.generation's loop, which drafts with the MTP heads when the
model was loaded with `mtp` (serve --mtp) or the request says so: the same tokens and logits
either way, and a prompt that fills the context still gets its one token (it is sampled, never
evaluated). The server's engine runs one request at a time on its worker thread; the Python
API (`create_completion(logprobs=...)`) runs it under the model's lock. `cancelled()` is checked
before each of the prompt's batches (n_batch positions) and after every token: a client that
goes away stops its request within one batch of its prompt or one token of its reply.

Log-probabilities are those of the model's distribution (log-softmax of the raw logits), as
OpenAI and llama-server report them, not of the filtered sampling distribution.
"""

from __future__ import annotations

import codecs
import collections
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from runtime.generation.loop import StopStrings, generate
from runtime.generation.reasoning_budget import ReasoningBudget, closer_tokens
from runtime.generation.sampling import Sampler, SamplingParams
from runtime.text.json_constraint import JsonObjectReply, vocabulary
from runtime.text.tool_calls import ReplyStream


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
    tokens: int = 0  # tokens of the reply sampled since the previous step (an end-of-generation one not)
    stop_sequence: str | None = None  # on the last step: the stop string that ended the reply, if one did


def merge(steps: list[Step]) -> Step:
    """Consecutive steps as one: their text, log-probabilities and tokens, the last one's finish."""
    if len(steps) == 1:
        return steps[0]
    return Step("".join(s.text for s in steps), tuple(lp for s in steps for lp in s.logprobs),
                steps[-1].finish_reason, sum(s.tokens for s in steps), steps[-1].stop_sequence)


@dataclass
class Timings:
    """What one request measured, in the spirit of llama-server's `timings`."""

    prompt_n: int = 0  # prompt tokens evaluated (not reused from the cache)
    cached_n: int = 0  # prompt tokens reused from the previous request's cache
    prompt_ms: float = 0.0
    predicted_n: int = 0  # tokens sampled, an end-of-generation one included (llama-server's count)
    eog_n: int = 0  # 1 when an end-of-generation token ended the reply
    predicted_ms: float = 0.0
    first_token_ms: float = 0.0  # from the start of the prompt's evaluation to the first token
    draft_n: int = 0  # tokens the MTP heads drafted (--mtp)
    draft_n_accepted: int = 0  # of those, the ones the verifying pass accepted
    # the log-probability of the end-of-generation token that ended the reply, when the request
    # asked for log-probabilities (best_of weighs a reply by all its tokens')
    eog_logprob: float | None = None

    def as_dict(self) -> dict:
        per_s = self.predicted_n / (self.predicted_ms / 1000) if self.predicted_ms > 0 else None
        prompt_per_s = self.prompt_n / (self.prompt_ms / 1000) if self.prompt_ms > 0 else None
        out = {"prompt_n": self.prompt_n, "cache_n": self.cached_n, "prompt_ms": round(self.prompt_ms, 3),
               "prompt_per_token_ms": round(self.prompt_ms / self.prompt_n, 3) if self.prompt_n else None,
               "prompt_per_second": prompt_per_s,
               "predicted_n": self.predicted_n, "predicted_ms": round(self.predicted_ms, 3),
               "predicted_per_token_ms": round(self.predicted_ms / self.predicted_n, 3) if self.predicted_n else None,
               "predicted_per_second": per_s, "first_token_ms": round(self.first_token_ms, 3)}
        if self.draft_n:  # as llama-server, only when a request drafted
            out.update(draft_n=self.draft_n, draft_n_accepted=self.draft_n_accepted)
        return out


@dataclass
class Request:
    """What the model needs to know about a request (validated by runtime.server.requests)."""

    prompt: list[int]
    params: SamplingParams
    max_tokens: int  # already capped by the context
    stop: Sequence[str] = ()
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's and k alternatives'
    ignore_eos: bool = False  # an end-of-text token does not end the reply (it adds no text), as in vLLM
    json_object: bool = False  # response_format json_object: the reply is one JSON object
    grammar: object = None  # response_format json_schema: its compiled schema (runtime.text.json_schema)
    in_reasoning: bool = False  # the prompt opened <think>: with json_object, the JSON follows </think>
    mtp: int | str | None = None  # the draft length (None: the model's load option)
    reasoning_budget: int | None = None  # reasoning tokens before </think> is forced (None: no limit)
    reasoning_message: str = ""  # written before the forced </think> (llama.cpp's --reasoning-budget-message)
    # how the reply is parsed, whose reading of reasoning the budget follows: the tools a call may
    # name (None: the reply makes no calls), the forced start of the reply (a call's opening), the
    # calls it may make
    tools: list | None = None
    forced: str = ""
    max_calls: int | None = None
    cancelled: Callable[[], bool] = lambda: False
    # Fed the reply's text, piece by piece as it is shown; True ends the reply after that piece
    # (finish "stop"): a chat reply that holds all the tool calls it may hold ends there.
    ends: Callable[[str], bool] | None = None
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


class _Recording(Sampler):
    """The request's sampler, keeping each sampled token's log-probabilities from the logits it
    was drawn from. Plain and drafting decoding both call it once per token they emit, in order
    (drafting also for the tokens a stop discards), so `taken` pops them in step."""

    def __init__(self, params: SamplingParams, model, k: int | None):
        super().__init__(params)
        self.model, self.k = model, k
        self.drawn: collections.deque[TokenLogprob] = collections.deque()

    def __call__(self, logits, history=()):
        tok = super().__call__(logits, history)
        if self.k is not None:
            self.drawn.append(_logprob(self.model, logits, tok, self.k))
        return tok

    def taken(self, tok: int) -> TokenLogprob | None:
        if self.k is None:
            return None
        lp = self.drawn.popleft()
        assert lp.token == tok, (lp.token, tok)
        return lp


def run(model, req: Request) -> Iterator[Step]:
    """Steps of the continuation of req.prompt; nothing at all when cancelled before the prompt.
    The model's `mtp` load option decides whether its MTP heads draft (the tokens are the same)."""
    t = req.timings
    if req.cancelled():
        return
    t0 = time.perf_counter()
    sampler = _Recording(req.params, model, req.logprobs)
    if req.json_object or req.grammar is not None:
        sampler.constraint = JsonObjectReply(vocabulary(model.tokenizer), req.in_reasoning, req.grammar)
    if req.reasoning_budget is not None:
        reader = ReplyStream(in_reasoning=req.in_reasoning, tools=req.tools, calls=req.tools is not None,
                             max_calls=req.max_calls)
        reader.push(req.forced)
        sampler.budget = ReasoningBudget(req.reasoning_budget, closer_tokens(model.tokenize, req.reasoning_message),
                                         model.tokenizer.token_bytes, reader)
    stats: dict = {}  # the prompt's reuse and timing, then the drafting's counts (loop.generate)
    tokens = generate(model, req.prompt, sampler, req.max_tokens, stop_at_eog=not req.ignore_eos, stats=stats,
                      mtp=req.mtp, cancelled=req.cancelled)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stops = StopStrings(req.stop)
    eog = model.tokenizer.eog_ids
    pending: list[TokenLogprob] = []
    n = 0  # tokens since the last step
    finish = "length"
    try:
        for tok in tokens:
            t.predicted_n += 1
            if t.predicted_n == 1:
                t.cached_n, t.prompt_n = stats["cached"], len(req.prompt) - stats["cached"]
                t.prompt_ms = (stats["prompt_done"] - t0) * 1000
                t.first_token_ms = (time.perf_counter() - t0) * 1000
            lp = sampler.taken(tok)
            if tok in eog and not req.ignore_eos:  # not part of the reply: no text, no log-probability
                finish, t.eog_n = "stop", 1
                t.eog_logprob = None if lp is None else lp.logprob
                break
            if tok not in eog:  # with ignore_eos, an end-of-text token is passed over
                n += 1
                if lp is not None:
                    pending.append(lp)
                text, hit = stops.push(utf8.decode(model.tokenizer.decode_bytes([tok])))
                if hit or (text and req.ends is not None and req.ends(text)):
                    yield Step(text, tuple(pending), "stop", n, stops.hit)
                    return
                if text or pending:
                    yield Step(text, tuple(pending), tokens=n)
                    pending, n = [], 0
            if req.cancelled():
                break
    finally:
        tokens.close()  # drafting trims the drafts it accepted past the stop
        if t.predicted_n == 0 and "cached" in stats:  # no token (max_tokens 0): the prompt's figures still
            t.cached_n, t.prompt_n = stats["cached"], len(req.prompt) - stats["cached"]
            t.prompt_ms = (stats["prompt_done"] - t0) * 1000
        t.predicted_ms = (time.perf_counter() - stats["prompt_done"]) * 1000 if "prompt_done" in stats else 0.0
        # a pass that drafted emits its accepted drafts and one token of its own
        t.draft_n = stats.get("drafted", 0)
        t.draft_n_accepted = round(stats.get("tokens_per_draft_pass", 0) * stats.get("draft_passes", 0)) \
            - stats.get("draft_passes", 0)
    tail = stops.push(utf8.decode(b"", final=True))[0] + stops.flush()
    yield Step(tail, tuple(pending), finish, n)


def token_text(b: bytes) -> str:
    """A token's bytes as text (part of a UTF-8 character prints as U+FFFD)."""
    return b.decode("utf-8", errors="replace")


def _top_logprobs(lp: TokenLogprob) -> dict:
    """A legacy completion's top_logprobs entry: the alternatives by their text, and always the
    sampled token (OpenAI: "the logprob of the sampled token, so there may be up to logprobs+1
    elements"; llama-cpp-python adds it too). Tokens holding part of a UTF-8 character print
    alike; of those the likelier one is kept, and the sampled token's own logprob always."""
    top: dict[str, float] = {}
    for _, t, p in lp.top:  # most likely first
        top.setdefault(token_text(t), p)
    top[token_text(lp.text)] = lp.logprob
    return top


def tokens_chars(lps: Sequence[TokenLogprob]) -> int:
    """The characters of these tokens' text as `legacy_logprobs` counts them: where the next
    token's text_offset is. A stream's text lags its tokens (a tail that may start a stop string
    is held back), so a stream's offsets advance by this, not by the text sent (a review: 13 of
    48 streams gave other offsets than the same completion whole)."""
    return sum(len(token_text(lp.text)) for lp in lps)


def legacy_logprobs(lps: Sequence[TokenLogprob], offset: int) -> dict:
    """The `logprobs` of a legacy (text) completion choice, OpenAI's and llama-cpp-python's shape:
    tokens, token_logprobs, top_logprobs and text_offset (offsets into prompt + reply; `offset`
    is where these tokens' text starts)."""
    tokens, offsets = [], []
    for lp in lps:
        offsets.append(offset)
        tokens.append(token_text(lp.text))
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [_top_logprobs(lp) for lp in lps], "text_offset": offsets}
