"""The token loop on a loaded model, and stop handling.

    tokens  -> generate()           yields sampled token ids
    prompt  -> complete()           yields text pieces, then the finish reason

`model` is anything with the runtime Model's `eval_reusing_prefix`, `eval`, `history`,
`n_past`, `n_ctx` and `tokenizer` (and, to draft with MTP heads, `n_mtp`, `eval_prompt`,
`mtp_draft`, `trim` and `options`): this layer sits below the model and never imports it.

A stop condition is one of: an end-of-generation token, `max_tokens`, a stop string
(never emitted; text that might begin one is held back until it cannot), or the context
filling up.
"""

from __future__ import annotations

import codecs
import math
import numbers
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from runtime.base.errors import StepstreamError, UnknownOption
from runtime.generation import speculative
from runtime.generation.sampling import Sampler, SamplingParams


def draft_length(model, mtp=None) -> speculative.DraftLength | None:
    """The draft-length chooser for `mtp` ("auto", 0..3; None: the model's option), or None for
    plain decoding (0, or a file without MTP heads)."""
    if mtp is None:
        mtp = getattr(getattr(model, "options", None), "mtp", 0)
    if mtp != "auto" and not (isinstance(mtp, int) and not isinstance(mtp, bool) and 0 <= mtp <= 3):
        raise StepstreamError(f"mtp={mtp!r}: choose 'auto' or a draft length 0..3")
    heads = getattr(model, "n_mtp", 0)
    if mtp == 0 or heads == 0:
        return None
    return speculative.DraftLength(heads, None if mtp == "auto" else min(mtp, heads),
                                   getattr(model, "step_seconds", None))


def generate(model, prompt: Sequence[int], sampler: Sampler, max_tokens: int | None = None,
             stop_at_eog: bool = True, mtp=None, stats: dict | None = None, cancelled=None) -> Iterator[int]:
    """Evaluate the prompt (reusing the cached prefix) and yield sampled tokens. mtp: "auto" or a
    draft length 0..3 for speculative decoding with the MTP heads (None: the model's option);
    the tokens are the same either way (runtime.generation.speculative). `stats`, when given,
    gets "cached" (prompt positions reused) and "prompt_done" (a perf_counter time) once the
    prompt is evaluated, and when drafting, the passes and drafts (speculative.generate).
    `cancelled()`, when given, is asked between the prompt's batches: a request whose client
    has gone stops there and yields nothing."""
    prompt = list(prompt)
    if not prompt:
        raise StepstreamError("generation needs a non-empty prompt")
    if max_tokens is not None and (not isinstance(max_tokens, numbers.Integral) or isinstance(max_tokens, bool)):
        raise StepstreamError(f"max_tokens must be an integer, or None for no limit, got {max_tokens!r}")
    eog = model.tokenizer.eog_ids if stop_at_eog else frozenset()
    params = getattr(sampler, "params", None)  # (a sampler may be any callable)
    if params is not None and params.dry_multiplier and not sampler.dry_heads:  # DRY's breakers, in this vocabulary's tokens
        from runtime.generation.dry import heads_for

        sampler.dry_heads = heads_for(model.tokenizer, params.dry_sequence_breakers)
    # No token wanted: the plain path evaluates the prompt and yields nothing (a draft pass would
    # yield one before it checks the count). A constrained sampler (JSON mode, a schema, a tool
    # call's grammar) drafts too: a verify pass calls it on each position in order and stops at
    # the first token that differs from its draft, so its recognizer takes exactly the tokens
    # emitted, as in plain decoding (a draft the grammar refuses is just not accepted).
    plain = max_tokens is not None and max_tokens <= 0
    chooser = None if plain else draft_length(model, mtp)
    if chooser is not None:
        yield from speculative.generate(model, prompt, sampler, max_tokens, eog, chooser, stats, cancelled)
    else:
        yield from _plain(model, prompt, sampler, max_tokens, eog, stats, cancelled)


def _plain(model, prompt: list[int], sampler: Sampler, max_tokens: int | None, eog: frozenset,
           stats: dict | None, cancelled=None) -> Iterator[int]:
    with speculative.owned(model):
        forget = getattr(model, "forget_drafts", None)
        if forget is not None:  # no head reads this generation's states: none are kept for them
            forget()
        if stats is not None and hasattr(model, "eval_prompt"):  # the positions reused, and when the prompt was done
            logits, cached = model.eval_prompt(prompt, cancelled=cancelled)
            if logits is None:  # cancelled during the prompt
                return
            stats.update(cached=cached, prompt_done=time.perf_counter())
        else:
            logits = model.eval_reusing_prefix(prompt)
        mine = getattr(model, "version", None)
        tok = sampler(logits, model.history) if max_tokens is None or max_tokens > 0 else None
    n = 0
    while max_tokens is None or n < max_tokens:
        n += 1
        yield tok
        if tok in eog or model.n_past + 1 > model.n_ctx or n == max_tokens:
            return  # the last token is not evaluated: nothing would read its logits
        with speculative.owned(model):
            speculative.still_current(model, mine)
            logits = model.eval([tok])
            mine = getattr(model, "version", None)
            tok = sampler(logits, model.history)


class StopStrings:
    """Finds stop strings in streamed text, holding back a tail that could start one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit: str | None = None  # the stop string found (the earliest; of those, the first given)

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was hit)."""
        self.pending += text
        hits = [(i, k) for k, i in enumerate(self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            at, k = min(hits)
            out, self.pending, self.hit = self.pending[:at], "", self.stops[k]
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass(frozen=True)
class Piece:
    text: str
    n_tokens: int  # tokens generated so far
    finish_reason: str | None = None  # set on the last piece: "stop" or "length"
    eog: bool = False  # the last piece, ended by an end-of-generation token (counted in n_tokens)

    @property
    def n_reply(self) -> int:
        """Tokens of the reply: the end-of-generation token is not one (llama-cpp-python's count)."""
        return self.n_tokens - self.eog


def complete(model, prompt: Sequence[int], params: SamplingParams, max_tokens: int | None,
             stop: Sequence[str] = (), mtp=None, grammar=None, between_batches=None) -> Iterator[Piece]:
    """Text pieces of the continuation of `prompt`; the last piece carries the finish reason.
    `grammar` (runtime.text.json_constraint.JSON_OBJECT or a compiled JSON Schema) constrains
    the continuation to its language. `between_batches()`, when given, is called between the
    prompt's batches (a progress display reads model.n_past); it returns nothing."""
    sampler = Sampler(params)
    if grammar is not None:
        from runtime.text.json_constraint import JsonObjectReply, vocabulary

        sampler.constraint = JsonObjectReply(vocabulary(model.tokenizer), grammar=grammar)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stops = StopStrings(stop)
    eog = model.tokenizer.eog_ids
    n = 0
    def watch() -> bool:  # generate's `cancelled`: asked between the prompt's batches; never cancels
        between_batches()
        return False

    watching = between_batches is not None
    for tok in generate(model, prompt, sampler, max_tokens, mtp=mtp, stats={} if watching else None,
                        cancelled=watch if watching else None):
        n += 1
        if tok in eog:
            yield Piece(stops.push(utf8.decode(b"", final=True))[0] + stops.flush(), n, "stop", eog=True)
            return
        text, hit = stops.push(utf8.decode(model.tokenizer.decode_bytes([tok])))
        if hit:
            yield Piece(text, n, "stop")
            return
        if text:
            yield Piece(text, n)
    yield Piece(stops.push(utf8.decode(b"", final=True))[0] + stops.flush(), n, "length")


def sampling_params(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0,
                    repeat_last_n=64, seed=None, frequency_penalty=0.0, presence_penalty=0.0, logit_bias=None,
                    typical_p=1.0, xtc_probability=0.0, xtc_threshold=0.1, top_n_sigma=-1.0,
                    mirostat=0, mirostat_tau=5.0, mirostat_eta=0.1, dynatemp_range=0.0, dynatemp_exponent=1.0,
                    dry_multiplier=0.0, dry_base=1.75, dry_allowed_length=2, dry_penalty_last_n=-1,
                    dry_sequence_breakers=("\n", ":", '"', "*"), **unknown) -> SamplingParams:
    if unknown:  # a TypeError from deep inside, before
        raise UnknownOption(f"unknown option(s) {', '.join(sorted(unknown))}; known: temperature (temp), top_k, "
                              f"top_p, min_p, repeat_penalty, repeat_last_n, frequency_penalty, presence_penalty, "
                              f"logit_bias, typical_p, xtc_probability, xtc_threshold, top_n_sigma, mirostat "
                              f"(mirostat_mode), mirostat_tau, mirostat_eta, dynatemp_range, dynatemp_exponent, "
                              f"dry_multiplier, dry_base, dry_allowed_length, dry_penalty_last_n, "
                              f"dry_sequence_breakers, seed, and mtp for generation")
    return SamplingParams(_real("temperature", temperature), _whole("top_k", top_k), _real("top_p", top_p),
                          _real("min_p", min_p), _real("repeat_penalty", repeat_penalty),
                          _whole("repeat_last_n", repeat_last_n), seed, _real("frequency_penalty", frequency_penalty),
                          _real("presence_penalty", presence_penalty), logit_bias_pairs(logit_bias),
                          _real("typical_p", typical_p), _real("xtc_probability", xtc_probability),
                          _real("xtc_threshold", xtc_threshold), _real("top_n_sigma", top_n_sigma),
                          _whole("mirostat", mirostat), _real("mirostat_tau", mirostat_tau),
                          _real("mirostat_eta", mirostat_eta), _real("dynatemp_range", dynatemp_range),
                          _real("dynatemp_exponent", dynatemp_exponent), _real("dry_multiplier", dry_multiplier),
                          _real("dry_base", dry_base), _whole("dry_allowed_length", dry_allowed_length),
                          _whole("dry_penalty_last_n", dry_penalty_last_n), _breakers(dry_sequence_breakers))


def _breakers(value) -> tuple:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(b, str) for b in value):
        raise StepstreamError(f"dry_sequence_breakers must be a list of strings, got {value!r:.80}")
    return tuple(value)


def logit_bias_pairs(bias) -> tuple:
    """llama-cpp-python's and OpenAI's logit_bias ({token id: bias}, ids as ints or decimal
    strings; None or {}: none) as SamplingParams' sorted pairs."""
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise StepstreamError(f"logit_bias must be a mapping of token ids to biases, got {bias!r:.80}")
    pairs = {}
    for key, value in bias.items():
        tok = int(key) if isinstance(key, str) and key.isascii() and key.isdecimal() else key
        if isinstance(tok, bool) or not isinstance(tok, numbers.Integral) or tok < 0:
            raise StepstreamError(f"logit_bias: {key!r:.40} is not a token id")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not _finite(value):
            raise StepstreamError(f"logit_bias: token {tok}'s bias must be a finite number, got {value!r:.40}")
        if int(tok) in pairs:
            raise StepstreamError(f"logit_bias names token {tok} twice")
        pairs[int(tok)] = float(value)
    return tuple(sorted(pairs.items()))


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise StepstreamError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an integer of hundreds of digits
        raise StepstreamError(f"{name} must be a finite number, got an integer of {len(str(value))} digits") from None


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _whole(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise StepstreamError(f"{name} must be an integer, got {value!r}")
    return int(value)


def greedy_tokens(model, prompt: Sequence[int], n: int, mtp=None) -> list[int]:
    """n greedy continuations, ignoring end-of-generation tokens (golden tests)."""
    return list(generate(model, prompt, Sampler(SamplingParams(temperature=0.0)), n, stop_at_eog=False, mtp=mtp))

