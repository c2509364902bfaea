"""`stepstream serve`: an OpenAI-compatible HTTP server for one model (runtime.server)."""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from pathlib import Path

from runtime.base.errors import StepstreamError
from runtime.base.memory_limit import size_text
from runtime.cli.common import add_model_args, add_mtp_arg, add_reasoning_args
from runtime.cli.arg_types import memory_arg, positive_int, size_arg


def body_size(text: str) -> int:
    """--max-body: a size such as 8MiB or 64KiB, or plain bytes, as --ram-budget reads it."""
    value = size_arg(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text}")
    return value


def add_arguments(p) -> None:
    add_model_args(p)
    add_mtp_arg(p)  # a load option (RuntimeOptions.mtp), read by load_model; every request drafts with it
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on; 0 picks a free one (default: 8080)")
    p.add_argument("--api-key", type=_api_key, default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: no key)")
    p.add_argument("--alias", default=None, metavar="NAME",
                   help="the model's name in the API (default: the GGUF file's name)")
    p.add_argument("--queue-size", type=positive_int, default=8,
                   help="requests that may wait while one runs; more get 503 (default: 8)")
    p.add_argument("--max-body", type=body_size, default="8MiB", metavar="SIZE",  # argparse parses a str default
                   help="largest request body accepted, e.g. 8MiB, 512KiB or plain bytes (default: 8MiB)")
    p.add_argument("--cache-ram", type=cache_ram, default="auto", metavar="SIZE|auto",
                   help="memory for other conversations' KV caches, kept so that a request in between (a second "
                        "client, an agent's background request) does not cost the next turn its prompt; taken from "
                        "the expert cache; 0 keeps only the live cache (default: auto, an eighth of the usable "
                        "memory, at most 8GiB)")
    p.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                   help="also keep conversations' KV caches as files in DIR, each one --cache-ram keeps and the "
                        "live one when the server stops, so that a server started again answers a conversation's "
                        "next turn without evaluating its prompt (default: none)")
    p.add_argument("--cache-dir-size", type=dir_size, default=None, metavar="SIZE",
                   help="the most the files in --cache-dir take, the least recently used removed first "
                        "(default: 32GiB)")
    p.add_argument("--reasoning-field", choices=("reasoning_content", "reasoning", "both"),
                   default="reasoning_content",
                   help="a chat completion's reasoning as reasoning_content (llama.cpp's and DeepSeek's name), "
                        "reasoning (vLLM's, OpenRouter's, StepFun's API's) or both (a client that reads both shows "
                        "it twice) (default: reasoning_content)")
    p.add_argument("--metrics", action="store_true",
                   help="serve GET /metrics: Prometheus counters under llama-server's names (default: off)")
    p.add_argument("--slot-save-path", type=Path, default=None, metavar="DIR",
                   help="the directory of llama-server's POST /slots/0?action=save|restore {filename}: the live "
                        "KV cache saved to a file and restored from it (default: none, the actions refused)")
    p.add_argument("--no-slots", action="store_true", help="do not serve GET /slots (llama-server's flag)")
    p.add_argument("--no-webui", action="store_true",
                   help="do not serve the chat page at the server's address, GET / (llama-server's flag)")
    add_reasoning_args(p, who="a chat reply of a request that sets no budget of its own (chat's "
                              "thinking_budget_tokens or reasoning_effort, the Responses API's reasoning.effort, the "
                              "Messages API's thinking.budget_tokens; there an output_config.effort only caps it)")


def dir_size(text: str) -> int:
    """--cache-dir-size: a size with a unit, more than 0 (0 would write nothing, in silence)."""
    value = memory_arg(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is 0 bytes: give a size with a unit (32GiB), or leave --cache-dir out")
    return value


def cache_ram(text: str) -> int | str:
    """--cache-ram: auto, 0, or a size with a unit (2GiB)."""
    if text.strip().lower() == "auto":
        return "auto"
    if text.strip() == "0":
        return 0
    value = memory_arg(text)
    if value == 0:  # 0.5: half a byte, which would turn it off in silence
        raise argparse.ArgumentTypeError(f"{text} is 0 bytes; give a size with a unit (512MiB), or 0 to turn it off")
    return value


def _api_key(text: str) -> str:
    """A key a client can send as `Authorization: Bearer KEY`: not empty (an unset variable in
    `--api-key "$KEY"` served everyone: a missing header compared equal to it), no whitespace."""
    if not text:
        raise argparse.ArgumentTypeError("is empty: give a key, or leave --api-key out to serve without one")
    if any(c.isspace() or not c.isprintable() for c in text):
        raise argparse.ArgumentTypeError("holds whitespace or a control character, which a Bearer token cannot carry")
    return text


def _listen(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise StepstreamError(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise StepstreamError(f"--host {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise StepstreamError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    return sock


def _persist(prompts, model) -> None:
    """The live conversation to --cache-dir as the server stops; a failure is said, not raised."""
    try:
        n = len(model.history)
        if prompts.persist(model):
            print(f"prompt cache: the live conversation ({n:,} tokens) is on disk in {prompts.disk.dir}",
                  file=sys.stderr, flush=True)
    except Exception as e:  # (Ctrl-C again stops it)
        print(f"warning: prompt cache: the live conversation was not written: {e}", file=sys.stderr, flush=True)


def _stop(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops the server as Ctrl-C does


def run(args) -> int:
    try:
        import uvicorn

        from runtime.server.app import create_app
        from runtime.server.disk_states import DiskStates
        from runtime.server.engine import Engine
        from runtime.server.loading import LoadingResponder
        from runtime.server.prompt_cache import PromptCache
    except ImportError as e:
        raise StepstreamError(f"the server needs the [serve] extra ({e.name} is missing): "
                              "pip install 'stepstream[serve]'") from None
    from runtime.cli.common import load_model
    from runtime.cli.prompt_cache_file import state_variant

    if args.cache_dir is None and args.cache_dir_size is not None:
        raise StepstreamError("--cache-dir-size goes with --cache-dir DIR: without a directory nothing is written")
    # before the model loads: a directory it cannot use fails fast, as a taken port does
    disk = DiskStates(args.cache_dir, args.cache_dir_size or 32 * 2**30, Path(args.model), state_variant(args)) \
        if args.cache_dir is not None else None
    if args.slot_save_path is not None and not args.slot_save_path.is_dir():  # before the model loads
        raise StepstreamError(f"--slot-save-path {args.slot_save_path}: not a directory (create it first)")
    sock = _listen(args.host, args.port)
    loading = LoadingResponder(sock)  # meanwhile every request gets 503 "loading" at once
    try:
        model = load_model(args)  # prints the placement when experts stream or a GPU holds some
    except BaseException:
        loading.stop()
        sock.close()
        raise
    loading.stop()
    if model.placement is None and model.gpu_placement is None:
        size = model.file.path.stat().st_size
        print(f"placement: every weight in RAM, mapped from {model.file.path} ({size / 2**20:.0f} MiB)",
              file=sys.stderr)
    model.tokenizer  # noqa: B018 - built now, not by the first request's handler
    name = args.alias or model.name
    kept = model.options.prompt_cache
    prompts = PromptCache(kept, disk) if kept or disk else None
    if kept and prompts is not None:
        print(f"prompt cache: up to {size_text(kept)} of other conversations' KV caches", file=sys.stderr)
    if disk is not None:
        print(f"prompt cache: {disk.describe()}", file=sys.stderr)
    if args.reasoning_budget >= 0:
        print(f"reasoning budget: {args.reasoning_budget} tokens for chat requests that set none", file=sys.stderr)
    engine = Engine(model, queue_size=args.queue_size, prompt_cache=prompts)
    app = create_app(engine, model_name=name, api_key=args.api_key, max_body=args.max_body,
                     reasoning_budget=args.reasoning_budget, reasoning_message=args.reasoning_budget_message or "",
                     metrics=args.metrics, reasoning_field=args.reasoning_field,
                     slot_save_path=args.slot_save_path, slots=not args.no_slots, webui=not args.no_webui)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {name} (context {model.n_ctx} tokens) at http://{shown}:{port}/v1"
          + (" (API key required)" if args.api_key else ""), file=sys.stderr, flush=True)
    if not args.no_webui:
        print(f"chat page: http://{shown}:{port}/", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    # HTTP on a thread, the model on this one (runtime.server.engine says why)
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="stepstream-http", daemon=True)
    http.start()
    watcher = threading.Thread(target=lambda: (http.join(), engine.close()), daemon=True)
    watcher.start()  # if uvicorn stops by itself, the worker stops too
    signal.signal(signal.SIGTERM, _stop)
    # Ctrl-C stops it even when SIGINT came in ignored (a script's background job): Python keeps
    # an inherited SIG_IGN, and such a server then ignored `kill -INT`
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        engine.serve_forever()
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        engine.close()  # waiting requests end with a 503 (streams: an error chunk, then [DONE])
        server.should_exit = True
        http.join(5)
        if disk is not None:
            _persist(prompts, model)
            disk.close()
        model.close()
    return 0
