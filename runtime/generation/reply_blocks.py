"""A chat reply's steps as a sequence of blocks: the shared core of the Responses API's output
items (runtime.generation.response_events) and the Anthropic Messages API's content blocks
(runtime.generation.message_events).

The reply parser (runtime.text.tool_calls.ReplyStream) cuts the text into reasoning, content
and tool calls; each run of reasoning or content is one block, each call another, in the order
the model wrote them. `feed(step)` gives what a step changed, as operations:

    ("open", kind)                     a "reasoning" or "text" block starts
    ("text", kind, text, logprobs)     it grows (logprobs: the tokens of content text)
    ("close", kind, finish_reason)     it ends (finish_reason: when the reply's end closes it)
    ("call", {"id", "function": {"name", "arguments"}})   a whole tool call
    ("end", finish_reason)             the reply ended ("stop" or "length")

Steps are fed one at a time, as the generation made them (not merged), so each token is told
apart: those fed while the reply is in reasoning count as `reasoning_tokens`. A step's tokens'
log-probabilities go with the first content text the step gives (tokens whose text the parser
holds back go with the text that releases it); tokens of reasoning and of tool calls have
none, as OpenAI gives none.
"""

from __future__ import annotations

from runtime.generation.request import Step
from runtime.text.tool_calls import ReplyStream


class ReplyBlocks:
    def __init__(self, *, in_reasoning: bool, tools: list | None, forced: str = "", max_calls: int | None = None,
                 want_logprobs: bool = False):
        """forced: the start of a call the prompt already holds (tool_choice), read by the parser
        before the generated text."""
        self.parser = ReplyStream(in_reasoning=in_reasoning, tools=tools, calls=tools is not None, max_calls=max_calls)
        self._early = self.parser.push(forced) if forced else []
        self.want_logprobs = want_logprobs
        self.open: str | None = None  # the kind of the block being written
        self._pending: list = []  # log-probabilities of tokens whose text has not yet come out as content
        self.reasoning_tokens = 0
        self.n_calls = 0

    def feed(self, step: Step) -> list[tuple]:
        if self.parser.in_reasoning:  # this step's tokens continue the reasoning: no log-probabilities
            self.reasoning_tokens += step.tokens
            self._pending.clear()
        elif self.want_logprobs:
            self._pending.extend(step.logprobs)
        deltas = self._early + (self.parser.push(step.text) if step.text else [])
        self._early = []
        if step.finish_reason:
            deltas += self.parser.finish(cut=step.finish_reason == "length")
        ops: list[tuple] = []
        for d in deltas:
            if "tool_calls" in d:
                ops += self._close()
                self._pending.clear()  # a call's tokens have no log-probabilities
                ops += [("call", call) for call in d["tool_calls"]]
                self.n_calls += len(d["tool_calls"])
                continue
            kind, text = ("reasoning", d["reasoning_content"]) if "reasoning_content" in d else ("text", d["content"])
            if self.open != kind:
                ops += self._close() + [("open", kind)]
                self.open = kind
            lps = []
            if kind == "reasoning":
                self._pending.clear()
            else:
                lps, self._pending = self._pending, []
            ops.append(("text", kind, text, lps))
        if step.finish_reason:
            ops += self._close(step.finish_reason) + [("end", step.finish_reason)]
        return ops

    def _close(self, finish_reason: str | None = None) -> list[tuple]:
        kind, self.open = self.open, None
        return [("close", kind, finish_reason)] if kind is not None else []
