"""A chat conversation that stays within the context: its turns, its replies, context shift.

    conv = Conversation(model, system_prompt, params, max_tokens, stops)
    for piece in conv.reply("hello"):     # str: reply text; Notice: a one-line remark
        ...

`model` is anything with the runtime Model's `chat_tokens`, `tokenizer`, `n_ctx` and what
`generate` needs; this layer sits below the model and never imports it.

Context shift, as llama.cpp's: when a new prompt would leave less than a quarter of the
context for the reply, or a reply fills the context, the oldest exchanges are dropped (the
system prompt stays) and generation goes on from the shorter conversation plus the reply
so far. Each shift yields one Notice.

Stopping a reply (Ctrl-C, or the caller closing the iterator): a KeyboardInterrupt inside an
evaluation leaves the model as it was before that evaluation (runtime.model.model), so the
model holds the prompt and the reply's evaluated tokens, and the conversation keeps the text
shown so far as the assistant's turn. The next prompt is then evaluated from where the two
agree, as after any reply.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from runtime.generation.loop import StopStrings, generate
from runtime.generation.reasoning_budget import ReasoningBudget, closer_tokens
from runtime.generation.sampling import Sampler, SamplingParams
from runtime.text.tokenizer import utf8_problem
from runtime.text.tool_calls import ReplyStream, starts_in_reasoning


@dataclass(frozen=True)
class Notice:
    """Something the user should know, in one line: turns dropped, a message that cannot fit."""

    text: str


class Conversation:
    def __init__(self, model, system_prompt: str | None, params: SamplingParams, max_tokens: int | None = None,
                 stops: Sequence[str] = (), reasoning_budget: int | None = None, reasoning_message: str = "",
                 progress=None, grammar=None):
        """reasoning_budget: tokens a reply may reason before its </think> is forced (None: no
        limit; runtime.generation.reasoning_budget), with reasoning_message written before it.
        grammar: a compiled grammar (runtime.text.gbnf_grammar) each reply follows, after its
        reasoning when the template opens one.
        progress: a display of the prompt's evaluation (runtime.cli.prompt_progress): `start(n)`
        before each reply's prompt, called between its batches, `close()` at its first token."""
        self.model = model
        self.progress = progress
        self.grammar = grammar
        self.params = params
        self.reasoning_budget, self.reasoning_message = reasoning_budget, reasoning_message
        self.max_tokens = max_tokens
        self.stops = list(stops)
        self.messages: list[dict] = [{"role": "system", "content": system_prompt}] if system_prompt else []

    @property
    def _kept(self) -> int:
        """Messages that are never dropped at the front: the system prompt."""
        return 1 if self.messages and self.messages[0]["role"] == "system" else 0

    def reply(self, text: str) -> Iterator[str | Notice]:
        """Add the user's message and yield the reply as it is generated."""
        why = utf8_problem(text)
        if why is not None:  # stdin in another encoding: say so, and keep the conversation going
            yield Notice(f"this message is not UTF-8 text ({why}): not sent")
            return
        message = {"role": "user", "content": text}
        n_ctx = self.model.n_ctx
        room = max(1, min(n_ctx // 4, self.max_tokens or n_ctx))  # context a new reply should find free
        # measured before the message joins the conversation: Ctrl-C while a long one is tokenized
        # left a user turn without a reply, and the next prompt held two user turns in a row
        alone = len(self.model.chat_tokens(self.messages[: self._kept] + [message]))
        self.messages.append(message)
        if alone + 1 > n_ctx:  # it cannot fit even without the earlier turns: drop nothing
            self.messages.pop()
            yield Notice(f"this message needs {alone} tokens{' with the system prompt' if self._kept else ''}, "
                         f"more than the context "
                         f"of {n_ctx}: not sent (shorten it, or start with a larger --ctx-size)")
            return
        shown: list[str] = []
        try:
            prompt = yield from self._fit(room)
            yield from self._generate(prompt, shown)
        finally:  # also when stopped: what was shown (maybe nothing) stays in the conversation as the reply
            self.messages.append({"role": "assistant", "content": "".join(shown)})
            if self.progress is not None:  # (stopped during its prompt: the bar goes too)
                self.progress.close()

    def _generate(self, prompt: list[int], shown: list[str]) -> Iterator[str | Notice]:
        model, eog = self.model, self.model.tokenizer.eog_ids
        sampler = Sampler(self.params, budget=self._budget(prompt))
        if self.grammar is not None:
            from runtime.text.json_constraint import JsonObjectReply, vocabulary

            tail = model.tokenizer.decode_bytes(prompt[-64:], special=True).decode("utf-8", "replace")
            sampler.constraint = JsonObjectReply(vocabulary(model.tokenizer), starts_in_reasoning(tail), self.grammar)
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopStrings(self.stops)
        reply: list[int] = []
        watch = self._between_batches if self.progress is not None else None
        while True:
            left = None if self.max_tokens is None else self.max_tokens - len(reply)
            if watch is not None:
                self.progress.start(len(prompt) + len(reply))
            for tok in generate(model, prompt + reply, sampler, left, stats=None if watch is None else {},
                                cancelled=watch):
                if watch is not None:
                    self.progress.close()
                reply.append(tok)
                if tok in eog:
                    break
                text, hit = stops.push(utf8.decode(model.tokenizer.decode_bytes([tok])))
                if text:
                    shown.append(text)
                    yield text
                if hit:
                    return
            else:
                if len(reply) != self.max_tokens and len(prompt) + len(reply) + 1 > model.n_ctx:  # context full
                    prompt = yield from self._fit(max(1, model.n_ctx // 4), reply)
                    if len(prompt) + len(reply) + 1 <= model.n_ctx:
                        continue
                    yield Notice(f"the reply filled the context of {model.n_ctx} tokens: stopped")
            break
        tail = stops.push(utf8.decode(b"", final=True))[0] + stops.flush()
        if tail:
            shown.append(tail)
            yield tail

    def _between_batches(self) -> bool:
        """generate's `cancelled`, asked between the prompt's batches: the progress display's turn;
        it never cancels."""
        self.progress()
        return False

    def _budget(self, prompt: list[int]) -> ReasoningBudget | None:
        if self.reasoning_budget is None:
            return None
        model = self.model
        tail = model.tokenizer.decode_bytes(prompt[-64:], special=True).decode("utf-8", "replace")
        return ReasoningBudget(self.reasoning_budget, closer_tokens(model.tokenize, self.reasoning_message),
                               model.tokenizer.token_bytes,
                               ReplyStream(in_reasoning=starts_in_reasoning(tail), calls=False))

    def _fit(self, room: int, reply: Sequence[int] = ()) -> Iterator[Notice]:
        """Drop the oldest exchanges until the prompt plus `reply` leaves `room` tokens of the
        context free, or only the system prompt and the current message remain. Returns the
        prompt's ids (after yielding a Notice when anything was dropped)."""
        prompt = self.model.chat_tokens(self.messages)
        before, dropped = len(prompt), 0
        while len(prompt) + len(reply) + room > self.model.n_ctx and len(self.messages) > self._kept + 1:
            del self.messages[self._kept]  # the oldest user message ...
            dropped += 1
            while len(self.messages) > self._kept + 1 and self.messages[self._kept]["role"] != "user":
                del self.messages[self._kept]  # ... and the replies that answered it
                dropped += 1
            prompt = self.model.chat_tokens(self.messages)
        if dropped:
            system = "the system prompt and " if self._kept else ""
            left = len(self.messages) - self._kept
            yield Notice(f"context full ({self.model.n_ctx} tokens): dropped the "
                         + (f"{dropped} oldest messages" if dropped > 1 else "oldest message")
                         + f" ({before - len(prompt)} tokens); {system}"
                         + (f"the last {left} remain" if left > 1 else "the last message remains"))
        return prompt
