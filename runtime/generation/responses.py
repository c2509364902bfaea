"""OpenAI-shaped results of a generation: whole responses, or their streaming chunks."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

from runtime.generation.loop import Piece
from runtime.generation.request import Request, Step, legacy_logprobs, tokens_chars
from runtime.text.tool_calls import ReplyStream, parse_reply


def _join(model, pieces: Iterator[Piece]) -> tuple[str, Piece]:
    """A whole generation, run under the model's lock: a call that returns whole is one step to
    other threads, never interleaved token by token with theirs (each would find the cache no
    longer its own, and fail as stale)."""
    with model.lock:
        parts = list(pieces)
    return "".join(p.text for p in parts), parts[-1]


def _usage(n_prompt: int, n_completion: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


def completion_response(model, prompt_ids: list[int], pieces: Iterator[Piece], stream: bool):
    cid, created, name = f"cmpl-{uuid.uuid4()}", int(time.time()), model.name

    def chunk(text: str, finish: str | None) -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

    def chunks():
        for p in pieces:
            if p.text or not p.finish_reason:
                yield chunk(p.text, None)
            if p.finish_reason:  # a chunk of its own, with no text, as llama-cpp-python ends a stream
                yield chunk("", p.finish_reason)

    if stream:
        return chunks()
    text, last = _join(model, pieces)
    return {"id": cid, "object": "text_completion", "created": created, "model": name,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": last.finish_reason}],
            "usage": _usage(len(prompt_ids), last.n_reply)}


def completion_from_steps(model, req: Request, prompt_text: str, steps: Iterator[Step], stream: bool,
                          want_logprobs: bool, echo: bool):
    """A text completion from a request's steps (runtime.generation.request.run), with the
    tokens' log-probabilities in the legacy shape when asked (`text_offset` counts the prompt's
    characters first, as OpenAI and llama-cpp-python count them) and the prompt's text first
    with `echo`."""
    cid, created, name = f"cmpl-{uuid.uuid4()}", int(time.time()), model.name

    def envelope(text: str, lps, offset: int, finish) -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"text": text, "index": 0,
                             "logprobs": legacy_logprobs(lps, offset) if want_logprobs else None,
                             "finish_reason": finish}]}

    def chunks():
        offset = len(prompt_text)
        if echo:
            yield envelope(prompt_text, (), 0, None)
        for s in steps:
            if s.text or s.logprobs:
                yield envelope(s.text, s.logprobs, offset, None)
            offset += tokens_chars(s.logprobs)
            if s.finish_reason:  # a chunk of its own, no text nor log-probabilities (llama-cpp-python's end)
                out = envelope("", (), offset, s.finish_reason)
                out["choices"][0]["logprobs"] = None
                yield out

    if stream:
        return chunks()
    with model.lock:  # whole: never overtaken by another thread's generation (see _join)
        done = list(steps)
    text = "".join(s.text for s in done)
    out = envelope((prompt_text if echo else "") + text, [lp for s in done for lp in s.logprobs], len(prompt_text),
                   done[-1].finish_reason if done else "length")
    out["usage"] = _usage(len(req.prompt), req.timings.predicted_n - req.timings.eog_n)
    return out


def api_shape(out: dict, timings) -> dict:
    """A server reply builder's whole answer (runtime.generation.replies) in llama-cpp-python's
    shape: no llama-server `timings` nor `prompt_tokens_details`, and the end-of-generation token
    not counted as a completion token."""
    out.pop("timings", None)
    n_prompt = out["usage"]["prompt_tokens"]
    out["usage"] = _usage(n_prompt, timings.predicted_n - timings.eog_n)
    return out


def chat_response(model, prompt_ids: list[int], pieces: Iterator[Piece], stream: bool, *, tools: list | None = None,
                  in_reasoning: bool = False, forced: str = ""):
    """The reply parsed as the server parses it (runtime.text.tool_calls): `reasoning_content`
    (a `<think>` section) always, `tool_calls` when `tools` were offered; `forced`: the start of a
    call the prompt already holds (tool_choice), read by the parser before the generated text."""
    cid, created, name = f"chatcmpl-{uuid.uuid4()}", int(time.time()), model.name
    calls = tools is not None

    def chunk(delta: dict, finish: str | None) -> dict:
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def chunks():
        reply = ReplyStream(in_reasoning=in_reasoning, tools=tools, calls=calls)
        early = reply.push(forced) if forced else []
        called = False
        yield chunk({"role": "assistant"}, None)
        for p in pieces:
            deltas, early = early + (reply.push(p.text) if p.text else []), []
            if p.finish_reason:
                deltas += reply.finish(cut=p.finish_reason == "length")
            called = called or any("tool_calls" in d for d in deltas)
            yield from (chunk(d, None) for d in deltas)
            if p.finish_reason:
                yield chunk({}, "tool_calls" if p.finish_reason == "stop" and called else p.finish_reason)

    if stream:
        return chunks()
    text, last = _join(model, pieces)
    parsed = parse_reply(forced + text, in_reasoning=in_reasoning, tools=tools, calls=calls,
                         cut=last.finish_reason == "length")
    message: dict = {"role": "assistant",
                     "content": parsed.content if parsed.content is not None or parsed.tool_calls else ""}
    if parsed.reasoning is not None:
        message["reasoning_content"] = parsed.reasoning
    if parsed.tool_calls:
        message["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in parsed.tool_calls]
    finish = "tool_calls" if parsed.tool_calls and last.finish_reason == "stop" else last.finish_reason
    return {"id": cid, "object": "chat.completion", "created": created, "model": name,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": _usage(len(prompt_ids), last.n_reply)}
