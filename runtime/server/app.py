"""The HTTP side of `stepstream serve`: OpenAI's routes over one Engine, as a FastAPI app.

    GET  /health                 no key needed: {"status": "ok", ...}
    GET  /v1/models              (also /models, and /chat/completions, /v1/health: llama-server's aliases)
    GET  /v1/models/{id}         the served model; any other id is a 404
    POST /v1/completions         text in, text out (streaming or whole)
    POST /v1/chat/completions    messages in (chat template, tools), content / reasoning / tool calls out
    POST /v1/responses           OpenAI's Responses API over the same chat turn (runtime.server.agent_routes);
    GET, DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items   the responses kept in memory
    POST /v1/messages            Anthropic's Messages API over the same chat turn (runtime.server.agent_routes)
    POST /v1/messages/count_tokens
    POST /tokenize, /detokenize, /apply-template; GET /props, /metrics   llama-server's (runtime.server.llama_routes)
    POST /completion, /completions                                       llama-server's (runtime.server.native_completion)
    GET /slots, POST /slots/0?action=save|restore|erase                  llama-server's (runtime.server.slots)
    GET /                        a chat page (runtime.server.webui_routes), unless webui is False

Handlers check the body (runtime.server.requests), render and tokenize the prompt, queue a
job on the engine, and turn its steps into OpenAI responses (runtime.generation.replies); they
never touch the model's cache. Every refusal is an OpenAI error body with a 4xx status; a
full queue is a 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass, replace

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from runtime.base.errors import PromptTooLong, StepstreamError
from runtime.generation.request import Request as ModelRequest
from runtime.generation.request import merge
from runtime.server.engine import Busy, Engine, Job
from runtime.server.agent_routes import add_agent_routes
from runtime.server.llama_routes import add_llama_routes
from runtime.server.native_completion import add_native_completion
from runtime.server.body_fields import ApiError, parse_json
from runtime.server.llama_fields import add_bias
from runtime.server.requests import chat_body, check_model, choice_params, completion_body
from runtime.server.messages_api import AnthropicError
from runtime.server.response_store import CAPACITY, ResponseStore
from runtime.server.slots import add_slot_routes
from runtime.server.webui_routes import add_webui_routes
from runtime.generation.replies import ChatReply, TextReply, timings_of, usage_sum
from runtime.text.tool_calls import END_THINK, ReplyStream, callable_tools, forced_call, starts_in_reasoning
from runtime.text.tool_grammar import AutoToolGrammar, ToolCallGrammar

MAX_BODY = 8 * 2**20  # bytes: far more than any prompt the context can hold
POLL_S = 0.25  # how often a whole-response handler checks that its client is still there
PING_S = 10.0  # a stream with nothing to send for this long sends a keep-alive (Anthropic's ping)


class ClientGone(Exception):
    pass


_DONE = "data: [DONE]\n\n"


def _data(event: dict) -> str:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


@dataclass
class Turn:
    """A chat turn ready to generate: the prompt's ids and the requests of its choices (one each:
    a request keeps its reply's state), how the reply starts."""

    ids: list[int]
    reqs: list[ModelRequest]
    in_reasoning: bool
    forced: str  # the start of a forced call the prompt ends with
    tools: list[dict] | None  # the tools a call may name

    @property
    def req(self) -> ModelRequest:
        return self.reqs[0]


def create_app(engine: Engine, *, model_name: str, api_key: str | None = None, max_body: int = MAX_BODY,
               stored_responses: int = CAPACITY, reasoning_budget: int = -1, reasoning_message: str = "",
               metrics: bool = False, reasoning_field: str = "reasoning_content", slot_save_path=None,
               slots: bool = True, webui: bool = True) -> FastAPI:
    """stored_responses: how many Responses API responses are kept for `previous_response_id`.
    reasoning_field: a chat completion's reasoning as `reasoning_content`, `reasoning` or both.
    reasoning_budget: the reasoning tokens of a chat reply before its `</think>` is forced, for
    requests that set none (-1: no limit), with `reasoning_message` written before it.
    metrics: serve GET /metrics (llama-server's --metrics). slot_save_path: the directory of
    POST /slots/0?action=save|restore (None: refused); slots: serve GET /slots (runtime.server.slots);
    webui: serve the chat page at GET /."""
    if api_key is not None and not api_key:  # a missing header's empty token would match it
        raise StepstreamError("an empty API key would admit every request; give a key, or None for no key")

    model = engine.model
    app = FastAPI(title="stepstream", docs_url=None, redoc_url=None, openapi_url=None)
    # a web page from any origin may call it, as llama-server allows (the API key still guards
    # the routes; a browser's preflight OPTIONS carries none and is answered here)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
    created = int(time.time())
    store = ResponseStore(stored_responses)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, e: ClientGone):
        return Response(status_code=499)  # nobody reads it: nginx's code for a client that closed the request

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        error = ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind=kind)
        if request.url.path.startswith("/v1/messages"):  # Anthropic's clients read Anthropic's shape
            error = AnthropicError.of(error)
        return JSONResponse(error.body(), status_code=e.status_code)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        # Anthropic's clients send the key as x-api-key (and may send a stale Bearer token beside it)
        tokens = [given[7:] if given[:7].lower() == "bearer " else "", request.headers.get("x-api-key", "")]
        if not any(hmac.compare_digest(t.encode(), api_key.encode()) for t in tokens):
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY' or 'x-api-key: KEY')",
                           kind="authentication_error", code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > max_body:
            raise ApiError(413, f"the request body is {int(size)} bytes; the limit is {max_body}", code="body_too_large")
        parts, n = [], 0
        async for part in request.stream():
            n += len(part)
            if n > max_body:
                raise ApiError(413, f"the request body is over the limit of {max_body} bytes", code="body_too_large")
            parts.append(part)
        try:
            return parse_json(b"".join(parts))
        except RecursionError:
            raise ApiError(400, "the request body nests too deeply", code="invalid_json") from None

    async def body_of(request: Request, parse):
        """A completion route's body: the key checked, the JSON read, the model named, the fields parsed."""
        authorize(request)
        body = await read_json(request)
        check_model(body, model_name)
        return parse(body)

    def model_request(ids: list[int], common, logprobs, field: str, in_reasoning: bool = False,
                      chat: bool = False, choice: int = 0) -> ModelRequest:
        """`field`: the body's field the prompt came from ("prompt" or "messages"), named by a refusal.
        `chat`: a chat turn, whose reasoning the budget bounds (a text completion's is its own).
        `choice`: which of the request's choices (its seed: requests.choice_params)."""
        if len(ids) > model.n_ctx:  # a prompt that fills it still gets one token, as `run` and the library give
            raise ApiError(400, f"the prompt is {len(ids)} tokens, more than the context of {model.n_ctx} "
                                "(start the server with a larger --ctx-size, or shorten the prompt)",
                           param=field, code="context_length_exceeded", detail={"tokens": len(ids), "limit": model.n_ctx})
        params = common.params
        if common.bias_texts:  # llama-server's: each token of the text biased (added up, as llama.cpp adds them)
            merged = dict(params.logit_bias)
            for text, value in common.bias_texts:
                for t in model.tokenize(text, add_bos=False, special=False):
                    merged[t] = add_bias(merged.get(t, 0.0), value)
            params = replace(params, logit_bias=tuple(sorted(merged.items())))
            common = replace(common, params=params)
        far = [t for t, _ in common.params.logit_bias if t >= model.cfg.vocab]
        if far:
            raise ApiError(400, f"'logit_bias' names token {far[0]}, outside the vocabulary (0..{model.cfg.vocab - 1})",
                           param="logit_bias", code="invalid_value")
        room = model.n_ctx - len(ids) + 1  # the last token is sampled, never evaluated: it needs no position
        budget = -1 if not chat else reasoning_budget if common.reasoning_budget is None else common.reasoning_budget
        limit = room if common.max_tokens is None else min(common.max_tokens, room)  # (0: the prompt alone)
        return ModelRequest(ids, choice_params(common.params, choice), limit, common.stop, logprobs,
                            ignore_eos=common.ignore_eos, json_object=common.json_object, grammar=common.grammar,
                            in_reasoning=in_reasoning, reasoning_budget=None if budget < 0 else budget,
                            reasoning_message=reasoning_message)

    def submit(req: ModelRequest | list[ModelRequest], stream: bool) -> Job | list[Job]:
        """A request's job; or, given a list (a request's choices), their jobs, queued as one."""
        try:
            return engine.submit_group(req, stream) if isinstance(req, list) else engine.submit(req, stream)
        except Busy:
            raise ApiError(503, f"the server is busy: {engine.queue_size} requests are waiting; retry shortly",
                           kind="server_error", code="server_busy", headers={"Retry-After": "1"}) from None

    async def events(job: Job, request: Request | None, merged: bool = True, idle_s: float | None = None):
        """The job's steps, those that came together merged into one (unless not `merged`); with
        `request`, polls it and cancels the job if its client left; with `idle_s`, None after
        each idle_s seconds without a step (a stream's keep-alive)."""
        while True:
            if request is None and idle_s is not None:
                try:
                    batch = await asyncio.wait_for(job.next_events(), idle_s)
                except asyncio.TimeoutError:
                    yield None
                    continue
            elif request is None:
                batch = await job.next_events()
            else:
                try:
                    batch = await asyncio.wait_for(job.next_events(), POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel.set()
                        raise ClientGone from None
                    continue
            steps = [step for kind, value in batch if kind in ("step", "steps")
                     for step in (value if kind == "steps" else (value,))]
            if steps and merged:
                yield merge(steps)
            elif steps:
                for step in steps:
                    yield step
            for kind, value in batch:
                if kind == "error":
                    status, code, message = value
                    raise ApiError(status, message, kind="server_error", code=code)
                if kind == "done":
                    return

    async def watch(jobs: list[Job], request: Request) -> None:
        """Cancel the jobs the moment their client disconnects (not at the next write)."""
        while not jobs[-1].cancel.is_set():
            message = await request.receive()
            if message["type"] == "http.disconnect":
                for job in jobs:
                    job.cancel.set()

    def sse(jobs: Job | list[Job], request: Request, to_frames, end, failed, head: str = "", merged: bool = True,
            ping: str = "", job_end: list | None = None) -> StreamingResponse:
        """A job's steps as server-sent events: `head` at once, `to_frames(step)` for each step,
        `end()` after the last, `failed(ApiError)` when the generation fails; `ping` every PING_S
        seconds without a step (a long prompt's evaluation), so a client's idle timeout does
        not give up on it. Given a list of jobs (a request's choices), `to_frames` is a list too,
        one for each, and the jobs' steps follow one another, each job's followed by its
        `job_end[k]()` when given (what a choice's end says, once its timings are whole)."""
        if isinstance(jobs, Job):
            jobs, to_frames = [jobs], [to_frames]

        async def body():
            watcher = asyncio.create_task(watch(jobs, request))
            try:
                if head:
                    yield head
                try:
                    for k, (job, frames) in enumerate(zip(jobs, to_frames)):
                        async for step in events(job, None, merged, PING_S if ping else None):
                            text = frames(step) if step is not None else ping
                            if text:
                                yield text
                        if job_end is not None:
                            yield job_end[k]()
                    yield end()
                except ApiError as e:
                    yield failed(e)
            finally:  # done, or the client went away: a running generation stops within one token
                for job in jobs:
                    job.cancel.set()
                watcher.cancel()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def chunks_sse(jobs: list[Job], request: Request, to_chunks: list, usage_chunk, include_usage: bool):
        """The chat and completion streams of a request's choices: data-only events, ending in
        `data: [DONE]`."""
        return sse(jobs, request, [lambda step, f=f: "".join(map(_data, f(step))) for f in to_chunks],
                   lambda: (_data(usage_chunk()) if include_usage else "") + _DONE,
                   lambda e: _data(e.body()) + _DONE)

    async def whole(jobs: Job | list[Job], request: Request, collect, merged: bool = True) -> None:
        """Feed a job's steps to `collect`; given a list of jobs, `collect` is a list too."""
        if isinstance(jobs, Job):
            jobs, collect = [jobs], [collect]
        try:
            for job, take in zip(jobs, collect):
                async for step in events(job, request, merged):
                    take(step)
        finally:
            for job in jobs:
                job.cancel.set()

    def usage_chunk(replies: list, reqs: list[ModelRequest], per_prompt: int):
        """A stream's last chunk, the usage of all its choices."""
        def chunk():
            parts = [(r.n_prompt, q.timings) for r, q in zip(replies, reqs)]
            return replies[0]._envelope([], usage=usage_sum(parts, per_prompt), timings=timings_of([q.timings for q in reqs]))
        return chunk

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: uptime probes
    @app.api_route("/v1/health", methods=["GET", "HEAD"])  # (llama-server serves both)
    async def health():
        broken = model.file.problem()  # the file changed under the map: every request would fail
        if broken is not None:
            return JSONResponse(status_code=503, content={
                "status": "error", "model": model_name, "error": f"{broken}: restart the server to load it again"})
        return {"status": "ok", "model": model_name, "busy": engine.busy, "waiting": engine.waiting,
                "served": engine.served}

    served = {"id": model_name, "object": "model", "created": created, "owned_by": "stepstream",
              "meta": {"n_ctx": model.n_ctx, "n_vocab": model.cfg.vocab}}

    @app.get("/v1/models")
    @app.get("/models")  # llama-server's routes without /v1, for a client given the bare address
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [served]}

    @app.get("/v1/models/{model_id:path}")  # :path, as an alias may hold a slash ("org/name")
    async def model_info(model_id: str, request: Request):
        authorize(request)
        if model_id != model_name:
            raise ApiError(404, f"the model '{model_id}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")  # as OpenAI answers
        return served

    def too_long(e: PromptTooLong, field: str) -> ApiError:
        return ApiError(400, f"the prompt is at least {e.at_least} tokens ({e.n_bytes} bytes of text), more than the "
                             f"context of {model.n_ctx} (start the server with a larger --ctx-size, or shorten the prompt)",
                        param=field, code="context_length_exceeded", detail={"tokens": e.at_least, "limit": model.n_ctx})

    async def prompt_ids(prompt: str | list[int], where: str) -> list[int]:
        if isinstance(prompt, str):  # on a thread: a long prompt must not stall other streams
            try:  # one that cannot fit is refused before the seconds tokenizing it would take
                model.tokenizer.check_fits(prompt, model.n_ctx)
            except PromptTooLong as e:
                raise too_long(e, "prompt") from None
            return await asyncio.to_thread(model.tokenize, prompt, add_bos=True, special=True)
        bad = [t for t in prompt if not 0 <= t < model.cfg.vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} in '{where}' is outside the vocabulary (0..{model.cfg.vocab - 1})",
                           param="prompt", code="invalid_value")
        return list(prompt)

    @app.post("/v1/completions")
    async def completions(request: Request):
        b = await body_of(request, completion_body)
        many, per = len(b.prompts) > 1, b.best_of  # best_of (n unless given) choices of each prompt
        # best_of above n weighs each choice by its tokens' log-probabilities
        k = 0 if b.logprobs is None and per > b.common.n else b.logprobs
        reqs, replies, cid = [], [], f"cmpl-{uuid.uuid4().hex}"
        for i, p in enumerate(b.prompts):  # every prompt is checked before the first is queued
            ids = await prompt_ids(p, f"prompt[{i}]" if many else "prompt")
            prompt = p if isinstance(p, str) else model.detokenize(ids).decode("utf-8", "replace")
            for j in range(per):
                reqs.append(model_request(ids, b.common, k, "prompt", choice=j))
                replies.append(TextReply(model_name, len(ids), len(prompt), prompt if b.echo else "",
                                         index=len(replies), id=cid))
        want = b.logprobs is not None
        jobs = submit(reqs, b.common.stream)  # one after another, with no other request between them
        if b.common.stream:  # (best_of is n here: requests.completion_body)
            def frames(reply):
                first = [reply._envelope([{"text": reply.text[0], "index": reply.index, "logprobs": None,
                                           "finish_reason": None}])] if b.echo else []

                def to_chunks(step):
                    c = reply.chunk(step, want)
                    out = first + ([c] if c else [])
                    first.clear()
                    return out
                return to_chunks

            return chunks_sse(jobs, request, [frames(r) for r in replies], usage_chunk(replies, reqs, per),
                              b.common.include_usage)
        await whole(jobs, request, [lambda step, reply=reply: reply.chunk(step, want) for reply in replies])
        return TextReply.joined(replies, [q.timings for q in reqs], per, b.common.n, want)

    async def chat_turn(messages: list[dict], offered: list[dict] | None, tool_choice, common, logprobs, *,
                        continue_final: bool, max_calls: int | None, field: str, n: int = 1) -> Turn:
        """The prompt and the requests of a chat reply's n choices (chat completions, responses,
        messages)."""
        tools = offered if offered and tool_choice != "none" else None  # the ones a call may name
        try:
            # the template shows the tools even with tool_choice "none", as llama-server and vLLM
            # render them: the model knows them, and only no call of them is read from the reply
            ids = await asyncio.to_thread(model.chat_tokens, messages, tools=offered or None,
                                          continue_final=continue_final, limit=model.n_ctx)
        except PromptTooLong as e:
            raise too_long(e, field) from None
        except StepstreamError as e:
            raise ApiError(400, str(e), param=field, code="invalid_value") from None
        except RecursionError:
            raise ApiError(400, f"the {field} or tools nest too deeply", param=field, code="invalid_value") from None
        tail = model.tokenizer.decode_bytes(ids[-64:], special=True).decode("utf-8", "replace")
        in_reasoning, forced = starts_in_reasoning(tail), ""
        named = tool_choice["function"]["name"] if isinstance(tool_choice, dict) else None
        if tools is not None and tool_choice != "auto":
            # the reply starts with the opening of a call (closing a reasoning section the prompt opened)
            forced = ("\n" + END_THINK + "\n" if in_reasoning else "") + forced_call(named)
            ids = ids + model.tokenize(forced, add_bos=False, special=True)
        grammar = ToolCallGrammar(callable_tools(tools, tool_choice), named) if forced else \
            AutoToolGrammar(tools) if tools is not None else None

        def choice(j: int) -> ModelRequest:
            req = model_request(ids, common, logprobs, field, in_reasoning, chat=True, choice=j)
            # a forced call (the prompt opened it) or one the reply opens ("auto") is finished by
            # its grammar (runtime.text.tool_grammar)
            if grammar is not None:
                req.grammar = grammar
            # the budget reads reasoning as the reply's parser reads it
            req.tools, req.forced, req.max_calls = callable_tools(tools, tool_choice), forced, max_calls
            if tools is not None and max_calls is not None:  # generation ends with the last call it may make
                watch = ReplyStream(in_reasoning=in_reasoning, tools=callable_tools(tools, tool_choice), calls=True,
                                    max_calls=max_calls)
                watch.push(forced)

                def ends(text: str) -> bool:
                    watch.push(text)
                    return watch.ended

                req.ends = ends
            return req

        return Turn(ids, [choice(j) for j in range(n)], in_reasoning, forced, callable_tools(tools, tool_choice))

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat(request: Request):
        b = await body_of(request, chat_body)
        turn = await chat_turn(b.messages, b.tools, b.tool_choice, b.common, b.logprobs,
                               continue_final=b.continue_final, max_calls=b.max_calls, field="messages", n=b.common.n)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        replies = [ChatReply(model_name, len(turn.ids), in_reasoning=turn.in_reasoning, tools=turn.tools,
                             reasoning_field=reasoning_field, forced=turn.forced, max_calls=b.max_calls, index=j,
                             id=cid)
                   for j in range(len(turn.reqs))]
        want = b.logprobs is not None
        jobs = submit(turn.reqs, b.common.stream)  # one after another, with no other request between them
        if b.common.stream:
            def frames(reply):
                first = [reply.first_chunk()]

                def to_chunks(step):
                    out = first + reply.chunks(step, want)
                    first.clear()
                    return out
                return to_chunks

            return chunks_sse(jobs, request, [frames(r) for r in replies],
                              usage_chunk(replies, turn.reqs, len(replies)), b.common.include_usage)
        await whole(jobs, request, [r.collect for r in replies])
        return ChatReply.joined(replies, [q.timings for q in turn.reqs], want)

    add_agent_routes(app, model=model, model_name=model_name, store=store, authorize=authorize, read_json=read_json,
                     body_of=body_of, chat_turn=chat_turn, submit=submit, sse=sse, whole=whole)
    add_llama_routes(app, engine, authorize=authorize, read_json=read_json, metrics=metrics, model_name=model_name)
    add_slot_routes(app, engine, authorize=authorize, read_json=read_json, save_dir=slot_save_path, enabled=slots)
    if webui:
        add_webui_routes(app)
    add_native_completion(app, model=model, model_name=model_name, body_of=body_of, prompt_ids=prompt_ids,
                          model_request=model_request, submit=submit, whole=whole, sse=sse, data=_data)
    return app
