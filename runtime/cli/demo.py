"""`stepstream demo`: the embedded trained miniature, with its routed experts streaming from disk.

The model ships inside the package (runtime/data/): a Step-3.5 with every feature of the
real one (sliding/full attention, MoE with a shared expert, MTP heads), trained on the
Python standard library. The expert cache gets a share of the experts' bytes, so experts
really are read from disk as the router asks for them.
"""

from __future__ import annotations

import math
import os
import sys
import time
from importlib import resources

from runtime.base.errors import StepstreamError
from runtime.cli.common import GenerationTiming, add_cache_type_args, add_escape_args
from runtime.cli.arg_types import positive_int, share, temperature, token_limit
from runtime.cli.text_args import check_text_args

MODEL = "step35-mini-q4_k_m.gguf"
PROMPT = "def read_config(path):\n    \"\"\"Read a JSON config file and return it as a dict.\"\"\"\n"
N_CTX = 1024


def model_path():
    path = resources.files("runtime") / "data" / MODEL
    if not path.is_file():
        raise StepstreamError(f"the embedded model {MODEL} is missing from {path.parent}; reinstall stepstream")
    return path


def add_arguments(p) -> None:
    p.add_argument("-p", "--prompt", default=PROMPT, help="prompt (default: the start of a Python function)")
    p.add_argument("-n", "--n-predict", type=token_limit, default=96,
                   help=f"tokens to generate; -1 = until end of text or the context of {N_CTX} (default: 96)")
    p.add_argument("--budget-share", type=share, default=0.5,
                   help="expert cache as a share of all routed experts' bytes (default: 0.5)")
    p.add_argument("--temp", type=temperature, default=0.0, help="temperature; 0 = greedy (default: 0)")
    p.add_argument("-t", "--threads", type=positive_int, default=None,
                   help="compute threads (default: the libraries' choice)")
    add_cache_type_args(p)
    add_escape_args(p)


def warm_up(model, n_prompt: int) -> float:
    """Load (or, on a first run, compile) the kernels this demo runs, and only those: a chunk as
    long as the prompt, then one token, then forget both. Model.warm_up readies every path a `run`
    may take, the few-token kernels of short prompts and MTP verify passes included; the demo
    takes neither (its prompt goes through prefill, then token by token), and on a first run
    those kernels were half of the wait before its first token. A prompt of a few tokens still
    gets the few-token kernels, since they evaluate it. The chunk's tokens are not the prompt's,
    so the expert cache is not filled with the prompt's own experts before the figures are taken.
    Returns the seconds it took."""
    from runtime.model.precompile import alongside

    t0 = time.perf_counter()
    model.reset()
    n = min(n_prompt, model.n_ctx - 1)
    if n > 0:
        ids = [i % model.cfg.vocab for i in range(n)]
        with alongside(model):  # on a first run, a second process compiles too
            model.eval(ids)
            model.eval(ids[:1])
    model.reset()
    return time.perf_counter() - t0


def report_warm_up(model, n_prompt: int) -> None:
    """warm_up, said on stderr as `run` says its own (runtime.cli.common.report_warm_up)."""
    from runtime.cli.common import compiles_counted, interrupts_kept, warm_up_note

    print("loading the kernels...", end="", file=sys.stderr, flush=True)
    try:
        with interrupts_kept(), compiles_counted() as compiled:
            seconds = warm_up(model, n_prompt)
    except BaseException:
        print(file=sys.stderr)  # the error that follows gets a line of its own
        raise
    print(warm_up_note(seconds, compiled[0]), file=sys.stderr, flush=True)


def run(args) -> int:
    from offload.expert_table import build_expert_table
    from offload.provider import slot_bytes_for
    from runtime.base.memory_limit import size_text
    from runtime.base.gguf_file import GGUFModelFile
    from runtime.base.config import ModelConfig
    from runtime.base.system import choose_wait_policy, peak_rss_bytes
    from runtime.generation import complete, sampling_params
    from runtime.loader import load

    check_text_args(args)  # -p: UTF-8 and llama.cpp's escapes, before the model loads, as in `run`
    params = sampling_params(temperature=args.temp, seed=0)
    path = model_path()
    f = GGUFModelFile(path)
    cfg = ModelConfig.from_gguf(f)
    table = build_expert_table(f, cfg)
    expert_bytes, smallest = table.total_bytes, slot_bytes_for(table) * cfg.n_expert_used
    if int(expert_bytes * args.budget_share) < smallest:  # named by demo's own flag, not load's ram_budget
        raise StepstreamError(f"--budget-share {args.budget_share:g} gives an expert cache of "
                              f"{size_text(int(expert_bytes * args.budget_share))}, less than one token's "
                              f"{cfg.n_expert_used} experts of one layer ({size_text(smallest)}): give at least "
                              f"{math.ceil(1000 * smallest / expert_bytes) / 1000:g}")
    choose_wait_policy(args.threads)  # as `run` does: passive OpenMP waits when other processes hold the cores
    model = load(path, ram_budget=int(expert_bytes * args.budget_share), n_threads=args.threads, n_ctx=N_CTX,
                 cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v)
    print(model.placement.text(), file=sys.stderr)
    ids = model.tokenize(args.prompt, special=True)
    if len(ids) >= N_CTX:  # before the prompt is echoed: named by the demo's own flags, not the API's n_ctx
        raise StepstreamError(f"-p/--prompt: the prompt is {len(ids)} tokens; the demo's context holds {N_CTX} "
                              f"(the prompt and the text): give a shorter one, or run the model with a larger "
                              f"context: stepstream run -m {path} -c {len(ids) + 256} -f PROMPT.txt")
    report_warm_up(model, len(ids))
    st = model.provider.stats
    hits0, requests0, read0 = st.hits, st.requests, st.bytes_read  # the figures below leave the warm-up out
    sys.stdout.write(args.prompt)
    sys.stdout.flush()

    t0 = time.perf_counter()
    first = last = None
    for piece in complete(model, ids, params, None if args.n_predict < 0 else args.n_predict, []):
        if first is None:
            first = (time.perf_counter(), piece.n_tokens)
        sys.stdout.write(piece.text)
        sys.stdout.flush()
        last = piece
    timing = GenerationTiming(len(ids), t0, first[0], first[1], time.perf_counter(), last.n_tokens)
    hits, requests = st.hits - hits0, st.requests - requests0
    # why it stopped, as `run` says it (-n beyond the demo's context stopped early without a word)
    full = last.finish_reason == "length" and (args.n_predict < 0 or last.n_tokens < args.n_predict)
    why = (f"the demo's context of {N_CTX} tokens is full after {last.n_tokens} generated" if full else
           last.finish_reason or "stop")
    print(f"\n[{why}]", file=sys.stderr)
    print(f"\n{timing.speeds()}; peak RSS {peak_rss_bytes() / 2**20:.0f} MiB; "
          f"expert cache hit rate {hits / max(requests, 1):.1%}, "
          f"{(st.bytes_read - read0) / 1e6:.1f} MB read from disk; "
          f"OpenMP waits {os.environ.get('OMP_WAIT_POLICY') or 'default'}", file=sys.stderr)
    model.close()
    return 0
