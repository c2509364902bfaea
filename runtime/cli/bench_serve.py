"""`stepstream bench-serve`: what `stepstream serve` saves, costs and withstands (runtime.bench.serve).

Starts the server on a free port with the model, measures, and stops it:
1. prefix reuse: a conversation's second turn against its first (time to first token, cached
   prompt tokens), and whether the reused turn's greedy reply equals a fresh evaluation's;
2. server overhead: greedy decode tok/s through the server against `stepstream run` on the
   same prompt (medians, alternating);
3. load: concurrent clients sending short requests; completed, refused (503), errors, hung,
   latency, and /health afterwards.
The exit status is 1 when something was wrong rather than slow: the reused turn's reply
differed from the fresh one, or the load test saw an error or a hung request, or /health failed.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from runtime.base.errors import StepstreamError
from runtime.base.system import choose_wait_policy
from runtime.cli.common import add_cache_type_args
from runtime.cli.arg_types import positive_float, positive_int
from runtime.cli.text_args import existing_file

DECODE_PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n"
PARTS = ("reuse", "overhead", "load")  # what --skip leaves out


def add_arguments(p) -> None:
    p.add_argument("-m", "--model", required=True, type=existing_file("GGUF file"),
                   help="GGUF file (for a split model, any of its parts)")
    p.add_argument("-c", "--ctx-size", type=positive_int, default=None,
                   help="context size in tokens, for the server and `stepstream run` (default: model's, at most 4096)")
    p.add_argument("-t", "--threads", type=positive_int, default=None,
                   help="compute threads, for the server and `stepstream run` (default: the libraries' choice)")
    add_cache_type_args(p)  # for the server and `stepstream run`
    p.add_argument("--conversation-tokens", type=positive_int, default=2000,
                   help="prompt tokens of the prefix-reuse conversation (default: 2000)")
    p.add_argument("--reply-tokens", type=positive_int, default=32,
                   help="tokens of each reply in the prefix-reuse turns (default: 32)")
    p.add_argument("-n", "--n-gen", type=positive_int, default=200,
                   help="tokens decoded in the overhead comparison (default: 200; on a model as fast as the "
                        "miniature, 1000 or more, or the machine's noise rules)")
    p.add_argument("-r", "--repetitions", type=positive_int, default=3,
                   help="decodes each way in the overhead comparison; the medians are compared (default: 3)")
    p.add_argument("--load-clients", type=positive_int, default=16, help="concurrent clients of the load test (default: 16)")
    p.add_argument("--load-seconds", type=positive_float, default=30.0,
                   help="seconds the load test's clients keep sending (default: 30)")
    p.add_argument("--queue-size", type=positive_int, default=8,
                   help="the server's --queue-size: requests that may wait; more get 503 (default: 8)")
    p.add_argument("--skip", action="append", default=[], choices=PARTS,
                   help="leave out a part (may be given several times)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _common(args) -> list[str]:
    """Options the server and `run` share. Both decode one token at a time (`--mtp 0`): the
    server's default `auto` would draft, and the overhead would then measure MTP too."""
    return (["--mtp", "0"] + (["--ctx-size", str(args.ctx_size)] if args.ctx_size else [])
            + (["--threads", str(args.threads)] if args.threads else [])
            + ["--cache-type-k", args.cache_type_k, "--cache-type-v", args.cache_type_v])


def serve_argv(model: str, *options: str) -> list[str]:
    """The command line of `stepstream serve` on a free port (this interpreter, this checkout),
    without the prompt cache (--cache-ram 0): the prefix-reuse check compares a reused turn with
    the same turn evaluated from a wiped cache, which a kept copy would serve instead."""
    return [sys.executable, "-m", "runtime.cli", "serve", "-m", model, "--port", "0", "--cache-ram", "0", *options]


def run_argv(model: str, prompt: str, n_tokens: int, *options: str) -> list[str]:
    """The command line of a greedy `stepstream run` that prints only the generated text."""
    return [sys.executable, "-m", "runtime.cli", "run", "-m", model, "-p", prompt, "-n", str(n_tokens), "--temp", "0",
            "--no-display-prompt", *options]


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f} ms"


def _print_reuse(r) -> None:
    f, s, fresh = r.first, r.second, r.fresh
    print("prefix reuse (chat, greedy)")
    print(f"  first turn:  {f.prompt_tokens} prompt tokens ({f.cached_tokens} cached); time to first token "
          f"{_ms(f.ttft_s)} (server: {_ms(f.first_token_ms and f.first_token_ms / 1000)})")
    print(f"  second turn: {s.prompt_tokens} prompt tokens ({s.cached_tokens} cached); time to first token "
          f"{_ms(s.ttft_s)} (server: {_ms(s.first_token_ms and s.first_token_ms / 1000)})")
    print(f"  second / first time to first token: {r.ttft_ratio * 100:.1f} % (target <= 10 %)")
    print(f"  fresh second turn: {fresh.prompt_tokens} prompt tokens ({fresh.cached_tokens} cached); "
          f"time to first token {_ms(fresh.ttft_s)}")
    print(f"  identical: {'yes' if r.identical else 'no'}")


def _print_overhead(o, n_gen: int) -> None:
    timed = "n/a" if o.server_timings_tok_s is None else f"{o.server_timings_tok_s:.2f} tok/s"
    print(f"server overhead (greedy decode of {n_gen} tokens, medians of {len(o.server)})")
    print(f"  through the server: {o.server_tok_s:.2f} tok/s (client clock; server timings: {timed})")
    print(f"  stepstream run:     {o.run_tok_s:.2f} tok/s")
    print(f"  overhead: {o.overhead * 100:.1f} % (target <= 5 %), {o.per_token_ms:.2f} ms per token; "
          f"from the fastest runs: {o.best_overhead * 100:.1f} %; same text: {'yes' if o.same_text else 'no'}")


def _print_load(load) -> None:
    p50, p99 = load.percentile(50), load.percentile(99)
    print(f"load ({load.clients} clients for {load.seconds:g} s)")
    print(f"  requests: {load.sent} sent, {load.completed} completed, {load.refused} refused (503), "
          f"{load.errors} errors, {load.hung} hung")
    print(f"  latency of completed requests: p50 {_ms(p50)}, p99 {_ms(p99)}")
    print(f"  /health afterwards: {load.health_status} {json.dumps(load.health)}")
    for e in load.error_samples:
        print(f"  error: {e}")


def _too_long(args, n_ctx: int, need: int) -> StepstreamError:
    held = (f"--ctx-size {args.ctx_size}" if args.ctx_size
            else f"the server's context of {n_ctx} tokens (no --ctx-size: the model's context, at most 4096)")
    return StepstreamError(f"--conversation-tokens {args.conversation_tokens} does not fit in {held}: the two turns "
                           f"need about {need} tokens; lower --conversation-tokens or raise --ctx-size")


def _bench():
    """runtime.bench.serve, or one line naming the extra its HTTP client (httpx) comes with."""
    try:
        from runtime.bench import serve
    except ImportError as e:
        raise StepstreamError(f"bench-serve needs the [serve] extra ({e.name} is missing): "
                              "pip install 'stepstream[serve]'") from None
    return serve


def run(args) -> int:
    bench = _bench()
    import httpx

    if set(PARTS) <= set(args.skip):
        raise StepstreamError("--skip reuse, --skip overhead and --skip load leave nothing to measure; "
                              "skip at most two of the three parts")
    from runtime.cli.common import context_size

    context_size(args)  # a -c the model cannot hold is refused here, not by the server child after it started
    count, wipe_token = bench.chat_counter(args.model)
    messages = []
    if "reuse" not in args.skip:
        # checked before the conversation is built (tokenizing a long one takes a while) and
        # again after, on its real length: the server would refuse the turns with an HTTP 400
        n_ctx = bench.served_context(args.model, args.ctx_size)
        if args.conversation_tokens >= n_ctx:
            raise _too_long(args, n_ctx, args.conversation_tokens + 3 * args.reply_tokens + 64)
        messages = bench.stdlib_conversation(count, args.conversation_tokens)
        need = count(messages) + 3 * args.reply_tokens + 64
        if need > n_ctx:
            raise _too_long(args, n_ctx, need)
    # Decided once here, the children inherit it: the server and `stepstream run` would each
    # decide from the load they see when they start, and spinning waits cost the server more
    # (its event loop and the client need the cores the OpenMP threads spin on).
    choose_wait_policy(args.threads)
    report: dict = {"model": args.model, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "default"}
    print(f"starting `stepstream serve` on {args.model} (OpenMP waits {report['omp_wait_policy']})...",
          file=sys.stderr, flush=True)
    # SIGTERM (a job's time limit, `kill`) unwinds like Ctrl-C, so that the server is stopped too
    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        _measure(args, messages, wipe_token, report)
    except httpx.HTTPError as e:  # the load test counts its own; here the server stopped answering
        raise StepstreamError(f"the server stopped answering: {type(e).__name__}: {e}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.json:
        print(json.dumps(report))
    wrong = ("prefix_reuse" in report and not report["prefix_reuse"]["identical"]
             or "load" in report and not report["load"]["ok"])
    return 1 if wrong else 0


def _exit(signum, frame):
    raise SystemExit(128 + signum)


def _measure(args, messages: list[dict], wipe_token: int, report: dict) -> None:
    bench = _bench()
    with bench.started_server(serve_argv(args.model, "--queue-size", str(args.queue_size), *_common(args))) as url:
        if messages:
            reuse = bench.prefix_reuse(url, messages, bench.FOLLOW_UP, wipe_token=wipe_token,
                                       max_tokens=args.reply_tokens)
            report["prefix_reuse"] = reuse.as_dict()
            if not args.json:
                _print_reuse(reuse)
        if "overhead" not in args.skip:
            overhead = bench.decode_overhead(url, run_argv(args.model, DECODE_PROMPT, args.n_gen, *_common(args)),
                                             DECODE_PROMPT, args.n_gen, repetitions=args.repetitions)
            report["overhead"] = overhead.as_dict()
            if not args.json:
                _print_overhead(overhead, args.n_gen)
        if "load" not in args.skip:
            load = bench.load_test(url, clients=args.load_clients, seconds=args.load_seconds)
            report["load"] = load.as_dict()
            if not args.json:
                _print_load(load)
