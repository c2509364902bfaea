"""The JSON bodies of /v1/completions and /v1/chat/completions, checked field by field.

Every problem is an ApiError with the HTTP status, a one-line message naming the field and
the value, and OpenAI's error `type`/`code`, so a client library raises its usual exception.
Nothing here touches the model except the tokenizer and the context size: a request is
refused before it is queued.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from runtime.base.errors import StepstreamError
from runtime.generation.reasoning_budget import EFFORT_BUDGETS, OPENAI_EFFORTS, effort_budget
from runtime.generation.sampling import SamplingParams
from runtime.text.chat_template import ROLES
from runtime.server.body_fields import ApiError, _get, _range, _type_name
from runtime.server.llama_fields import _logit_bias, llama_grammar, llama_json_schema, llama_samplers
from runtime.text.json_schema import grammar_for
from runtime.text.tool_calls import ToolSpecError, check_tools

MAX_STOPS = 4  # as OpenAI
MAX_TOP_LOGPROBS = 20  # chat: top_logprobs 0..20, as OpenAI
MAX_COMPLETION_LOGPROBS = 5  # completions: logprobs 0..5, as OpenAI
MAX_SEED = 2**63 - 1
MAX_CHOICES = 128  # n: OpenAI's limit
MAX_BEST_OF = 20  # completions' best_of: OpenAI's limit


@dataclass(frozen=True)
class Common:
    """The fields both endpoints share."""

    max_tokens: int | None
    params: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool = False  # vLLM's and llama-server's: generate on past the end of text
    json_object: bool = False  # response_format {"type": "json_object"}: the reply is one JSON object
    grammar: object = None  # response_format {"type": "json_schema"}, `json_schema` or `grammar`: compiled
    # reasoning tokens before </think> is forced: -1 no limit, None the server's --reasoning-budget
    reasoning_budget: int | None = None
    bias_texts: tuple = ()  # llama-server's logit_bias texts: (text, bias), for each of the text's tokens
    n: int = 1  # choices per prompt (OpenAI's `n`, llama-server's `n_cmpl`), generated one after the other

    @property
    def structured(self) -> bool:
        return self.json_object or self.grammar is not None


@dataclass(frozen=True)
class CompletionBody:
    prompts: list[str | list[int]]  # common.n choices each, in order
    common: Common
    logprobs: int | None
    echo: bool
    best_of: int = 1  # choices generated per prompt, of which the common.n likeliest are sent


@dataclass(frozen=True)
class ChatBody:
    messages: list[dict]
    tools: list[dict] | None
    tool_choice: str | dict
    common: Common
    logprobs: int | None  # None, or how many alternatives (top_logprobs)
    continue_final: bool  # a last assistant message is continued (llama-server's prefill), not closed
    max_calls: int | None  # 1 for parallel_tool_calls false: the reply ends at its first call


def check_model(body: dict, served: str) -> None:
    name = _get(body, "model", (str,))
    if name is not None and name != served:
        raise ApiError(404, f"the model '{name}' does not exist; this server serves '{served}'", param="model",
                       code="model_not_found")


def _max_tokens(body: dict, default: int | None) -> int | None:
    """OpenAI's max_completion_tokens, or the max_tokens it replaces, or llama-server's n_predict
    (-1: no limit, to the end of the context); the first of them, in that order, that the body
    holds, named by a refusal. The newer name wins, as in vLLM: a client that sets it while a
    wrapper fills in max_tokens gets the limit it asked for."""
    for name in ("max_completion_tokens", "max_tokens", "n_predict"):
        v = _get(body, name, (int,))
        if v is None:
            continue
        if name == "n_predict" and v == -1:
            return None
        if name == "n_predict" and v == 0:  # llama-server's: the prompt evaluated into the cache, no token
            return 0
        if v < 1:
            need = "-1 (no limit), 0 (the prompt alone) or more" if name == "n_predict" else "at least 1"
            raise ApiError(400, f"'{name}' must be {need}, got {v}", param=name, code="invalid_value")
        return v
    return default


def response_format(fmt: dict | None) -> tuple[bool, object]:
    """`response_format` -> (json_object, the compiled schema or None)."""
    kind = "text" if fmt is None else fmt.get("type", "text")
    if kind == "json_schema":
        try:
            return False, grammar_for(fmt)
        except StepstreamError as e:
            raise ApiError(400, f"'response_format': {e}", param="response_format", code="unsupported") from None
    if kind not in ("text", "json_object") or (fmt and kind == "json_object" and fmt.get("schema") is not None):
        what = "a schema (send type json_schema)" if kind == "json_object" else json.dumps(kind)
        raise ApiError(400, f"'response_format' with {what} is not supported (\"text\", \"json_object\" and "
                            "\"json_schema\" are)", param="response_format", code="unsupported")
    return kind == "json_object", None


def _common(body: dict, default_max_tokens: int | None, max_stops: int = MAX_STOPS) -> Common:
    max_tokens = _max_tokens(body, default_max_tokens)
    n_cmpl = _get(body, "n_cmpl", (int,))  # llama-server's name, read before OpenAI's `n`
    _range("n_cmpl", n_cmpl, 1, MAX_CHOICES)
    n = n_cmpl if n_cmpl is not None else _get(body, "n", (int,), 1)
    _range("n", n, 1, MAX_CHOICES)
    temperature = _get(body, "temperature", (int, float), 1.0)
    _range("temperature", temperature, 0, 2)
    top_p = _get(body, "top_p", (int, float), 1.0)
    _range("top_p", top_p, 0, 1)  # 0 keeps only the most likely token, as OpenAI and llama-server allow
    seed = _get(body, "seed", (int,))
    _range("seed", seed, -MAX_SEED - 1, MAX_SEED)
    seed = None if seed is not None and seed < 0 else seed  # llama-server's -1 (its default): a random seed
    penalties = {}
    for name in ("presence_penalty", "frequency_penalty"):  # OpenAI's range; over repeat_last_n tokens, as llama-server
        value = _get(body, name, (int, float), 0)
        _range(name, value, -2, 2)  # (before float(): an integer of 400 digits overflows it)
        penalties[name] = float(value)
    bias, bias_texts = _logit_bias(body)
    json_object, grammar = response_format(_get(body, "response_format", (dict,)))
    schema = llama_json_schema(body)
    if schema is not None:
        if json_object or grammar is not None:
            raise ApiError(400, "give 'response_format' or llama-server's 'json_schema', not both", param="json_schema",
                           code="invalid_value")
        grammar = schema
    gbnf = llama_grammar(body)
    if gbnf is not None:
        if json_object or grammar is not None:
            other = "'json_schema'" if schema is not None else "'response_format'"
            raise ApiError(400, f"give {other} or llama-server's 'grammar', not both", param="grammar",
                           code="invalid_value")
        grammar = gbnf
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > max_stops or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, f"'stop' must be a string or a list of at most {max_stops} strings", param="stop",
                       code="invalid_value")
    stop = [s for s in stop if s]  # an empty stop string would end every reply at once: llama-server skips it
    stream = _get(body, "stream", (bool,), False)
    if body.get("stream_options") is not None and not stream:  # as OpenAI and vLLM answer
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options",
                       code="invalid_value")
    options = _get(body, "stream_options", (dict,), {})
    modalities = _get(body, "modalities", (list,), ["text"])
    if any(m != "text" for m in modalities):  # refused, not ignored: an audio reply would silently be text
        raise ApiError(400, f"'modalities' {json.dumps(modalities)[:80]} is not supported (only [\"text\"])",
                       param="modalities", code="unsupported")
    for name, what in (("audio", "audio output"), ("web_search_options", "web search")):
        if body.get(name) is not None:
            raise ApiError(400, f"'{name}' ({what}) is not supported", param=name, code="unsupported")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(400, "'stream_options.include_usage' must be a boolean", param="stream_options",
                       code="invalid_type")
    # OpenAI's sampling is temperature and top_p alone: top-k, min-p and the repeat penalty are off
    # unless a request sets them (llama-server's fields, which its clients send).
    top_k = _get(body, "top_k", (int,), 0)
    _range("top_k", top_k, -2**31, 2**31 - 1)
    top_k = max(top_k, 0)  # 0 and below: off (vLLM's clients send -1, llama-server reads <= 0 as off)
    min_p = _get(body, "min_p", (int, float), 0.0)
    _range("min_p", min_p, 0, 1)
    repeat_penalty = _get(body, "repeat_penalty", (int, float), 1.0)
    _range("repeat_penalty", repeat_penalty, 0.01, 100)  # 1: off
    repeat_last_n = _get(body, "repeat_last_n", (int,), 64)
    _range("repeat_last_n", repeat_last_n, -1, 2**31 - 1)
    repeat_last_n = 2**31 - 1 if repeat_last_n == -1 else repeat_last_n  # llama-server's -1: the whole context
    if _get(body, "min_tokens", (int,), 0):  # vLLM's: refused, not ignored
        raise ApiError(400, "'min_tokens' is not supported (only 0)", param="min_tokens", code="unsupported")
    params = SamplingParams(temperature=float(temperature), top_k=top_k, top_p=float(top_p), min_p=float(min_p),
                            repeat_penalty=float(repeat_penalty), repeat_last_n=repeat_last_n, seed=seed,
                            logit_bias=bias, **llama_samplers(body), **penalties)
    return Common(max_tokens, params, tuple(stop), stream, include_usage, _get(body, "ignore_eos", (bool,), False),
                  json_object=json_object, grammar=grammar, bias_texts=bias_texts, n=n)


def choice_params(params: SamplingParams, j: int) -> SamplingParams:
    """The sampling of a request's choice j: a seed given is the first choice's, and each later
    choice's is the next one (choices that differ, each reproducible), wrapping within 0..MAX_SEED."""
    return params if params.seed is None or j == 0 else replace(params, seed=(params.seed + j) % (MAX_SEED + 1))


def _no_best_of(body: dict) -> None:
    v = _get(body, "best_of", (int,), 1)
    if v != 1:
        raise ApiError(400, f"'best_of' is a field of /v1/completions; here it must be 1, got {v}", param="best_of",
                       code="invalid_value")


def _is_ids(v) -> bool:
    return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def _prompts(body: dict) -> list[str | list[int]]:
    """OpenAI's four shapes of `prompt`: a string, a list of strings, a list of token ids, a list
    of lists of token ids. A list of strings or of id lists is one prompt each (a client
    library sends one prompt as a list of one)."""
    prompt = _get(body, "prompt", (str, list), required=True)
    if isinstance(prompt, str) or (prompt and _is_ids(prompt)):
        prompts = [prompt]
    elif prompt and all(isinstance(p, str) for p in prompt) or prompt and all(_is_ids(p) for p in prompt):
        prompts = list(prompt)
    else:
        raise ApiError(400, "'prompt' must be a string, an array of strings, an array of token ids or an array of "
                            "arrays of token ids, none of them empty", param="prompt", code="invalid_value")
    for i, p in enumerate(prompts):
        if not p:
            where = "'prompt'" if len(prompts) == 1 and prompts[0] is prompt else f"'prompt[{i}]'"
            raise ApiError(400, f"{where} must not be empty", param="prompt", code="invalid_value")
    return prompts


def completion_body(body: dict) -> CompletionBody:
    prompts = _prompts(body)
    logprobs = _get(body, "logprobs", (int,))
    _range("logprobs", logprobs, 0, MAX_COMPLETION_LOGPROBS)
    if logprobs is not None and _get(body, "echo", (bool,), False):
        raise ApiError(400, "'echo' with 'logprobs' (the prompt's log-probabilities) is not supported",
                       param="echo", code="unsupported")
    if _get(body, "suffix", (str,)) is not None:
        raise ApiError(400, "'suffix' (fill in the middle) is not supported", param="suffix", code="unsupported")
    common = _common(body, 16)
    best_of = _get(body, "best_of", (int,))
    _range("best_of", best_of, 1, MAX_BEST_OF)
    best_of = common.n if best_of is None else best_of
    if best_of < common.n:
        raise ApiError(400, f"'best_of' ({best_of}) must be at least 'n' ({common.n}): it is how many choices are "
                            "generated, of which the n likeliest are sent", param="best_of", code="invalid_value")
    if best_of > common.n and common.stream:  # as OpenAI: the likeliest are known only at the end
        raise ApiError(400, "'best_of' above 'n' cannot be streamed: the likeliest choices are known only once all "
                            "are generated", param="best_of", code="unsupported")
    return CompletionBody(prompts, common, logprobs, _get(body, "echo", (bool,), False), best_of)


def _content_problem(content, where: str) -> tuple[str, str, str] | None:
    """(message, param, code) when a message's content is not a string, null or a list of text parts."""
    if content is None or isinstance(content, str):
        return None
    if not isinstance(content, list):
        return (f"{where}.content must be a string, null or a list of text parts ({{'type': 'text', 'text': ...}}), "
                f"got {_type_name(content)}", f"{where}.content", "invalid_type")
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text" and isinstance(p.get("text"), str):
            continue
        if isinstance(kind, str) and kind != "text":  # image_url, input_audio, file, ...
            return (f"{where}.content[{j}] is a {json.dumps(kind)[:40]} part: this model reads text parts only",
                    f"{where}.content[{j}]", "unsupported")
        return (f"{where}.content[{j}] must be a text part ({{'type': 'text', 'text': ...}})", f"{where}.content[{j}]",
                "invalid_value")
    return None


def chat_body(body: dict) -> ChatBody:
    messages = _get(body, "messages", (list,), required=True)
    if not messages:
        raise ApiError(400, "'messages' must hold at least one message", param="messages", code="invalid_value")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object, got {_type_name(m)}", param=where, code="invalid_type")
        if m.get("role") not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {json.dumps(m.get('role'))}",
                           param=f"{where}.role", code="invalid_value")
        problem = _content_problem(m.get("content"), where)
        if problem is not None:
            raise ApiError(400, problem[0], param=problem[1], code=problem[2])
        calls = m.get("tool_calls")
        if calls is not None and (m["role"] != "assistant" or not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("function"), dict)
                and isinstance(c["function"].get("name"), str) for c in calls)):
            raise ApiError(400, f"{where}.tool_calls must be a list of {{'function': {{'name': ..., 'arguments': ...}}}} "
                                "on an assistant message", param=f"{where}.tool_calls", code="invalid_value")
    for name, now in (("functions", "tools"), ("function_call", "tool_choice")):  # OpenAI's deprecated forms
        if body.get(name) is not None:
            raise ApiError(400, f"'{name}' (deprecated by OpenAI) is not supported; send '{now}' instead",
                           param=name, code="unsupported")
    tools = _get(body, "tools", (list,))
    tool_choice = _get(body, "tool_choice", (str, dict), "auto")
    try:
        check_tools(tools, tool_choice)
    except ToolSpecError as e:
        raise ApiError(400, str(e), param=e.param, code="invalid_value") from None
    logprobs = None
    if _get(body, "logprobs", (bool,), False):
        logprobs = _get(body, "top_logprobs", (int,), 0)
        _range("top_logprobs", logprobs, 0, MAX_TOP_LOGPROBS)
    elif _get(body, "top_logprobs", (int,)) is not None:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
    # OpenAI's "developer" role is the system prompt of newer models: the template knows "system"
    messages = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
    # a last assistant message is the start of the reply (llama-server's default; vLLM's
    # continue_final_message), unless the request says false
    continue_final = _get(body, "continue_final_message", (bool,), True)
    max_calls = None if _get(body, "parallel_tool_calls", (bool,), True) else 1
    _no_best_of(body)
    common = replace(_common(body, None), reasoning_budget=reasoning_budget(body))
    if common.structured and tools and tool_choice != "none":
        if body.get("grammar"):
            raise ApiError(400, "'grammar' goes without 'tools' (or with 'tool_choice': \"none\"): the reply must "
                                "match the grammar, with no room for a tool call's markup", param="grammar",
                           code="unsupported")
        field = "json_schema" if body.get("json_schema") is not None else "response_format"
        what = "'json_schema'" if field == "json_schema" else "'response_format' json_object or json_schema"
        raise ApiError(400, f"{what} goes without 'tools' (or with 'tool_choice': \"none\"): the reply must be JSON, "
                            "with no room for a tool call's markup", param=field, code="unsupported")
    return ChatBody(messages, tools, tool_choice, common, logprobs, continue_final, max_calls)


BUDGET_FIELDS = ("thinking_budget_tokens", "reasoning_budget_tokens")  # llama-server's names (trees differ)


def reasoning_budget(body: dict) -> int | None:
    """A chat request's reasoning budget: llama-server's `thinking_budget_tokens` (or
    `reasoning_budget_tokens`; -1 no limit), else what an OpenAI `reasoning_effort` stands for
    (runtime.generation.reasoning_budget), else None: the server's --reasoning-budget."""
    effort_field = "reasoning_effort"
    given = {name: _get(body, name, (int,)) for name in BUDGET_FIELDS}
    given = {name: v for name, v in given.items() if v is not None}
    for name, v in given.items():
        _range(name, v, -1, 2**31 - 1)
    if len(set(given.values())) > 1:
        raise ApiError(400, f"'{BUDGET_FIELDS[0]}' and '{BUDGET_FIELDS[1]}' differ: send one", param=BUDGET_FIELDS[1],
                       code="invalid_value")
    try:  # checked even beside a budget, which goes before it
        by_effort = effort_request(_get(body, effort_field, (str,)), OPENAI_EFFORTS)
    except StepstreamError as e:
        raise ApiError(400, f"'{effort_field}': {e}", param=effort_field, code="invalid_value") from None
    return next(iter(given.values())) if given else by_effort


def effort_request(effort, allowed=tuple(EFFORT_BUDGETS)) -> int | None:
    """An effort level as Common.reasoning_budget: None (none given), -1 (no limit) or a budget."""
    budget = effort_budget(effort, allowed)
    return None if effort is None else (-1 if budget is None else budget)


def sampling_error(e: StepstreamError) -> ApiError:
    return ApiError(400, str(e), code="invalid_value")
