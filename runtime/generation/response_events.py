"""A Responses API response (POST /v1/responses) built from a request's steps: its output
items, and the server-sent events that stream them.

The reply's blocks (runtime.generation.reply_blocks) become output items, in the order the
model wrote them:

    reasoning   {"type": "reasoning", "content": [{"type": "reasoning_text", "text": ...}]}
    text        {"type": "message", "role": "assistant", "content": [{"type": "output_text", ...}]}
    a call      {"type": "function_call", "call_id": ..., "name": ..., "arguments": ...}

A stream announces each item (`response.output_item.added`), sends its text as deltas,
closes it (`response.output_item.done`), and ends with `response.completed`, or
`response.incomplete` when `max_output_tokens` cut the reply. A whole response is the same
machine fed every step, so a stream's final response and the whole one are equal.
Log-probabilities (`include: ["message.output_text.logprobs"]` or `top_logprobs`) are those
of the message's tokens.
"""

from __future__ import annotations

import copy
import secrets
import time

from runtime.generation.reply_blocks import ReplyBlocks
from runtime.generation.request import Step, Timings, token_text

_PREFIX = {"message": "msg", "reasoning": "rs", "function_call": "fc", "function_call_output": "fco"}


def new_id(kind: str) -> str:
    """An id for an item of this type (or "resp" for a response), as OpenAI spells them."""
    return f"{_PREFIX.get(kind, kind if kind == 'resp' else 'item')}_{secrets.token_hex(16)}"


def _logprobs(lps) -> list[dict]:
    return [{"token": token_text(lp.text), "logprob": lp.logprob, "bytes": list(lp.text),
             "top_logprobs": [{"token": token_text(t), "logprob": p, "bytes": list(t)} for _, t, p in lp.top]}
            for lp in lps]


class ResponseReply:
    def __init__(self, response_id: str, model_name: str, n_prompt: int, echo: dict, timings: Timings, *,
                 in_reasoning: bool, tools: list | None, forced: str = "", max_calls: int | None = None,
                 want_logprobs: bool = False):
        """echo: the request's settings as the response reports them (instructions, tools, ...);
        timings: the request's, read for `usage` when it ends; forced: the start of a call the
        prompt already holds (tool_choice)."""
        self.id, self.model, self.n_prompt, self.echo, self.timings = response_id, model_name, n_prompt, echo, timings
        self.created_at = int(time.time())
        self.blocks = ReplyBlocks(in_reasoning=in_reasoning, tools=tools, forced=forced, max_calls=max_calls,
                                  want_logprobs=want_logprobs)
        self.output: list[dict] = []
        self._seq = 0
        self.status, self.incomplete, self.completed_at = "in_progress", None, None

    # ---------------------------------------------------------------- the response object

    def response(self) -> dict:
        t = self.timings
        usage = None
        if self.status != "in_progress":
            usage = {"input_tokens": self.n_prompt,
                     "input_tokens_details": {"cached_tokens": t.cached_n, "cache_write_tokens": t.prompt_n},
                     "output_tokens": t.predicted_n,
                     "output_tokens_details": {"reasoning_tokens": self.blocks.reasoning_tokens},
                     "total_tokens": self.n_prompt + t.predicted_n}
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": self.status,
                "completed_at": self.completed_at, "error": None, "incomplete_details": self.incomplete,
                "model": self.model, "output": copy.deepcopy(self.output), "usage": usage, **self.echo}

    def _event(self, kind: str, **fields) -> dict:
        self._seq += 1
        return {"type": kind, "sequence_number": self._seq - 1, **fields}

    def start(self) -> list[dict]:
        """A stream's first events."""
        snapshot = self.response()
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    # ---------------------------------------------------------------- steps -> items and events

    def feed(self, step: Step) -> list[dict]:
        """The events of one step; the last step's end with the response's own end."""
        events: list[dict] = []
        for op in self.blocks.feed(step):
            if op[0] == "open":
                events += self._open(op[1])
            elif op[0] == "text":
                events += self._text(*op[1:])
            elif op[0] == "close":  # the block a max_output_tokens cut ends is incomplete
                events += self._close("incomplete" if op[2] == "length" else "completed")
            elif op[0] == "call":
                events += self._call(op[1])
            else:
                events += self._end(op[1])
        return events

    def _open(self, kind: str) -> list[dict]:
        if kind == "reasoning":
            item = {"id": new_id(kind), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"id": new_id("message"), "type": "message", "status": "in_progress", "role": "assistant",
                    "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self.output.append(item)
        events = [self._event("response.output_item.added", output_index=len(self.output) - 1,
                              item=copy.deepcopy(item))]
        item["content"].append(part)
        return events + [self._event("response.content_part.added", item_id=item["id"],
                                     output_index=len(self.output) - 1, content_index=0, part=copy.deepcopy(part))]

    def _text(self, kind: str, text: str, lps) -> list[dict]:
        item, at = self.output[-1], len(self.output) - 1
        part = item["content"][0]
        part["text"] += text
        if kind == "reasoning":
            return [self._event("response.reasoning_text.delta", item_id=item["id"], output_index=at,
                                content_index=0, delta=text)]
        lps = _logprobs(lps)
        part["logprobs"] += lps
        return [self._event("response.output_text.delta", item_id=item["id"], output_index=at, content_index=0,
                            delta=text, logprobs=lps)]

    def _close(self, status: str) -> list[dict]:
        item, at = self.output[-1], len(self.output) - 1
        part = item["content"][0]
        item["status"] = status
        if item["type"] == "reasoning":
            done = self._event("response.reasoning_text.done", item_id=item["id"], output_index=at, content_index=0,
                               text=part["text"])
        else:
            done = self._event("response.output_text.done", item_id=item["id"], output_index=at, content_index=0,
                               text=part["text"], logprobs=copy.deepcopy(part["logprobs"]))
        return [done,
                self._event("response.content_part.done", item_id=item["id"], output_index=at, content_index=0,
                            part=copy.deepcopy(part)),
                self._event("response.output_item.done", output_index=at, item=copy.deepcopy(item))]

    def _call(self, call: dict) -> list[dict]:
        fn = call["function"]
        item = {"id": new_id("function_call"), "type": "function_call", "status": "in_progress",
                "call_id": call["id"], "name": fn["name"], "arguments": ""}
        self.output.append(item)
        at = len(self.output) - 1
        events = [self._event("response.output_item.added", output_index=at, item=copy.deepcopy(item))]
        item["arguments"], item["status"] = fn["arguments"], "completed"
        return events + [
            self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=at,
                        delta=fn["arguments"]),
            self._event("response.function_call_arguments.done", item_id=item["id"], output_index=at,
                        name=fn["name"], arguments=fn["arguments"]),
            self._event("response.output_item.done", output_index=at, item=copy.deepcopy(item))]

    def _end(self, finish_reason: str) -> list[dict]:
        cut = finish_reason == "length"
        self.status = "incomplete" if cut else "completed"
        self.incomplete = {"reason": "max_output_tokens"} if cut else None
        self.completed_at = int(time.time()) if not cut else None
        return [self._event("response.incomplete" if cut else "response.completed", response=self.response())]

    def failed(self, code: str, message: str) -> list[dict]:
        """A stream's last events after the generation failed."""
        if self.blocks.open is not None:
            self.output[-1]["status"] = "incomplete"
        self.status = "failed"
        out = self.response()
        out["error"] = {"code": code, "message": message}
        return [self._event("error", code=code, message=message, param=None),
                self._event("response.failed", response=out)]
