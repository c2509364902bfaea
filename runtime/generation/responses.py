"""OpenAI-shaped results of a generation: whole responses, or their streaming chunks."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

from runtime.generation.loop import Piece


def _join(pieces: Iterator[Piece]) -> tuple[str, Piece]:
    parts = list(pieces)
    return "".join(p.text for p in parts), parts[-1]


def _usage(n_prompt: int, n_completion: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


def completion_response(model, prompt_ids: list[int], pieces: Iterator[Piece], stream: bool):
    cid, created, name = f"cmpl-{uuid.uuid4()}", int(time.time()), model.name

    def chunks():
        for p in pieces:
            yield {"id": cid, "object": "text_completion", "created": created, "model": name,
                   "choices": [{"text": p.text, "index": 0, "logprobs": None, "finish_reason": p.finish_reason}]}

    if stream:
        return chunks()
    text, last = _join(pieces)
    return {"id": cid, "object": "text_completion", "created": created, "model": name,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": last.finish_reason}],
            "usage": _usage(len(prompt_ids), last.n_tokens)}


def chat_response(model, prompt_ids: list[int], pieces: Iterator[Piece], stream: bool):
    cid, created, name = f"chatcmpl-{uuid.uuid4()}", int(time.time()), model.name

    def chunks():
        yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
               "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}]}
        for p in pieces:
            delta = {"content": p.text} if p.text else {}
            if delta or p.finish_reason:
                yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                       "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": p.finish_reason}]}

    if stream:
        return chunks()
    text, last = _join(pieces)
    return {"id": cid, "object": "chat.completion", "created": created, "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": last.finish_reason}],
            "usage": _usage(len(prompt_ids), last.n_tokens)}
