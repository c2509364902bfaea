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
    return usage_sum([(n_prompt, timings)])


def usage_sum(parts: list[tuple[int, Timings]], per_prompt: int = 1) -> dict:
    """The usage of a request's choices, (prompt tokens, timings) each, `per_prompt` choices for
    each prompt in order (OpenAI's `n` or `best_of`): each prompt's tokens and cached tokens
    counted once (its first choice's), every choice's generated tokens."""
    firsts = parts[::per_prompt]
    n_prompt = sum(n for n, _ in firsts)
    n = sum(t.predicted_n for _, t in parts)
    return {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n,
            "prompt_tokens_details": {"cached_tokens": sum(t.cached_n for _, t in firsts)}}


def timings_of(timings: list[Timings]):
    """A response's `timings`: one choice's, or a list of every choice's."""
    return timings[0].as_dict() if len(timings) == 1 else [t.as_dict() for t in timings]


class TextReply:
    """/v1/completions."""

    def __init__(self, model_name: str, n_prompt: int, prompt_chars: int, echo: str = "", index: int = 0,
                 id: str | None = None):
        """prompt_chars: the prompt's length in characters, where the reply's `text_offset`s start
        (OpenAI's and llama-cpp-python's convention: offsets into prompt + reply). index: the
        choice's place in a request that asked for several (several prompts, `n`); id: the
        request's, which all its choices share."""
        self.id, self.created, self.model = id or f"cmpl-{uuid.uuid4().hex}", int(time.time()), model_name
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

    def choice(self, want_logprobs: bool, index: int | None = None) -> dict:
        return {"text": "".join(self.text), "index": self.index if index is None else index,
                "logprobs": legacy_logprobs(self.logprobs, self.prompt_chars) if want_logprobs else None,
                "finish_reason": self.finish_reason}

    def whole(self, timings: Timings, want_logprobs: bool) -> dict:
        return self._envelope([self.choice(want_logprobs)], usage=usage(self.n_prompt, timings),
                              timings=timings.as_dict())

    def usage_chunk(self, timings: Timings) -> dict:
        return self._envelope([], usage=usage(self.n_prompt, timings), timings=timings.as_dict())

    def score(self, timings: Timings) -> float:
        """best_of's measure of a choice: the mean log-probability of its tokens, the
        end-of-text token that ended it included (OpenAI's "highest log probability per token")."""
        lps = [lp.logprob for lp in self.logprobs] + ([] if timings.eog_logprob is None else [timings.eog_logprob])
        return sum(lps) / len(lps) if lps else float("-inf")  # (no token: ignore_eos's ends alone, max_tokens 0)

    @staticmethod
    def joined(replies: list["TextReply"], timings: list[Timings], per_prompt: int, n: int,
               want_logprobs: bool) -> dict:
        """The whole answer to a request's choices, `per_prompt` generated for each prompt in order:
        of each prompt's, the n likeliest (best_of; all of them when n is per_prompt, in order),
        indexed from 0 in order (OpenAI's shape); the usage counts every generated token, `timings`
        are the choices sent's."""
        choices, kept = [], []
        for first in range(0, len(replies), per_prompt):
            group = list(range(first, first + per_prompt))
            if n < per_prompt:  # best first; of equals, the earlier
                group = sorted(group, key=lambda k: -replies[k].score(timings[k]))[:n]
            choices += [replies[k].choice(want_logprobs, len(choices) + i) for i, k in enumerate(group)]
            kept += [timings[k] for k in group]
        total = usage_sum([(r.n_prompt, t) for r, t in zip(replies, timings)], per_prompt)
        return replies[0]._envelope(choices, usage=total, timings=timings_of(kept))


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
                 max_calls: int | None = None, reasoning_field: str = "reasoning_content", index: int = 0,
                 id: str | None = None):
        """max_calls: 1 for `parallel_tool_calls: false` (the reply ends at its first call);
        reasoning_field: the reasoning's name in the reply (REASONING_FIELDS); index: the
        choice's place among a request's `n`; id: the request's, which all its choices share."""
        self.reasoning_field, self.index = reasoning_field, index
        self.id, self.created, self.model = id or f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model_name
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
        return self._envelope([{"index": self.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
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
        out = [self._envelope([{"index": self.index, "delta": d, "logprobs": None, "finish_reason": None}])
               for d in deltas]
        if want_logprobs and step.logprobs:
            if out:
                out[0]["choices"][0]["logprobs"] = _chat_logprobs(step.logprobs)
            else:
                out.append(self._envelope([{"index": self.index, "delta": {}, "logprobs": _chat_logprobs(step.logprobs),
                                            "finish_reason": None}]))
        if step.finish_reason:
            self.finish_reason = self._finish(step.finish_reason, self.n_calls)
            out.append(self._envelope([{"index": self.index, "delta": {}, "logprobs": None,
                                        "finish_reason": self.finish_reason}]))
        return out

    def choice(self, want_logprobs: bool) -> dict:
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
        return {"index": self.index, "message": message,
                "logprobs": _chat_logprobs(self.logprobs) if want_logprobs else None,
                "finish_reason": self._finish(self.finish_reason, len(parsed.tool_calls))}

    def whole(self, timings: Timings, want_logprobs: bool) -> dict:
        return self.joined([self], [timings], want_logprobs)

    @staticmethod
    def joined(replies: list["ChatReply"], timings: list[Timings], want_logprobs: bool) -> dict:
        """The whole answer to a request's `n` choices (one prompt: its tokens counted once)."""
        first = replies[0]
        return {"id": first.id, "object": "chat.completion", "created": first.created, "model": first.model,
                "choices": [r.choice(want_logprobs) for r in replies],
                "usage": usage_sum([(r.n_prompt, t) for r, t in zip(replies, timings)], len(replies)),
                "timings": timings_of(timings)}

    def usage_chunk(self, timings: Timings) -> dict:
        return self._envelope([], usage=usage(self.n_prompt, timings), timings=timings.as_dict())
