"""llama-server's own routes beside the OpenAI and Anthropic ones, in its shapes, for the clients
and tools written against it: POST /tokenize, /detokenize and /apply-template, GET /props and
(with `serve --metrics`) GET /metrics.

    /tokenize        {content, add_special=false, parse_special=true, with_pieces=false} -> {tokens}
    /detokenize      {tokens} -> {content}
    /apply-template  {messages, tools?} -> {prompt}: the chat template's rendering, as /v1/chat/completions renders it
    /props           the context, the default sampling, the chat template, one slot
    /metrics         Prometheus text (runtime.server.metrics)
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

import runtime
from runtime.base.errors import PromptTooLong, StepstreamError
from runtime.base.gguf_schema import Key
from runtime.server.requests import ApiError, _get, chat_body
from runtime.server.slots import slot_settings


def add_llama_routes(app: FastAPI, engine, *, authorize, read_json, metrics: bool, model_name: str) -> None:
    """authorize(request) and read_json(request): the app's own (the key, the body's limits)."""
    model = engine.model
    vocab = model.cfg.vocab
    limit = 4 * model.n_ctx  # tokens a request may tokenize or detokenize (a document to count, beside prompts)

    async def body(request: Request) -> dict:
        authorize(request)
        return await read_json(request)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        b = await body(request)
        content = _get(b, "content", (str,), required=True)
        add_special = _get(b, "add_special", (bool,), False)
        parse_special = _get(b, "parse_special", (bool,), True)
        with_pieces = _get(b, "with_pieces", (bool,), False)
        try:  # a text no prompt could hold is refused before the seconds its tokenization would take
            model.tokenizer.check_fits(content, limit)
        except PromptTooLong as e:
            raise ApiError(400, f"the content is at least {e.at_least} tokens ({e.n_bytes} bytes of text), more than "
                                f"{limit} (4 x the context)", param="content", code="content_too_long") from None

        def pieces() -> list:
            ids = model.tokenize(content, add_bos=add_special, special=parse_special)
            if not with_pieces:
                return ids
            out = []
            for t in ids:
                piece = model.tokenizer.decode_bytes([t], special=True)
                try:
                    out.append({"id": t, "piece": piece.decode("utf-8")})
                except UnicodeDecodeError:  # part of a character: its bytes, as llama-server sends them
                    out.append({"id": t, "piece": list(piece)})
            return out

        return {"tokens": await asyncio.to_thread(pieces)}  # (off the loop: other streams go on)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        b = await body(request)
        ids = _get(b, "tokens", (list,), required=True)
        if len(ids) > limit:
            raise ApiError(400, f"'tokens' holds {len(ids)} ids, more than {limit} (4 x the context)", param="tokens",
                           code="invalid_value")
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ApiError(400, f"tokens[{i}] = {t!r:.40} is not a token id (0..{vocab - 1})", param="tokens",
                               code="invalid_value")
        text = await asyncio.to_thread(model.detokenize, ids, special=True)
        return {"content": text.decode("utf-8", "replace")}

    @app.post("/apply-template")
    async def apply_template(request: Request):
        b = chat_body(await body(request))
        try:
            ids = await asyncio.to_thread(model.chat_tokens, b.messages, tools=b.tools or None,
                                          continue_final=b.continue_final)
        except (StepstreamError, PromptTooLong) as e:
            raise ApiError(400, str(e), param="messages", code="invalid_value") from None
        except RecursionError:
            raise ApiError(400, "the messages or tools nest too deeply", param="messages", code="invalid_value") from None
        return {"prompt": model.tokenizer.decode_bytes(ids, special=True).decode("utf-8", "replace")}

    @app.get("/props")
    async def props(request: Request):
        authorize(request)
        template = model.file.get(Key.CHAT_TEMPLATE, None)
        return {
            "default_generation_settings": slot_settings(engine),
            "total_slots": 1,
            "model_alias": model_name,
            "model_path": str(model.file.path),
            "chat_template": template if isinstance(template, str) else "",
            "modalities": {"vision": False, "audio": False},
            "build_info": f"stepstream {runtime.__version__}",
        }

    if metrics:
        @app.get("/metrics")
        async def prometheus(request: Request):
            authorize(request)
            return PlainTextResponse(engine.metrics.text(int(engine.busy), engine.waiting),
                                     media_type="text/plain; version=0.0.4")
