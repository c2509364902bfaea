"""llama-server's own completion route, POST /completion (and /completions), in its shapes: the
clients and front ends written against llama-server's native API (text-completion front ends,
editor plugins, scripts) work unchanged.

    {prompt, n_predict=-1, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty,
     repeat_last_n, presence_penalty, frequency_penalty, logit_bias, seed, stop, ignore_eos,
     json_schema, grammar (GBNF), n_probs=0, return_tokens=false, stream=false, cache_prompt, id_slot,
     n_cmpl (or n)=1}
    -> {content, tokens, stop, stop_type ("eos" | "word" | "limit"), stopping_word,
        tokens_predicted, tokens_evaluated, tokens_cached, timings, generation_settings, ...}
       (a list of them, one per choice, with n_cmpl above 1)

A stream sends `data: {content, tokens, stop: false, ...}` events, then one with `stop: true`
and the whole summary, and no `[DONE]` (llama-server's native stream has none). The samplers'
defaults are llama-server's, not OpenAI's. The prompt is always reused where the cache holds
it (`cache_prompt: false` gives the same tokens: the forward pass is batch-invariant). Its
samplers' fields are read as on /v1/completions (runtime.server.llama_fields).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from runtime.generation.request import Step, TokenLogprob
from runtime.server.llama_fields import BANNED
from runtime.server.requests import ApiError, Common, _common, _get, _no_best_of, _range

# llama-server's sampling defaults (its `params` in /props), where OpenAI's routes default to off
DEFAULTS = {"n_predict": -1, "temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
MAX_N_PROBS = 100
MAX_STOPS = 64  # llama-server sets no limit; OpenAI's routes take 4


@dataclass(frozen=True)
class NativeBody:
    prompt: str | list[int]
    common: Common
    n_probs: int
    return_tokens: bool


def native_body(body: dict) -> NativeBody:
    prompt = _get(body, "prompt", (str, list), required=True)
    if isinstance(prompt, list) and not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise ApiError(400, "'prompt' must be a string or a list of token ids (mixed lists and several prompts "
                            "are not supported here; /v1/completions takes several)", param="prompt",
                       code="unsupported")
    if isinstance(prompt, list) and not prompt:
        raise ApiError(400, "'prompt' must hold at least one token", param="prompt", code="invalid_value")
    n_probs = _get(body, "n_probs", (int,), 0)
    _range("n_probs", n_probs, 0, MAX_N_PROBS)
    for name in ("post_sampling_probs", "response_fields"):  # refused, not ignored: the answer's shape would differ
        if body.get(name):
            raise ApiError(400, f"'{name}' is not supported on this route", param=name, code="unsupported")
    slot = _get(body, "id_slot", (int,), -1)
    if slot not in (-1, 0):
        raise ApiError(400, f"'id_slot' {slot}: this server has one slot, 0 (or -1: any)", param="id_slot",
                       code="invalid_value")
    _get(body, "cache_prompt", (bool,))  # (checked: always true here, and the tokens are the same either way)
    fields = {**DEFAULTS, **{k: v for k, v in body.items() if v is not None}}
    if "n_predict" in body:  # llama-server reads n_predict first, then max_completion_tokens, then max_tokens
        fields.pop("max_completion_tokens", None)
        fields.pop("max_tokens", None)
    elif "max_completion_tokens" in body or "max_tokens" in body:
        del fields["n_predict"]
    t = fields.get("temperature")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and t < 0:
        fields["temperature"] = 0  # llama-server's: a temperature below 0 is greedy
    _no_best_of(body)
    common = _common(fields, None, max_stops=MAX_STOPS)  # (json_schema included)
    return NativeBody(prompt, common, n_probs, _get(body, "return_tokens", (bool,), False))


def _probability(lp: TokenLogprob) -> dict:
    """One generated token's entry of llama-server's `completion_probabilities`."""
    def entry(tok: int, raw: bytes, logprob: float) -> dict:
        return {"id": tok, "token": raw.decode("utf-8", "replace"), "bytes": list(raw), "logprob": logprob}

    return {**entry(lp.token, lp.text, lp.logprob), "top_logprobs": [entry(t, b, p) for t, b, p in lp.top]}


class NativeReply:
    """The events and the whole answer of one /completion request."""

    def __init__(self, model_name: str, prompt_text: str, ids: list[int], body: NativeBody, params=None,
                 index: int = 0):
        """params: the request's sampling (its logit_bias with the texts' tokens), else the body's;
        index: the choice's, of the request's n_cmpl."""
        self.model_name, self.prompt_text, self.ids, self.body = model_name, prompt_text, ids, body
        self.index = index
        self.params = params if params is not None else body.common.params
        self.content: list[str] = []
        self.tokens: list[int] = []
        self.probs: list[dict] = []
        self.n = 0
        self.last: Step | None = None

    def take(self, step: Step) -> dict | None:
        """Collect a step; returns its stream event (stop false), or None when it holds nothing."""
        self.content.append(step.text)
        self.n += step.tokens
        self.last = step
        ids = [lp.token for lp in step.logprobs][: step.tokens]  # (an end-of-generation token is not the reply's)
        self.tokens += ids
        if not step.text and not ids:  # (the tail after the last token: nothing to send)
            return None
        # a stream's events carry their token ids always, as llama-server's do; the whole answer's
        # `tokens` only with return_tokens
        event = {"index": self.index, "content": step.text, "tokens": ids, "stop": False,
                 "id_slot": 0, "tokens_predicted": self.n, "tokens_evaluated": len(self.ids)}
        if self.body.n_probs:
            probs = [_probability(lp) for lp in step.logprobs]
            self.probs += probs
            event["completion_probabilities"] = probs
        return event

    def whole(self, timings, streamed: bool = False) -> dict:
        """The summary: the last stream event (content already sent) or the whole answer."""
        last = self.last
        eog = timings.eog_n > 0
        kind = "eos" if eog else "word" if last is not None and last.stop_sequence else \
            "limit" if last is not None and last.finish_reason == "length" else "none"
        text = "".join(self.content)
        p = self.params
        out = {"index": self.index, "content": "" if streamed else text,
               "tokens": [] if streamed or not self.body.return_tokens else self.tokens,
               "id_slot": 0, "stop": True, "model": self.model_name,
               "tokens_predicted": self.n + eog, "tokens_evaluated": len(self.ids),
               "generation_settings": {
                   "n_predict": -1 if self.body.common.max_tokens is None else self.body.common.max_tokens,
                   "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p, "min_p": p.min_p,
                   "repeat_penalty": p.repeat_penalty, "repeat_last_n": p.repeat_last_n,
                   "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty,
                   "typical_p": p.typical_p, "xtc_probability": p.xtc_probability, "xtc_threshold": p.xtc_threshold,
                   "top_n_sigma": p.top_n_sigma, "mirostat": p.mirostat, "mirostat_tau": p.mirostat_tau,
                   "mirostat_eta": p.mirostat_eta, "dynatemp_range": p.dynatemp_range,
                   "dynatemp_exponent": p.dynatemp_exponent, "dry_multiplier": p.dry_multiplier,
                   "dry_base": p.dry_base, "dry_allowed_length": p.dry_allowed_length,
                   "dry_penalty_last_n": p.dry_penalty_last_n, "dry_sequence_breakers": list(p.dry_sequence_breakers),
                   "seed": -1 if p.seed is None else p.seed, "stop": list(self.body.common.stop),
                   "n_probs": self.body.n_probs, "ignore_eos": self.body.common.ignore_eos, "stream": streamed,
                   "grammar": getattr(self.body.common.grammar, "text", ""),  # (GBNF only, as llama-server)
                   # (a ban as llama-server shows its -inf: null)
                   "logit_bias": [{"bias": None if b <= BANNED else b, "token": t} for t, b in p.logit_bias]},
               "prompt": self.prompt_text, "has_new_line": "\n" in text, "truncated": False,
               "stop_type": kind, "stopping_word": (last.stop_sequence or "") if last is not None else "",
               "tokens_cached": len(self.ids) + max(0, self.n + eog - 1), "timings": timings.as_dict()}
        if self.body.n_probs and not streamed:
            out["completion_probabilities"] = self.probs
        return out


def add_native_completion(app, *, model, model_name: str, body_of, prompt_ids, model_request, submit, whole,
                          sse, data) -> None:
    """The route, with the app's own helpers (runtime.server.app): the key and body checks, the
    prompt's ids, the model request, the queue, the stream."""
    async def completion(request: Request):
        b = await body_of(request, native_body)
        ids = await prompt_ids(b.prompt, "prompt")
        # the token ids come with their log-probabilities: a stream's events carry them always
        want = b.n_probs if b.n_probs else 0 if b.return_tokens or b.common.stream else None
        reqs = [model_request(ids, b.common, want, "prompt", choice=j) for j in range(b.common.n)]
        text = b.prompt if isinstance(b.prompt, str) else model.detokenize(ids).decode("utf-8", "replace")
        replies = [NativeReply(model_name, text, ids, b, q.params, index=j) for j, q in enumerate(reqs)]
        if b.common.stream:  # n_cmpl's choices one after the other, each ending with its summary
            def events(reply):
                def event(step) -> str:
                    e = reply.take(step)
                    return data(e) if e is not None else ""
                return event

            return sse(submit(reqs, True), request, [events(r) for r in replies], lambda: "",
                       lambda e: data(e.body()),
                       job_end=[lambda r=r, q=q: data(r.whole(q.timings, streamed=True)) for r, q in zip(replies, reqs)])
        await whole(submit(reqs, False), request, [r.take for r in replies])
        answers = [r.whole(q.timings) for r, q in zip(replies, reqs)]
        return answers[0] if len(answers) == 1 else answers  # (llama-server's: a list of several)

    for path in ("/completion", "/completions"):  # llama-server answers both
        app.post(path)(completion)
