"""Flags shared by the `run`, `chat` and `bench` subcommands, named as llama.cpp names them."""

from __future__ import annotations

import argparse
import sys

from runtime.base.system import choose_wait_policy
from runtime.loader import load


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, help="GGUF file (for a split model, any of its parts)")
    p.add_argument("-t", "--threads", type=int, default=None, help="compute threads (default: the libraries' choice)")
    p.add_argument("-c", "--ctx-size", type=int, default=None, help="context size in tokens (default: model's, at most 4096)")
    p.add_argument("-b", "--batch-size", type=int, default=64, help="prompt tokens evaluated together (default: 64)")
    p.add_argument("--activations", default="q8", choices=("q8", "f32"),
                   help="q8: round activations to int8 for quantized matrices and use integer dot products, "
                        "as llama.cpp does (fast); f32: float32 activations (exact) (default: q8)")
    g = p.add_argument_group("expert streaming (routed experts read from disk into a RAM cache)")
    g.add_argument("--ram-budget", default=None, metavar="SIZE",
                   help="RAM for the routed-expert cache, e.g. 6GiB or 800MiB; turns streaming on "
                        "(default: stream only when the model does not fit in available memory)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--stream", action="store_true",
                      help="stream routed experts with the default budget: available memory minus a reserve")
    mode.add_argument("--no-stream", action="store_true", help="keep every routed expert resident (memory-mapped)")
    g.add_argument("--cache-policy", default="lru", choices=("lru", "lfu", "pinned"), help="expert cache policy (default: lru)")
    g.add_argument("--profile", default=None, metavar="FILE",
                   help="expert profile from `stepstream profile`: pin the most-used experts into half the cache")
    g.add_argument("--no-prefetch", action="store_true", help="do not read the next layer's likely experts ahead")
    g.add_argument("--no-direct-io", action="store_true", help="read experts through the page cache instead of O_DIRECT")
    g.add_argument("--stats", action="store_true", help="print expert-cache statistics at the end")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--n-predict", type=int, default=-1, help="tokens to generate; -1 = until end of text or context (default: -1)")
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="top-k sampling, 0 = off (default: 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p sampling, 1.0 = off (default: 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p sampling, 0.0 = off (default: 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="penalize repeated tokens, 1.0 = off (default: 1.0)")
    p.add_argument("--repeat-last-n", type=int, default=64, help="tokens the repeat penalty looks back over (default: 64)")
    p.add_argument("-s", "--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("-r", "--reverse-prompt", action="append", default=[], metavar="STOP",
                   help="stop generating at this text (may be given several times)")


def load_model(args):
    choose_wait_policy(args.threads)
    model = load(args.model, n_ctx=args.ctx_size, n_threads=args.threads, n_batch=args.batch_size,
                 experts="stream" if args.stream else "ram" if args.no_stream else "auto", ram_budget=args.ram_budget,
                 cache_policy=args.cache_policy, profile=args.profile, prefetch=not args.no_prefetch,
                 direct_io=not args.no_direct_io, activations=args.activations)
    if model.placement is not None:
        print(model.placement.text(), file=sys.stderr)
    report_warm_up(model)
    return model


def report_warm_up(model) -> None:
    """Load (or, on a first run, compile) the kernels before anything is timed, and say so when
    it took long enough to notice."""
    print("loading the kernels...", end="", file=sys.stderr, flush=True)
    seconds = model.warm_up()
    note = f" compiled in {seconds:.0f} s (first run after an install; cached from now on)" if seconds > 3 else " done"
    print(note, file=sys.stderr, flush=True)


def print_stats(args, model) -> None:
    """The expert-cache statistics, when asked for and when experts stream."""
    if args.stats and model.provider.stats is not None:
        print(model.provider.stats.text(), file=sys.stderr)


def sampling_kwargs(args) -> dict:
    return dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed)


def max_tokens(args) -> int | None:
    return None if args.n_predict < 0 else args.n_predict
