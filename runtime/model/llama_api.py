"""llama-cpp-python's `Llama` methods on a model: tokenize and detokenize, generate,
create_completion and create_chat_completion (OpenAI-shaped), chat_tokens, and the keywords
of theirs this API takes, drops (where they change nothing) or refuses by name.

A mixin of runtime.model.model.Model: everything here runs through the model's evaluation
methods and runtime.generation, which builds the replies.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

from runtime.base.errors import StepstreamError, UnknownOption
from runtime.generation import Sampler, chat_response, complete, completion_response, generate, sampling_params
from runtime.generation.reasoning_budget import check_message, effort_budget
from runtime.generation.request import Request, run as run_request
from runtime.generation.replies import ChatReply
from runtime.generation.responses import api_shape, completion_from_steps
from runtime.text.chat_prompt import chat_ids
from runtime.text.chat_template import check_roles
from runtime.text.tokenizer import Tokenizer
from runtime.text.tool_calls import END_THINK, callable_tools, check_tools, forced_call, starts_in_reasoning
from runtime.text.tool_grammar import AutoToolGrammar, ToolCallGrammar


class LlamaApi:
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self.file.check_unchanged()  # its vocabulary is read from the mapped header
            with self.file.evaluating():
                self._tokenizer = Tokenizer.from_gguf(self.file)
        return self._tokenizer

    def tokenize(self, text: str | bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """Like llama-cpp-python: BOS first when the model wants one; `special` parses control tokens."""
        return self.tokenizer.encode(text, add_bos=_flag("add_bos", add_bos) and self.tokenizer.add_bos,
                                     special=_flag("special", special))

    def detokenize(self, tokens, prev_tokens=None, special: bool = False) -> bytes:
        """The bytes of `tokens`; with `prev_tokens` (llama-cpp-python's), those that `tokens` add
        after them (a token's text may depend on the one before it: a leading space)."""
        special = _flag("special", special)
        if prev_tokens is None or len(prev_tokens) == 0:
            return self.tokenizer.decode_bytes(tokens, special=special)
        before = self.tokenizer.decode_bytes(prev_tokens, special=special)
        both = self.tokenizer.decode_bytes(list(prev_tokens) + list(tokens), special=special)
        return both[len(before):] if both.startswith(before) else self.tokenizer.decode_bytes(tokens, special=special)

    # llama-cpp-python's methods that stepstream does not offer: an AttributeError that says why
    # (hasattr() is False). Properties, not __getattr__: that would also catch an AttributeError
    # raised inside a real property's getter and hide it behind "no attribute".
    create_embedding = property(lambda self: _not_offered("create_embedding"))
    embed = property(lambda self: _not_offered("embed"))
    set_cache = property(lambda self: _not_offered("set_cache"))

    def generate(self, tokens, max_tokens: int | None = None, mtp=None, **sampling):
        """Yield sampled token ids after `tokens`, stopping at end-of-generation or max_tokens.

        mtp: "auto" or a draft length 0..3 for speculative decoding with the MTP heads (None:
        the load option `mtp`, 0 by default); the tokens are the same either way.
        Sampling keywords: temperature (or llama-cpp-python's `temp`), top_k, top_p, min_p,
        repeat_penalty, repeat_last_n, presence_penalty, frequency_penalty, logit_bias
        ({token id: bias}), typical_p, xtc_probability, xtc_threshold, top_n_sigma, mirostat
        (or mirostat_mode) with mirostat_tau and mirostat_eta (llama.cpp's samplers), seed;
        grammar (GBNF text or a LlamaGrammar: the tokens follow it).
        """
        grammar = _grammar(sampling.pop("grammar", None))
        sampler = Sampler(self._sampling(sampling))
        if grammar is not None:
            from runtime.text.json_constraint import JsonObjectReply, vocabulary

            sampler.constraint = JsonObjectReply(vocabulary(self.tokenizer), grammar=grammar)
        return generate(self, self._check_tokens_only(tokens), sampler, max_tokens, mtp=mtp)

    def create_completion(self, prompt: str | list[int], max_tokens: int | None = 16, stop=None, stream: bool = False,
                          **sampling):
        """OpenAI-shaped text completion (a dict, or an iterator of chunks when streaming) of a
        text or of token ids, as llama-cpp-python takes either.
        max_tokens None or <= 0: until end of text or the end of the context, as llama-cpp-python.
        grammar: GBNF text or a LlamaGrammar (runtime.LlamaGrammar, or llama-cpp-python's): the
        text follows it."""
        if isinstance(prompt, (list, tuple, np.ndarray)):
            ids = self._check_tokens_only(prompt)
        else:
            ids = self.tokenize(prompt, add_bos=True, special=True)
        mtp = sampling.pop("mtp", None)
        grammar = _grammar(sampling.pop("grammar", None))
        logprobs, echo = sampling.pop("logprobs", None), sampling.pop("echo", False)
        if logprobs is not None or echo is not False:  # llama-cpp-python's log-probabilities and echo
            return self._completion_with_logprobs(prompt, ids, logprobs, echo, max_tokens, stop, stream, mtp, sampling,
                                                  grammar)
        pieces = complete(self, ids, self._sampling(sampling), _no_limit(max_tokens), _stops(stop), mtp=mtp,
                          grammar=grammar)
        return completion_response(self, ids, pieces, stream)

    def _completion_with_logprobs(self, prompt, ids: list[int], logprobs, echo, max_tokens, stop, stream: bool, mtp,
                                  sampling: dict, grammar=None):
        """create_completion with `logprobs` (the sampled token's and the `logprobs` likeliest
        alternatives' log-probabilities, in llama-cpp-python's and OpenAI's legacy shape) or `echo`
        (the prompt's text before the reply's), run as a server request runs."""
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, numbers.Integral)
                                     or not 0 <= logprobs <= self.cfg.vocab):
            raise StepstreamError(f"logprobs must be None or an integer 0..{self.cfg.vocab}, got {logprobs!r}")
        if not isinstance(echo, bool):
            raise StepstreamError(f"echo must be True or False, got {echo!r}")
        if echo and logprobs is not None:  # as the server: the prompt's own log-probabilities are not computed
            raise StepstreamError("echo with logprobs (the prompt's log-probabilities) is not supported")
        text = prompt if isinstance(prompt, str) else self.detokenize(ids).decode("utf-8", "replace")
        params = self._sampling(sampling)
        limit = _no_limit(max_tokens)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral)):
            raise StepstreamError(f"max_tokens must be an integer or None, got {max_tokens!r}")
        req = Request(ids, params, limit, _stops(stop), None if logprobs is None else int(logprobs), mtp=mtp,
                      grammar=grammar)
        return completion_from_steps(self, req, text, run_request(self, req), stream, logprobs is not None, echo)

    def __call__(self, prompt: str, **kwargs):
        """`model(prompt, ...)` is `create_completion`, as in llama-cpp-python."""
        return self.create_completion(prompt, **kwargs)

    def create_chat_completion(self, messages: list[dict], max_tokens: int | None = None, stop=None,
                               stream: bool = False, tools: list | None = None, tool_choice=None, **sampling):
        """OpenAI-shaped chat completion, the prompt rendered from the model's chat template, the
        reply parsed as the server parses it: `reasoning_content`, and `tool_calls` when `tools`
        (OpenAI function specs) are offered. tool_choice: "auto", "none", "required" or
        {"type": "function", "function": {"name": ...}} (the reply then starts a call).
        max_tokens None or <= 0: until end of text or the end of the context, as llama-cpp-python.
        tool_choice None is "auto"; the temperature is 0.2 unless given, llama-cpp-python's chat default.
        `reasoning_budget` (tokens) or `reasoning_effort` ("none", "minimal", "low", ...) bound the
        reply's reasoning: its `</think>` is then forced, after `reasoning_message` if given."""
        tool_choice = "auto" if tool_choice is None else tool_choice
        if "temperature" not in sampling and "temp" not in sampling:
            sampling["temperature"] = 0.2
        check_tools(tools, tool_choice)  # the server's rules: a forced call needs tools, and names one of them
        named = isinstance(tool_choice, dict)
        check_roles(messages)
        offered = tools if tools and tool_choice != "none" else None  # the ones a call may name
        ids = self.chat_tokens(messages, tools=tools or None)  # shown even with "none", as the server shows them
        tail = self.tokenizer.decode_bytes(ids[-64:], special=True).decode("utf-8", "replace")
        in_reasoning, forced = starts_in_reasoning(tail), ""
        if offered is not None and tool_choice != "auto":  # the reply starts with the opening of a call
            forced = ("\n" + END_THINK + "\n" if in_reasoning else "") + forced_call(
                tool_choice["function"]["name"] if named else None)
            ids = ids + self.tokenize(forced, add_bos=False, special=True)
        mtp = sampling.pop("mtp", None)
        budget = _reasoning_budget(sampling.pop("reasoning_budget", None), sampling.pop("reasoning_effort", None))
        message = check_message(sampling.pop("reasoning_message", ""))
        if message and budget is None:
            raise StepstreamError("reasoning_message goes with a reasoning_budget (or a reasoning_effort below medium): "
                                  "without a budget nothing writes it")
        k = _chat_logprobs_k(sampling.pop("logprobs", None), sampling.pop("top_logprobs", None), self.cfg.vocab)
        json_object, grammar = _json_mode(sampling.pop("response_format", None))
        gbnf = _grammar(sampling.pop("grammar", None))
        if gbnf is not None:
            if json_object or grammar is not None:
                raise StepstreamError("give response_format or grammar, not both")
            if offered is not None:
                raise StepstreamError("grammar goes without tools (or with tool_choice 'none'): the reply must match "
                                      "the grammar, with no room for a tool call's markup")
            grammar = gbnf
        if (json_object or grammar is not None) and offered is not None:
            raise StepstreamError("response_format json_object or json_schema goes without tools (or with tool_choice "
                                  "'none'): the reply must be JSON, with no room for a tool call's markup")
        if forced:  # the call the prompt opened is finished by its grammar (runtime.text.tool_grammar)
            grammar = ToolCallGrammar(callable_tools(offered, tool_choice),
                                      tool_choice["function"]["name"] if named else None)
        elif offered is not None:  # "auto": a call the reply opens is finished by its grammar
            grammar = AutoToolGrammar(offered)
        if k is not None or json_object or grammar is not None or budget is not None:
            return self._chat_as_request(ids, k, (json_object, grammar), max_tokens, stop, stream, mtp, sampling,
                                         callable_tools(offered, tool_choice), in_reasoning, forced, (budget, message))
        pieces = complete(self, ids, self._sampling(sampling), _no_limit(max_tokens), _stops(stop), mtp=mtp)
        return chat_response(self, ids, pieces, stream, tools=callable_tools(offered, tool_choice),
                             in_reasoning=in_reasoning, forced=forced)

    def _chat_as_request(self, ids: list[int], k: int | None, structured: tuple, max_tokens, stop, stream: bool, mtp,
                         sampling: dict, tools, in_reasoning: bool, forced: str, budget: tuple = (None, "")):
        """create_chat_completion with `logprobs` (the reply's tokens' log-probabilities and the k
        likeliest alternatives', in OpenAI's chat shape) or JSON mode, run as a server request
        runs (the same steps and the same reply builder, runtime.generation.replies)."""
        params = self._sampling(sampling)
        limit = _no_limit(max_tokens)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral)):
            raise StepstreamError(f"max_tokens must be an integer or None, got {max_tokens!r}")
        json_object, grammar = structured  # JSON mode, or a compiled JSON Schema
        req = Request(ids, params, limit, _stops(stop), k, mtp=mtp, json_object=json_object, grammar=grammar,
                      in_reasoning=in_reasoning, reasoning_budget=budget[0], reasoning_message=budget[1])
        req.tools, req.forced = tools, forced  # the budget reads reasoning as the reply's parser reads it
        reply = ChatReply(self.name, len(ids), in_reasoning=in_reasoning, tools=tools, forced=forced)
        steps = run_request(self, req)
        want = k is not None
        if stream:
            def chunks():
                first = reply.first_chunk()
                first["choices"][0]["delta"] = {"role": "assistant"}  # llama-cpp-python's first delta
                yield first
                for step in steps:
                    yield from reply.chunks(step, want)
            return chunks()
        with self.lock:  # whole: never overtaken by another thread's generation
            for step in steps:
                reply.collect(step)
        return api_shape(reply.whole(req.timings, want), req.timings)

    def chat_tokens(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None,
                    continue_final: bool = True, limit: int | None = None) -> list[int]:
        """The prompt ids of a conversation, rendered with the model's chat template (with the
        OpenAI function specs `tools`, when given). Control tokens come only from the template:
        special-token text inside a message is tokenized as text. A last assistant message with
        text is continued, as llama-server does (continue_final=False closes it and opens a new
        turn). `limit`: a conversation that must render to more tokens is refused before it is
        tokenized (runtime.base.errors.PromptTooLong)."""
        return chat_ids(self.tokenizer, messages, add_generation_prompt, tools=tools, continue_final=continue_final,
                        limit=limit)

    def _sampling(self, sampling: dict):
        """The sampling keywords as SamplingParams; a logit bias outside the vocabulary is refused
        before the prompt is evaluated (not at the first token, minutes later on the real model)."""
        params = sampling_params(**_temp(sampling))
        far = [t for t, _ in params.logit_bias if t >= self.cfg.vocab]
        if far:
            raise StepstreamError(f"logit_bias names token {far[0]}, outside the vocabulary (0..{self.cfg.vocab - 1})")
        return params

    def _check_tokens_only(self, tokens) -> list[int]:
        ids = np.asarray(tokens)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise StepstreamError("tokens must be a 1-D sequence of integer ids")
        return ids.astype(np.int64).tolist()


class TokenView(Sequence):
    """A list of token ids, read-only: indexing, slices (as lists), len, iteration, equality."""

    __slots__ = ("_ids",)

    def __init__(self, ids: list[int]):
        self._ids = ids

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i):
        return self._ids[i]  # a slice of a list is a new list

    def __iter__(self):
        return iter(self._ids)

    def __eq__(self, other) -> bool:
        if isinstance(other, (list, tuple, TokenView)):
            return len(self) == len(other) and all(a == b for a, b in zip(self._ids, other))
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"TokenView({self._ids!r})"


# llama-cpp-python's keywords this API does not act on, with the value at which they change
# nothing: code that passes its full argument list works; a value that would change the
# output is refused by name rather than ignored.
_OFF = {"logprobs": None, "suffix": None,
        "tfs_z": 1.0,
        "logits_processor": None, "stopping_criteria": None, "top_logprobs": None, "functions": None,
        "function_call": None, "response_format": None}
_ANY = ("model", "user")  # a name


class CallableCount(int):
    """An int that is also llama-cpp-python's method of the same name: `model.n_ctx` is the
    context, and `model.n_ctx()`, as llama-cpp-python code calls it, too."""

    def __call__(self) -> int:
        return int(self)


class NotOffered(StepstreamError, AttributeError):
    """A llama-cpp-python method stepstream does not have (hasattr() is False, as for any other)."""


_NOT_OFFERED = {
    "create_embedding": "stepstream does not compute embeddings (Step-3.5 is a generative model; "
                        "llama-cpp-python too needs embedding=True, which runtime.load refuses)",
    "embed": "stepstream does not compute embeddings",
    "set_cache": "the model keeps its KV cache between calls and reuses its longest shared prefix",
}


def _not_offered(name: str):
    raise NotOffered(f"{name}: {_NOT_OFFERED[name]}")


def _flag(name: str, value) -> bool:
    """A boolean option, as llama-cpp-python takes it: True/False, or 0/1."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    raise StepstreamError(f"{name} must be True or False, got {value!r}")


def _temp(sampling: dict) -> dict:
    """llama-cpp-python's `temp` is `temperature`; its other keywords are dropped where they are
    off (_OFF) and refused where they are not."""
    if "temp" in sampling:
        if "temperature" in sampling:
            raise UnknownOption("give temperature or temp (llama-cpp-python's name for it), not both")
        sampling["temperature"] = sampling.pop("temp")
    if "mirostat_mode" in sampling:  # llama-cpp-python's name
        if "mirostat" in sampling:
            raise UnknownOption("give mirostat or mirostat_mode (llama-cpp-python's name for it), not both")
        sampling["mirostat"] = sampling.pop("mirostat_mode")
    t = sampling.get("temperature")
    if isinstance(t, numbers.Real) and not isinstance(t, bool) and t < 0:
        # llama-cpp-python's temp < 0: a draw from the model's whole distribution (softmax and
        # dist, no filter), where 0 is greedy
        sampling.update(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    for name in _ANY:
        sampling.pop(name, None)
    for name, off in _OFF.items():
        if name not in sampling:
            continue
        value = sampling.pop(name)
        if name == "response_format" and value in ({"type": "text"},):
            continue
        if name in ("logprobs", "top_logprobs") and value is False:  # a chat's logprobs: a bool, False is off
            continue
        if value != off or type(value) is bool and type(off) is not bool:
            raise StepstreamError(f"{name}={value!r:.80} is not supported by the Python API (only {off!r}, which "
                                  "changes nothing)" + ("; `stepstream serve` returns log-probabilities"
                                                        if name in ("logprobs", "top_logprobs") else ""))
    return sampling


def _grammar(grammar):
    """The compiled grammar of a `grammar` keyword (GBNF text, or a LlamaGrammar), or None."""
    if grammar is None:
        return None
    from runtime.text.gbnf_grammar import compile_grammar

    return compile_grammar(grammar)


def _json_mode(response_format) -> tuple[bool, object]:
    """(JSON mode, a compiled schema) from `response_format`: None or {"type": "text"} (off),
    {"type": "json_object"} (JSON mode), llama-cpp-python's {"type": "json_object", "schema": S}
    and OpenAI's {"type": "json_schema", "json_schema": {"schema": S}} (the schema's grammar)."""
    from runtime.text.json_schema import JsonSchemaGrammar, grammar_for

    if response_format is None:
        return False, None
    kind = response_format.get("type", "text") if isinstance(response_format, dict) else None
    if kind == "text" or (kind == "json_object" and response_format.get("schema") is None):
        return kind == "json_object", None
    if kind == "json_object":
        return False, JsonSchemaGrammar(response_format["schema"])
    if kind == "json_schema":
        return False, grammar_for(response_format)
    raise StepstreamError(f"response_format={response_format!r:.80} is not supported: {{'type': 'text'}}, "
                          "{'type': 'json_object'} and {'type': 'json_schema', ...} are")


def _chat_logprobs_k(logprobs, top_logprobs, vocab: int) -> int | None:
    """A chat's `logprobs` (bool) and `top_logprobs` (alternatives, 0..vocab) as the request's k:
    None when no log-probabilities are asked for. OpenAI's rules: top_logprobs needs logprobs
    true; logprobs true alone reports the sampled tokens with no alternatives."""
    if logprobs is not None and not isinstance(logprobs, bool):
        raise StepstreamError(f"logprobs must be True, False or None in a chat completion, got {logprobs!r:.80}")
    if top_logprobs is not None and (isinstance(top_logprobs, bool) or not isinstance(top_logprobs, numbers.Integral)
                                     or not 0 <= top_logprobs <= vocab):
        raise StepstreamError(f"top_logprobs must be None or an integer 0..{vocab}, got {top_logprobs!r:.80}")
    if not logprobs:
        if top_logprobs:
            raise StepstreamError("top_logprobs needs logprobs=True")
        return None
    return int(top_logprobs or 0)


def _reasoning_budget(budget, effort) -> int | None:
    """create_chat_completion's `reasoning_budget` (tokens; None or -1 no limit) or, when that is
    None, `reasoning_effort` ("none", "low", ...: runtime.generation.reasoning_budget)."""
    by_effort = effort_budget(effort)  # checked even beside a budget
    if budget is None:
        return by_effort
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < -1:
        raise StepstreamError(f"reasoning_budget must be an integer >= 0 (tokens), or None or -1 for no limit, "
                              f"got {budget!r:.80}")
    return None if budget == -1 else int(budget)


def _no_limit(max_tokens):
    """llama-cpp-python's completion calls: max_tokens <= 0 means no limit (None); other values,
    wrong types included, go on to generate's checks."""
    if isinstance(max_tokens, numbers.Integral) and not isinstance(max_tokens, bool) and max_tokens <= 0:
        return None
    return max_tokens


def _stops(stop) -> list[str]:
    """The stop strings: None, one string, or a list or tuple of strings (as llama-cpp-python)."""
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise StepstreamError(f"stop must be a string or a list of strings, got {stop!r:.80}")
    return list(stop)
