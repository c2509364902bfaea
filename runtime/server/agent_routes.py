"""The agent APIs of `stepstream serve` over the same chat turn as chat completions: OpenAI's
Responses API (POST /v1/responses; GET, DELETE /v1/responses/{id}; GET
/v1/responses/{id}/input_items: the responses kept in memory, runtime.server.response_store)
and Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens). Their bodies are
read by runtime.server.responses_api and runtime.server.messages_api, their events written by
runtime.generation.response_events and message_events; the app's helpers (runtime.server.app)
build the turn, queue it and stream it."""

from __future__ import annotations

import asyncio
import json
import uuid

from fastapi import Request

from runtime.base.errors import StepstreamError
from runtime.generation.message_events import MessageReply
from runtime.generation.response_events import ResponseReply, new_id
from runtime.server.body_fields import ApiError
from runtime.server.messages_api import AnthropicError, messages_body
from runtime.server.responses_api import item_kind, responses_body, to_messages


def _named(event: dict) -> str:
    """A Responses API event: named by its type, as OpenAI sends them."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


def add_agent_routes(app, *, model, model_name: str, store, authorize, read_json, body_of, chat_turn, submit, sse,
                     whole) -> None:
    """The routes, with the app's own helpers (runtime.server.app): the key and body checks, the
    chat turn, the queue, the stream; `store` keeps the Responses API's responses."""
    # ------------------------------------------------------------ the Responses API

    @app.post("/v1/responses")
    async def create_response(request: Request):
        b = await body_of(request, responses_body)
        history = store.get(b.previous_response_id, "previous_response_id").conversation \
            if b.previous_response_id is not None else []
        inputs = [store.item(item.get("id"), f"input[{i}]") if item_kind(item) == "item_reference" else item
                  for i, item in enumerate(b.input)]  # (an id that is not a string: a 400 naming the item)
        where = [f"previous_response_id's item {i}" for i in range(len(history))] + \
                [f"input[{i}]" for i in range(len(inputs))]
        messages = to_messages(history + inputs, where)
        if b.instructions:  # not carried over from a previous response, as OpenAI does
            messages = [{"role": "system", "content": b.instructions}] + messages
        turn = await chat_turn(messages, b.tools, b.tool_choice, b.common, b.logprobs, continue_final=False,
                               max_calls=b.max_calls, field="input")
        reply = ResponseReply(new_id("resp"), model_name, len(turn.ids), b.echo, turn.req.timings,
                              in_reasoning=turn.in_reasoning, tools=turn.tools, forced=turn.forced,
                              max_calls=b.max_calls, want_logprobs=b.logprobs is not None)

        def feed(step) -> list[dict]:
            out = reply.feed(step)
            if reply.status != "in_progress" and b.store:
                store.put(reply.response(), inputs, history)
            return out

        job = submit(turn.req, b.common.stream)
        if b.common.stream:
            return sse(job, request, lambda step: "".join(map(_named, feed(step))), lambda: "",
                       lambda e: "".join(map(_named, reply.failed("server_error", e.message))),
                       head="".join(map(_named, reply.start())), merged=False)
        await whole(job, request, feed, merged=False)
        return reply.response()

    # ------------------------------------------------------------ Anthropic's Messages API

    async def messages_turn(request: Request):
        """The body read and the chat turn built. The model a request names is not checked: Claude
        Code names its own for its background requests."""
        authorize(request)
        b = messages_body(await read_json(request))
        turn = await chat_turn(b.messages, b.tools, b.tool_choice, b.common, None, continue_final=True,
                               max_calls=b.max_calls, field="messages")
        return b, turn

    @app.post("/v1/messages")
    async def create_message(request: Request):
        try:
            b, turn = await messages_turn(request)
            reply = MessageReply("msg_" + uuid.uuid4().hex, model_name, len(turn.ids), turn.req.timings,
                                 in_reasoning=turn.in_reasoning, tools=turn.tools, forced=turn.forced,
                                 max_calls=b.max_calls, thinking=b.thinking,
                                 window=turn.req.max_tokens < b.common.max_tokens)
            job = submit(turn.req, b.common.stream)
        except ApiError as e:
            raise AnthropicError.of(e) from None
        if b.common.stream:
            return sse(job, request, lambda step: "".join(map(_named, reply.feed(step))), lambda: "",
                       lambda e: _named(AnthropicError.of(e).body()),
                       head="".join(map(_named, reply.start())), merged=False, ping=_named({"type": "ping"}))
        try:
            await whole(job, request, reply.feed, merged=False)
        except ApiError as e:
            raise AnthropicError.of(e) from None
        return reply.message()

    @app.post("/v1/messages/count_tokens")
    async def count_message_tokens(request: Request):
        """The prompt's tokens, however many: a prompt over the context is counted too (a client
        counts to know whether it fits)."""
        try:
            authorize(request)
            b = messages_body(await read_json(request), count_only=True)
            ids = await asyncio.to_thread(model.chat_tokens, b.messages, tools=b.tools or None, continue_final=True)
        except ApiError as e:
            raise AnthropicError.of(e) from None
        except (StepstreamError, RecursionError) as e:
            raise AnthropicError(400, str(e) if isinstance(e, StepstreamError) else "the messages nest too deeply",
                                 param="messages", code="invalid_value") from None
        return {"input_tokens": len(ids)}

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, request: Request):
        authorize(request)
        if request.query_params.get("stream", "false").lower() not in ("false", "0"):
            raise ApiError(400, "a stored response is sent whole: streaming it again is not supported",
                           param="stream", code="unsupported")
        return store.get(response_id).response

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str, request: Request):
        authorize(request)
        store.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    @app.get("/v1/responses/{response_id}/input_items")
    async def input_items(response_id: str, request: Request):
        authorize(request)
        query = request.query_params
        order, limit, after = query.get("order", "desc"), query.get("limit", "20"), query.get("after")
        if order not in ("asc", "desc"):
            raise ApiError(400, f"'order' must be asc or desc, got {order!r}", param="order", code="invalid_value")
        if not limit.isdigit() or not 1 <= int(limit) <= 100:
            raise ApiError(400, f"'limit' must be an integer from 1 to 100, got {limit!r}", param="limit",
                           code="invalid_value")
        limit = int(limit)
        items = store.get(response_id).input
        items = items[::-1] if order == "desc" else items
        if after is not None:
            at = next((i for i, item in enumerate(items) if item["id"] == after), None)
            if at is None:
                raise ApiError(400, f"'after': the response has no input item '{after}'", param="after",
                               code="invalid_value")
            items = items[at + 1:]
        page = items[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}
