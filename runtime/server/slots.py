"""llama-server's slot routes, for the tools written against them (monitors, and the scripts and
proxies that keep a long conversation's KV cache across restarts):

    GET  /slots [?fail_on_no_slot=1]             [the one slot]: id, n_ctx, is_processing, params, next_token
    POST /slots/0?action=save     {filename}     the live KV cache to --slot-save-path/filename
                                                 -> {id_slot, filename, n_saved, n_written, timings: {save_ms}}
    POST /slots/0?action=restore  {filename}     the cache a save wrote -> {..., n_restored, n_read, timings: {restore_ms}}
    POST /slots/0?action=erase                   an empty cache -> {id_slot, n_erased}

The files are the model's state files (Model.save_state_file: the --cache-dir format, written
under a temporary name, then renamed); a file another model or run wrote, or a damaged one, is
refused with the cache untouched. An action runs on the engine between requests
(Engine.submit_action), as llama-server defers it while its slot is busy. A restored cache is
what the next request whose prompt begins with its tokens reuses. Without --slot-save-path,
save and restore are refused (501), as llama-server refuses them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from fastapi import FastAPI, Request

from runtime.base.errors import StepstreamError
from runtime.server.engine import Busy
from runtime.server.requests import ApiError, _get

NAME_FORBIDDEN = set('/\\:*?"<>|\ufeff\u2215\uff0e\uff0f')  # and control characters (C0, C1), as llama.cpp's
MAX_NAME = 200  # bytes: the temporary name a save writes first is the name and a few more


def slot_settings(engine) -> dict:
    """The slot as /props shows it in `default_generation_settings`, and /slots lists it."""
    model = engine.model
    return {"id": 0, "n_ctx": model.n_ctx, "speculative": model.n_mtp > 0 and model.options.mtp != 0,
            "is_processing": engine.busy,
            # the chat endpoints' defaults (OpenAI's: temperature 1, the other samplers off)
            "params": {"n_predict": -1, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                       "repeat_last_n": 64, "repeat_penalty": 1.0, "presence_penalty": 0.0,
                       "frequency_penalty": 0.0, "seed": -1, "stop": []}}


def check_filename(name: str) -> str:
    """A plain file name inside --slot-save-path (no directory, nothing a file system reads otherwise)."""
    if not name or len(name.encode("utf-8", "replace")) > MAX_NAME:
        raise ApiError(400, f"'filename' must be a file name of 1 to {MAX_NAME} bytes", param="filename",
                       code="invalid_value")
    bad = sorted({c for c in name if c in NAME_FORBIDDEN or ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F})
    if bad or name.startswith(".") or name != name.strip(" ") or name.endswith("."):
        what = f"holds {''.join(bad)!r}" if bad else "is not a plain file name"
        raise ApiError(400, f"'filename' {name[:80]!r} {what}: give a name inside --slot-save-path, without "
                            "directories", param="filename", code="invalid_value")
    return name


def add_slot_routes(app: FastAPI, engine, *, authorize, read_json, save_dir: Path | None, enabled: bool = True) -> None:
    """save_dir: --slot-save-path (None: save and restore are refused); enabled: GET /slots is
    served (llama-server's --no-slots turns it off)."""

    @app.get("/slots")
    async def slots(request: Request):
        authorize(request)
        if not enabled:
            raise ApiError(501, "this server does not serve GET /slots (started with --no-slots)",
                           code="not_supported", kind="not_supported_error")
        if request.query_params.get("fail_on_no_slot") == "1" and engine.busy:
            raise ApiError(503, "no slot available", code="unavailable", kind="unavailable_error")
        busy = engine.busy
        return [{**slot_settings(engine), "id_task": engine.served, "is_processing": busy,
                 "next_token": {"has_next_token": busy, "has_new_line": False, "n_remain": -1,
                                "n_decoded": engine.decoded if busy else 0, "stopping_word": ""}}]

    @app.post("/slots/{id_slot}")
    async def slot_action(request: Request, id_slot: str):
        authorize(request)
        if id_slot != "0":
            raise ApiError(400, f"invalid slot id {id_slot[:20]!r}: this server has one slot, 0", param="id_slot",
                           code="invalid_value")
        action = request.query_params.get("action", "")
        if action not in ("save", "restore", "erase"):
            raise ApiError(400, f"'action' must be save, restore or erase, got {action[:40]!r}", param="action",
                           code="invalid_value")
        body = await read_json(request) if action != "erase" else {}
        if action == "erase":
            return await _run(lambda model: _erase(model))
        if save_dir is None:
            raise ApiError(501, "slot save and restore need a directory: start the server with --slot-save-path DIR",
                           code="not_supported", kind="not_supported_error")
        name = check_filename(_get(body, "filename", (str,), required=True))
        path = save_dir / name
        if action == "save":
            return await _run(lambda model: _save(model, path, name))
        if not path.is_file():
            raise ApiError(400, f"no file {name!r} in --slot-save-path to restore", param="filename",
                           code="invalid_value")
        return await _run(lambda model: _restore(model, path, name, engine.prompt_cache))

    async def _run(action) -> dict:
        try:
            job = engine.submit_action(action)
        except Busy:
            raise ApiError(503, "the server is busy: too many requests are waiting; retry shortly",
                           code="server_busy", kind="server_error", headers={"Retry-After": "1"}) from None
        while True:
            for kind, value in await job.next_events():
                if kind == "result":
                    return value
                if kind == "error":
                    status, code, message = value
                    raise ApiError(status, message, code=code, kind="invalid_request_error" if status < 500
                                   else "server_error")


class SlotFileError(StepstreamError):
    """The server could not write a slot's file (its directory gone, the disk full): a 500."""

    status = 500


def _save(model, path: Path, name: str) -> dict:
    t = time.perf_counter()
    try:
        n_written = model.save_state_file(path)
    except StepstreamError as e:  # the server's side: said without the server's own paths
        raise SlotFileError(str(e).replace(str(path), repr(name))) from None
    return {"id_slot": 0, "filename": name, "n_saved": len(model.history), "n_written": n_written,
            "timings": {"save_ms": (time.perf_counter() - t) * 1e3}}


def _restore(model, path: Path, name: str, prompt_cache=None) -> dict:
    """The file's state in place of the live one, which the prompt cache (when the server has
    one) keeps first, as before any request that would replace it."""
    t = time.perf_counter()
    if prompt_cache is not None:
        prompt_cache.keep(model)
    try:
        n = model.load_state_file(path)
    except StepstreamError as e:  # (another model's file, a damaged one: the cache is untouched)
        raise StepstreamError(str(e).replace(str(path), repr(name))) from None
    return {"id_slot": 0, "filename": name, "n_restored": n, "n_read": os.path.getsize(path),
            "timings": {"restore_ms": (time.perf_counter() - t) * 1e3}}


def _erase(model) -> dict:
    n = len(model.history)
    model.reset()
    return {"id_slot": 0, "n_erased": n}
