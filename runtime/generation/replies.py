"""OpenAI-shaped responses and streaming chunks, built from a request's completion steps.

A Reply collects the steps of one request and says, at each step, what the client is sent:
for a text completion the text itself; for a chat completion the deltas of the reply parser
(runtime.text.tool_calls), which separates reasoning, content and tool calls, holding back
text that may be the start of a tag.
"""

from __future__ import annotations

import time
import uuid

from runtime.generation.request import Step, Timings, TokenLogprob, legacy_logprobs, token_text as _text, tokens_chars
from runtime.text.tool_calls import ReplyStream, parse_reply


def usage(n_prompt: int, timings: Timings) -> dict:
    n = timings.predicted_n
    return {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n,
            "prompt_tokens_details": {"cached_tokens": timings.cached_n}}


class TextReply:
    """/v1/completions."""

    def __init__(self, model_name: str, n_prompt: int, prompt_chars: int, echo: str = "", index: int = 0):
        """prompt_chars: the prompt's length in characters, where the reply's `text_offset`s start
        (OpenAI's and llama-cpp-python's convention: offsets into prompt + reply). index: the
        prompt's place in a request that sent several."""
        self.id, self.created, self.model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), model_name
        self.index = index
        self.n_prompt, self.prompt_chars = n_prompt, prompt_chars
        self.text: list[str] = [echo]
        self.offset = prompt_chars  # the text_offset of the next generated token (request.tokens_chars)
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None

    def chunk(self, step: Step, want_logprobs: bool) -> dict | None:
        """The streaming chunk for one step (None when it carries nothing)."""
        offset, self.offset = self.offset, self.offset + tokens_chars(step.logprobs)
        self.text.append(step.text)
        self.logprobs.extend(step.logprobs)
        self.finish_reason = step.finish_reason
        if not step.text and not step.finish_reason and not step.logprobs:
            return None
        return self._envelope([{"text": step.text, "index": self.index,
                                "logprobs": legacy_logprobs(step.logprobs, offset) if want_logprobs else None,
                                "finish_reason": step.finish_reason}])

    def _envelope(self, choices: list, **extra) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def whole(self, timings: Timings, want_logprobs: bool) -> dict:
        choice = {"text": "".join(self.text), "index": self.index,
                  "logprobs": legacy_logprobs(self.logprobs, self.prompt_chars) if want_logprobs else None,
                  "finish_reason": self.finish_reason}
        return self._envelope([choice], usage=usage(self.n_prompt, timings), timings=timings.as_dict())

    def usage_chunk(self, timings: Timings) -> dict:
        return self._envelope([], usage=usage(self.n_prompt, timings), timings=timings.as_dict())

    @staticmethod
    def joined(answers: list[dict]) -> dict:
        """The whole answers to a request's several prompts as one: their choices in order, the
        usage summed (OpenAI's shape); `timings`, one per prompt, as a list."""
        total = {k: sum(a["usage"][k] for a in answers) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        total["prompt_tokens_details"] = {"cached_tokens": sum(a["usage"]["prompt_tokens_details"]["cached_tokens"]
                                                               for a in answers)}
        return {**answers[0], "choices": [c for a in answers for c in a["choices"]], "usage": total,
                "timings": [a["timings"] for a in answers]}


def _chat_logprobs(lps) -> dict:
    return {"content": [{"token": _text(lp.text), "logprob": lp.logprob, "bytes": list(lp.text),
                         "top_logprobs": [{"token": _text(t), "logprob": p, "bytes": list(t)} for _, t, p in lp.top]}
                        for lp in lps]}


REASONING_FIELDS = ("reasoning_content", "reasoning", "both")


def _named(delta: dict, field: str) -> dict:
    """A delta's reasoning under the name clients read: `reasoning_content` (llama.cpp's and
    DeepSeek's), `reasoning` (vLLM's since 0.11, OpenRouter's, StepFun's API's), or both (which
    a client reading both shows twice: Kimi Code's issue 3928)."""
    if "reasoning_content" not in delta or field == "reasoning_content":
        return delta
    if field == "both":
        return {**delta, "reasoning": delta["reasoning_content"]}
    return {("reasoning" if k == "reasoning_content" else k): v for k, v in delta.items()}


class ChatReply:
    """/v1/chat/completions: content, `reasoning_content` and `tool_calls` parsed from the text
    (reasoning always, as llama-server does by default; tool calls only when the request offered
    tools and did not say tool_choice "none": otherwise the markup is content, as written)."""

    def __init__(self, model_name: str, n_prompt: int, *, in_reasoning: bool, tools: list | None, forced: str = "",
                 max_calls: int | None = None, reasoning_field: str = "reasoning_content"):
        """max_calls: 1 for `parallel_tool_calls: false` (the reply ends at its first call);
        reasoning_field: the reasoning's name in the reply (REASONING_FIELDS)."""
        self.reasoning_field = reasoning_field
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model_name
        self.n_prompt, self.in_reasoning, self.tools, self.max_calls = n_prompt, in_reasoning, tools, max_calls
        self.stream = ReplyStream(in_reasoning=in_reasoning, tools=tools, calls=tools is not None, max_calls=max_calls)
        # the start of a forced tool call (tool_choice): part of the reply the parser reads, held
        # back by it (an open call is sent once complete), never sent as text
        self._early = self.stream.push(forced) if forced else []
        self.text: list[str] = [forced]
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self.n_calls = 0  # tool calls streamed so far

    def _envelope(self, choices: list, **extra) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def first_chunk(self) -> dict:
        return self._envelope([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}])

    def collect(self, step: Step) -> None:
        """Keep a step of a reply that is sent whole."""
        self.text.append(step.text)
        self.logprobs.extend(step.logprobs)
        self.finish_reason = step.finish_reason or self.finish_reason

    def _finish(self, reason: str | None, n_calls: int) -> str | None:
        # a reply that ended at its last allowed call was a call, however the generation ended
        ended = self.max_calls is not None and n_calls >= self.max_calls
        return "tool_calls" if n_calls and (reason == "stop" or ended) else reason

    def chunks(self, step: Step, want_logprobs: bool) -> list[dict]:
        """The streaming chunks for one step."""
        self.text.append(step.text)
        self.logprobs.extend(step.logprobs)
        deltas = self._early + (self.stream.push(step.text) if step.text else [])
        self._early = []
        if step.finish_reason:
            deltas += self.stream.finish(cut=step.finish_reason == "length")
        self.n_calls += sum(len(d.get("tool_calls", ())) for d in deltas)
        deltas = [_named(d, self.reasoning_field) for d in deltas]
        out = [self._envelope([{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}]) for d in deltas]
        if want_logprobs and step.logprobs:
            if out:
                out[0]["choices"][0]["logprobs"] = _chat_logprobs(step.logprobs)
            else:
                out.append(self._envelope([{"index": 0, "delta": {}, "logprobs": _chat_logprobs(step.logprobs),
                                            "finish_reason": None}]))
        if step.finish_reason:
            self.finish_reason = self._finish(step.finish_reason, self.n_calls)
            out.append(self._envelope([{"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": self.finish_reason}]))
        return out

    def whole(self, timings: Timings, want_logprobs: bool) -> dict:
        text = "".join(self.text)
        parsed = parse_reply(text, in_reasoning=self.in_reasoning, tools=self.tools, calls=self.tools is not None,
                             max_calls=self.max_calls, cut=self.finish_reason == "length")
        message: dict = {"role": "assistant",
                         "content": parsed.content if parsed.content is not None or parsed.tool_calls else ""}
        if parsed.reasoning is not None:
            message.update(_named({"reasoning_content": parsed.reasoning}, self.reasoning_field))
        if parsed.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}}
                                     for c in parsed.tool_calls]
        choice = {"index": 0, "message": message,
                  "logprobs": _chat_logprobs(self.logprobs) if want_logprobs else None,
                  "finish_reason": self._finish(self.finish_reason, len(parsed.tool_calls))}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage(self.n_prompt, timings), "timings": timings.as_dict()}

    def usage_chunk(self, timings: Timings) -> dict:
        return self._envelope([], usage=usage(self.n_prompt, timings), timings=timings.as_dict())
