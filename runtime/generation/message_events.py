"""An Anthropic Messages API reply (POST /v1/messages) built from a request's steps: the
message's content blocks, and the server-sent events that stream them.

The reply's blocks (runtime.generation.reply_blocks) become content blocks in the order the
model wrote them: reasoning a `thinking` block (when the request enabled thinking; with
`display: "omitted"` its text is left out), text a `text` block, each call a `tool_use` block
whose `input` is the call's arguments. A stream sends `message_start`, then for each block
`content_block_start`, its deltas (`thinking_delta`, `text_delta`, `input_json_delta`) and
`content_block_stop`, then `message_delta` (stop reason, usage) and `message_stop`.

stop_reason: "tool_use" when the reply ended after calls, "max_tokens" when max_tokens cut it
("model_context_window_exceeded" when the context's end did),
"stop_sequence" (with the one) when a stop sequence did, else "end_turn". Usage counts the
prompt's tokens read from the cache (`cache_read_input_tokens`) apart from those evaluated
(`input_tokens`), as Anthropic does.
"""

from __future__ import annotations

import copy
import json

from runtime.generation.reply_blocks import ReplyBlocks
from runtime.generation.request import Step, Timings


def tool_use_id(call_id: str) -> str:
    """A call's id as Anthropic spells them (toolu_...)."""
    return "toolu_" + call_id.split("_", 1)[-1]


class MessageReply:
    def __init__(self, message_id: str, model_name: str, n_prompt: int, timings: Timings, *, in_reasoning: bool,
                 tools: list | None, forced: str = "", max_calls: int | None = None, thinking: str = "shown",
                 window: bool = False):
        """thinking: "shown", "omitted" (thinking blocks without their text) or "hidden" (none);
        window: the context's end, not max_tokens, limits the reply (a cut is then
        "model_context_window_exceeded")."""
        self.id, self.model, self.n_prompt, self.timings = message_id, model_name, n_prompt, timings
        self.blocks = ReplyBlocks(in_reasoning=in_reasoning, tools=tools, forced=forced, max_calls=max_calls)
        self.thinking, self.window = thinking, window
        self.content: list[dict] = []
        self._skipping = False  # inside a reasoning block that is not shown
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None

    def _usage(self) -> dict:
        t = self.timings
        return {"input_tokens": self.n_prompt - t.cached_n, "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": t.cached_n, "output_tokens": t.predicted_n,
                "output_tokens_details": {"thinking_tokens": self.blocks.reasoning_tokens}}

    def message(self) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": copy.deepcopy(self.content), "stop_reason": self.stop_reason,
                "stop_sequence": self.stop_sequence, "usage": self._usage()}

    def start(self) -> list[dict]:
        """A stream's first event (the prompt's cached part is not known yet: message_delta says it)."""
        usage = {"input_tokens": self.n_prompt, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                 "output_tokens": 0}
        return [{"type": "message_start", "message": {**self.message(), "content": [], "usage": usage}}]

    def feed(self, step: Step) -> list[dict]:
        events: list[dict] = []
        for op in self.blocks.feed(step):
            kind = op[0]
            if self._skipping and kind in ("text", "close"):  # a reasoning block that is not shown
                self._skipping = kind != "close"
            elif kind == "open" and op[1] == "reasoning" and self.thinking == "hidden":
                self._skipping = True
            elif kind == "open":
                block = {"type": "thinking", "thinking": "", "signature": ""} if op[1] == "reasoning" else \
                    {"type": "text", "text": ""}
                self.content.append(block)
                events.append({"type": "content_block_start", "index": len(self.content) - 1,
                               "content_block": copy.deepcopy(block)})
            elif kind == "text":
                events += self._text(op[2])
            elif kind == "close":
                events.append({"type": "content_block_stop", "index": len(self.content) - 1})
            elif kind == "call":
                events += self._call(op[1])
            else:
                events += self._end(op[1], step.stop_sequence)
        return events

    def _text(self, text: str) -> list[dict]:
        block, at = self.content[-1], len(self.content) - 1
        if block["type"] == "text":
            block["text"] += text
            return [{"type": "content_block_delta", "index": at, "delta": {"type": "text_delta", "text": text}}]
        if self.thinking == "omitted":
            return []
        block["thinking"] += text
        return [{"type": "content_block_delta", "index": at, "delta": {"type": "thinking_delta", "thinking": text}}]

    def _call(self, call: dict) -> list[dict]:
        fn = call["function"]
        block = {"type": "tool_use", "id": tool_use_id(call["id"]), "name": fn["name"], "input": {}}
        self.content.append(block)
        at = len(self.content) - 1
        events = [{"type": "content_block_start", "index": at, "content_block": copy.deepcopy(block)}]
        block["input"] = json.loads(fn["arguments"])
        return events + [{"type": "content_block_delta", "index": at,
                          "delta": {"type": "input_json_delta", "partial_json": fn["arguments"]}},
                         {"type": "content_block_stop", "index": at}]

    def _end(self, finish_reason: str, stop_sequence: str | None) -> list[dict]:
        if finish_reason == "length":
            self.stop_reason = "model_context_window_exceeded" if self.window else "max_tokens"
        elif self.blocks.n_calls:
            self.stop_reason = "tool_use"
        elif stop_sequence is not None:
            self.stop_reason, self.stop_sequence = "stop_sequence", stop_sequence
        else:
            self.stop_reason = "end_turn"
        return [{"type": "message_delta", "delta": {"stop_reason": self.stop_reason,
                                                    "stop_sequence": self.stop_sequence},
                 "usage": self._usage()},
                {"type": "message_stop"}]
