"""Flags shared by the `run`, `chat` and `bench` subcommands, named as llama.cpp names them.

Every numeric flag is checked by its argparse type, so that a value the runtime cannot use is
refused before anything loads (the runtime itself is imported only when a model loads), in one
line that names the flag and the value.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from runtime.base.errors import StepstreamError
from runtime.base.system import choose_wait_policy, peak_rss_bytes
from runtime.cli.arg_types import (budget_arg, budget_message, cache_type, gpu_budget_arg, mtp_choice,
                                   non_negative_float, non_negative_int, penalty, positive_float, positive_int, reasoning_budget,
                                   repeat_window, seed, temperature, token_limit, top_k, top_p, unit_interval)
from runtime.cli.text_args import existing_file, process_escapes


# ---- shared flags -------------------------------------------------------------------------------

def add_cache_type_args(p: argparse.ArgumentParser) -> None:
    """llama.cpp's KV cache type flags (RuntimeOptions.cache_type_k / cache_type_v)."""
    for which, what in (("k", "keys"), ("v", "values")):
        p.add_argument(f"--cache-type-{which}", f"-ct{which}", type=cache_type, default="f16", metavar="TYPE",
                       help=f"KV cache type of the {what}: f32, f16 or q8_0 (8 bits and an f16 scale per 32) "
                            "(default: f16)")


def add_model_source(p: argparse.ArgumentParser) -> None:
    """-m FILE, or -hf REPO[:QUANT] (llama.cpp's flag): the model fetched from Hugging Face into
    its cache first (runtime/cli/__init__.py does it before the command runs: runtime.hub)."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("-m", "--model", type=existing_file("GGUF file"),
                        help="GGUF file (for a split model, any of its parts)")
    source.add_argument("-hf", "-hfr", "--hf-repo", metavar="USER/MODEL[:QUANT]",
                        help="a model on Hugging Face, fetched into its cache first (HF_HUB_CACHE) and used from "
                             "there afterwards, offline too: the GGUF tagged QUANT (default Q4_K_M, else Q8_0, else "
                             "the first), a split one's parts together (llama.cpp's flag)")
    add_hub_args(p)


def add_hub_args(p: argparse.ArgumentParser, dest: str = "hf_file") -> None:
    p.add_argument("-hff", "--hf-file", dest=dest, metavar="FILE",
                   help="the GGUF file of the repository to use, by its path there or a glob, in any case")
    p.add_argument("-hft", "--hf-token", metavar="TOKEN",
                   help="a Hugging Face token, for a private or gated repository (default: HF_TOKEN, or the one "
                        "`hf auth login` saved)")


def add_model_args(p: argparse.ArgumentParser, ctx_default: int | None = None, batch_default: int = 64,
                   ctx_help: str | None = None) -> None:
    """The model and expert-streaming flags. A subcommand with other defaults passes them here,
    so that its --help quotes the defaults it really uses (ctx_help: how it sizes the context)."""
    ctx_help = ctx_help or (f"{ctx_default}" if ctx_default else "model's, at most 4096")
    add_model_source(p)
    p.add_argument("-t", "--threads", type=positive_int, default=None,
                   help="compute threads (default: the libraries' choice)")
    p.add_argument("-c", "--ctx-size", type=non_negative_int, default=ctx_default,
                   help=f"context size in tokens, 0 = the model's (default: {ctx_help})")
    p.add_argument("-b", "--batch-size", type=positive_int, default=batch_default,
                   help=f"prompt tokens evaluated together (default: {batch_default})")
    p.add_argument("--activations", default="q8", choices=("q8", "f32"),
                   help="q8: round activations to int8 for quantized matrices and use integer dot products, "
                        "as llama.cpp does (fast); f32: float32 activations (exact) (default: q8)")
    p.add_argument("--gpu-budget", type=gpu_budget_arg, default=None, metavar="SIZE|auto",
                   help="run on the GPU with this much VRAM (e.g. 20GiB, or auto: the free VRAM less a reserve): "
                        "attention, shared experts and the KV cache first, then the hottest routed experts "
                        "(needs an NVIDIA GPU and numba-cuda: pip install 'stepstream[gpu]')")
    add_cache_type_args(p)
    g = p.add_argument_group("expert streaming (routed experts read from disk into a RAM cache)")
    g.add_argument("--ram-budget", type=budget_arg, default=None, metavar="SIZE",
                   help="RAM for the routed-expert cache, e.g. 6GiB or 800MiB; turns streaming on "
                        "(default: stream only when the model does not fit in available memory)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--stream", action="store_true",
                      help="stream routed experts with the default budget: available memory minus a reserve")
    mode.add_argument("--no-stream", action="store_true", help="keep every routed expert resident (memory-mapped)")
    g.add_argument("--cache-policy", default="lru", choices=("lru", "lfu", "pinned"), help="expert cache policy (default: lru)")
    g.add_argument("--profile", default=None, metavar="FILE", type=existing_file("profile (JSON) file"),
                   help="expert profile from `stepstream profile`: pin the most-used experts into half the cache")
    g.add_argument("--no-prefetch", action="store_true", help="do not read the next layer's likely experts ahead")
    g.add_argument("--fill-cache", action="store_true",
                   help="when streaming, read experts into the whole cache at load, so decoding starts warm "
                        "(nothing to do when every expert is in RAM)")
    g.add_argument("--no-direct-io", action="store_true", help="read experts through the page cache instead of O_DIRECT")
    g.add_argument("--stats", action="store_true",
                   help="print the peak RSS and speeds at the end, and the expert-cache statistics when experts stream")


def add_mtp_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mtp", type=mtp_choice, default="auto", metavar="auto|0..3",
                   help="speculative decoding with the file's MTP heads: auto chooses the draft length each step "
                        "from measured acceptance and step times (0 when drafting does not pay), 0 turns it off, "
                        "1..3 forces it; the output is the same either way (default: auto)")


def add_reasoning_args(p: argparse.ArgumentParser, who: str = "a chat reply") -> None:
    """llama.cpp's --reasoning-budget and --reasoning-budget-message
    (runtime.generation.reasoning_budget)."""
    p.add_argument("--reasoning-budget", type=reasoning_budget, default=-1, metavar="N",
                   help=f"reasoning tokens {who} may write before its </think> is forced; 0 ends reasoning at "
                        "once; -1: no limit (default: -1)")
    p.add_argument("--reasoning-budget-message", type=budget_message, default=None, metavar="TEXT",
                   help="text written before the forced </think>, e.g. ' Time to answer.' (default: none)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--n-predict", type=token_limit, default=-1,
                   help="tokens to generate; -1 = until end of text or context (default: -1)")
    p.add_argument("--temp", type=temperature, default=0.8, help="temperature; 0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=top_k, default=40, help="top-k sampling, 0 = off (default: 40)")
    p.add_argument("--top-p", type=top_p, default=0.95,
                   help="top-p sampling, 1.0 = off, 0 = the most likely token alone (default: 0.95)")
    p.add_argument("--min-p", type=unit_interval, default=0.05, help="min-p sampling, 0.0 = off (default: 0.05)")
    p.add_argument("--repeat-penalty", type=positive_float, default=1.0,
                   help="penalize repeated tokens, 1.0 = off (default: 1.0)")
    p.add_argument("--repeat-last-n", type=repeat_window, default=64,
                   help="tokens the penalties look back over, -1 = the whole context (default: 64)")
    p.add_argument("--presence-penalty", type=penalty, default=0.0,
                   help="subtract this from the logit of each token seen in those tokens, 0.0 = off (default: 0.0)")
    p.add_argument("--frequency-penalty", type=penalty, default=0.0,
                   help="subtract this times its count there from each token's logit, 0.0 = off (default: 0.0)")
    p.add_argument("--typical", type=non_negative_float, default=1.0, metavar="P",
                   help="locally typical sampling, 1.0 = off (default: 1.0)")
    p.add_argument("--xtc-probability", type=unit_interval, default=0.0, metavar="P",
                   help="exclude top choices (XTC) with this chance at each token, 0.0 = off (default: 0.0)")
    p.add_argument("--xtc-threshold", type=unit_interval, default=0.1, metavar="T",
                   help="XTC removes the tokens at least this likely but the least of them, > 0.5 = off (default: 0.1)")
    p.add_argument("--top-nsigma", type=penalty, default=-1.0, metavar="N",
                   help="keep the logits within N standard deviations of the largest, <= 0 = off (default: -1)")
    p.add_argument("--dynatemp-range", type=non_negative_float, default=0.0, metavar="R",
                   help="dynamic temperature: within --temp +- R by the candidates' entropy, 0.0 = off (default: 0.0)")
    p.add_argument("--dynatemp-exp", type=non_negative_float, default=1.0, metavar="E",
                   help="the dynamic temperature's exponent (default: 1.0)")
    p.add_argument("--dry-multiplier", type=non_negative_float, default=0.0, metavar="M",
                   help="DRY: penalize tokens that extend a repetition, 0.0 = off (default: 0.0)")
    p.add_argument("--dry-base", type=non_negative_float, default=1.75, metavar="B",
                   help="DRY's growth with the repetition's length (default: 1.75)")
    p.add_argument("--dry-allowed-length", type=non_negative_int, default=2, metavar="N",
                   help="DRY: repetitions this long go unpenalized (default: 2)")
    p.add_argument("--dry-penalty-last-n", type=repeat_window, default=-1, metavar="N",
                   help="DRY looks back over this many tokens, -1 = the whole context (default: -1)")
    p.add_argument("--dry-sequence-breaker", action="append", default=None, metavar="TEXT",
                   help="a text that ends a repetition for DRY (may be given several times; replaces the "
                        "default \\n : \" *; 'none' for none)")
    p.add_argument("--mirostat", type=int, choices=(0, 1, 2), default=0,
                   help="mirostat sampling (then only the temperature applies besides it), 0 = off (default: 0)")
    p.add_argument("--mirostat-lr", type=non_negative_float, default=0.1, metavar="ETA",
                   help="mirostat's learning rate (default: 0.1)")
    p.add_argument("--mirostat-ent", type=non_negative_float, default=5.0, metavar="TAU",
                   help="mirostat's target entropy, in bits of surprise per token (default: 5.0)")
    p.add_argument("-s", "--seed", type=seed, default=None, help="random seed, -1 = random (default: random)")
    p.add_argument("-r", "--reverse-prompt", action="append", default=[], metavar="STOP",
                   help="stop generating at this text (may be given several times)")
    add_escape_args(p)


def add_escape_args(p: argparse.ArgumentParser) -> None:
    """-e/--no-escape, naming the text flags this command has (run: -p and -r; chat: -sys and -r)."""
    texts = [f for f in ("-p", "-sys", "-r") if f in p._option_string_actions]
    names = ", ".join(texts[:-1]) + (" and " if len(texts) > 1 else "") + texts[-1]
    p.add_argument("-e", "--escape", action="store_true", default=True,
                   help=f"turn \\n, \\r, \\t, \\', \\\", \\\\ and \\xHH in {names} into their characters, "
                        "as llama.cpp does (default: on)")
    p.add_argument("--no-escape", dest="escape", action="store_false", help=f"take {names} as written")


def context_size(args, needed: int = 0, why: str = "") -> int:
    """The KV cache's positions a command will load with, from the GGUF header alone: -c, or the
    model's context up to 4096 (the loader's rule). Refuses, before loading, a -c beyond the
    model's context and one below `needed` positions (`why`: the flags that need them); without
    -c, `needed` positions beyond the default raise it (args.ctx_size is set)."""
    from runtime.base.config import ModelConfig
    from runtime.base.gguf_file import GGUFModelFile
    from runtime.base.options import RuntimeOptions

    limit = ModelConfig.from_gguf(GGUFModelFile(args.model)).context_length
    if args.ctx_size == 0:  # llama.cpp's -c 0: the model's context length
        args.ctx_size = limit
    if args.ctx_size is not None and args.ctx_size > limit:
        raise StepstreamError(f"-c/--ctx-size {args.ctx_size} exceeds the context length of {args.model}: {limit}")
    if needed > limit:
        raise StepstreamError(f"{why} need {needed} positions, more than the context length of {args.model}: {limit}")
    if args.ctx_size is not None and needed > args.ctx_size:
        raise StepstreamError(f"{why} need {needed} positions, more than -c/--ctx-size {args.ctx_size}")
    if args.ctx_size is None and needed > RuntimeOptions().context(limit):
        args.ctx_size = needed
    return RuntimeOptions(n_ctx=args.ctx_size).context(limit)


def _say_thread_cap(args) -> None:
    """-t beyond the threads numba may run (NUMBA_NUM_THREADS: the machine's cores by default) is
    capped there; said, not done silently (`convert --threads` refuses such a count)."""
    import numba

    limit = numba.config.NUMBA_NUM_THREADS
    if args.threads is not None and args.threads > limit:
        print(f"-t {args.threads}: the kernels run at most {limit} threads here (NUMBA_NUM_THREADS)"
              + getattr(args, "threads_note", "").format(limit=limit), file=sys.stderr)


def load_model(args):
    from runtime.loader import load  # here, not at the top: a bad argument is refused before seconds of imports

    if getattr(args, "no_stream", False) and args.ram_budget is not None:
        raise StepstreamError("--ram-budget sizes the streamed experts' cache; it cannot go with --no-stream")
    choose_wait_policy(args.threads)
    context_size(args)
    _say_thread_cap(args)
    model = load(args.model, n_ctx=args.ctx_size, n_threads=args.threads, n_batch=args.batch_size,
                 experts="stream" if args.stream else "ram" if args.no_stream else "auto", ram_budget=args.ram_budget,
                 cache_policy=args.cache_policy, profile=args.profile, prefetch=not args.no_prefetch,
                 fill_cache=args.fill_cache, direct_io=not args.no_direct_io, activations=args.activations, gpu_budget=args.gpu_budget,
                 mtp=getattr(args, "mtp", None) or 0, cache_type_k=args.cache_type_k,
                 cache_type_v=args.cache_type_v, prompt_cache=getattr(args, "cache_ram", 0))
    if model.gpu_placement is not None:
        print(f"tier 1, {model.gpu_placement.text()}", file=sys.stderr)
        ram = model.placement.text() if model.placement is not None else "every routed expert mapped from the file"
        print(f"tier 2, RAM: {ram}", file=sys.stderr)
        print("tier 3, disk: " + ("the experts the RAM cache does not hold stream from " + str(model.file.path)
                                  if model.placement is not None else "nothing streams"), file=sys.stderr)
    elif model.placement is not None:
        print(model.placement.text(), file=sys.stderr)
    forced = getattr(args, "mtp", None)
    if isinstance(forced, int) and forced > model.n_mtp:  # a forced draft length the file cannot give
        print(f"{model.file.path}: " + (f"{model.n_mtp} MTP head{'s' if model.n_mtp > 1 else ''}; --mtp {forced} "
                                        f"drafts at most {model.n_mtp}" if model.n_mtp else
                                        f"no MTP heads; --mtp {forced} decodes without drafting"), file=sys.stderr)
    report_warm_up(model)
    return model


@contextmanager
def interrupts_kept():
    """Ctrl-C and SIGTERM inside the block are not lost. While numba loads its kernels, the
    signal's exception is raised inside llvmlite's ctypes callbacks, where ctypes reports it as
    "Exception ignored" and drops it: a review's Ctrl-C during "loading the kernels..." let the
    run go on to exit 0, 3 times in 3 (and SIGTERM, since every command raises Terminated on it).
    Here the handlers record the signal, the dropped exception is not printed, and the block's
    end raises the first signal's exception when one was dropped, in place of any other exception
    the block ends with then."""
    from runtime.base.errors import HungUp, Terminated

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kinds = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}
    if hasattr(signal, "SIGHUP"):
        kinds[signal.SIGHUP] = HungUp
    previous = {s: signal.getsignal(s) for s in kinds}
    watched = [s for s, p in previous.items()
               if p is not signal.SIG_IGN and (s == signal.SIGINT or p is not signal.SIG_DFL)]  # raised there
    hook = sys.unraisablehook
    hit = []

    def handler(signum, frame):
        hit.append(signum)
        raise kinds[signum]

    def unraisable(u):
        if not isinstance(u.exc_value, KeyboardInterrupt):
            hook(u)

    for s in watched:
        signal.signal(s, handler)
    sys.unraisablehook = unraisable
    try:
        yield
    except BaseException as e:
        # The dropped signal can leave numba broken mid-compile ("no compiled object yet"): what
        # then escapes is that breakage, and the signal is what the user sent (a review: exit 1
        # with a traceback, 1 time in 25). The signal's exception goes up instead.
        if hit and not isinstance(e, tuple(kinds.values())):
            raise kinds[hit[0]]() from None
        raise
    finally:
        for s in watched:
            signal.signal(s, previous[s])
        sys.unraisablehook = hook
    if hit:
        raise kinds[hit[0]]


@contextmanager
def compiles_counted():
    """[n]: numba's compiles inside the block (a cache hit is no compile)."""
    from numba.core import event

    count = [0]

    class Counter(event.Listener):
        def on_start(self, ev):
            count[0] += 1

        def on_end(self, ev):
            pass

    listener = Counter()
    event.register("numba:compile", listener)
    try:
        yield count
    finally:
        event.unregister("numba:compile", listener)


def warm_up_note(seconds: float, compiled: int) -> str:
    if compiled:
        return f" compiled in {seconds:.0f} s (first run after an install; cached from now on)"
    return f" done in {seconds:.0f} s" if seconds > 3 else " done"


def report_warm_up(model) -> None:
    """Load (or, on a first run, compile) the kernels before anything is timed, and say so when
    it took long enough to notice."""
    print("loading the kernels...", end="", file=sys.stderr, flush=True)
    try:
        with interrupts_kept(), compiles_counted() as compiled:
            seconds = model.warm_up()
    except BaseException:
        print(file=sys.stderr)  # the error that follows gets a line of its own
        raise
    print(warm_up_note(seconds, compiled[0]), file=sys.stderr, flush=True)


# ---- what a run reports -------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerationTiming:
    """When a streamed generation began, showed its first text, and ended.

    The first piece of text can come after several tokens (a token may hold part of a
    character), so the decode rate counts only the tokens after that piece, over the time
    after it: it needs at least one such token, so two or more generated in all.
    """

    n_prompt: int
    start: float
    first: float  # when the first piece arrived
    n_first: int  # tokens generated when it arrived
    end: float
    n_tokens: int  # generated in all

    @property
    def first_seconds(self) -> float:
        return self.first - self.start

    @property
    def decode_tokens(self) -> int:
        return self.n_tokens - self.n_first

    def decode_rate(self) -> float | None:
        """Tokens per second after the first piece; None when no token came after it."""
        if self.decode_tokens < 1 or self.end <= self.first:
            return None
        return self.decode_tokens / (self.end - self.first)

    def speeds(self) -> str:
        rate = self.decode_rate()
        tail = (f"then {rate:.2f} tok/s over {self.decode_tokens} token{'s' if self.decode_tokens != 1 else ''}" if rate is not None
                else "too few tokens for a decode rate")
        return f"prompt of {self.n_prompt} tokens and first token: {self.first_seconds:.2f} s; {tail}"


def print_stats(args, model, speeds: str | None = None, stats_text: str | None = None) -> None:
    """With --stats: the expert-cache statistics when experts stream (`stats_text`, when given:
    those of a part of the run, as its JSON reports them), then always the peak RSS and the
    speeds that were measured."""
    if not args.stats:
        return
    stats = model.provider.stats
    if stats_text is not None:
        print(stats_text, file=sys.stderr)
    elif stats is not None:
        print(stats.text(), file=sys.stderr)
    line = f"peak RSS {peak_rss_bytes() / 2**20:.0f} MiB"
    print(line + (f"; {speeds}" if speeds else ""), file=sys.stderr)


def sampling_kwargs(args) -> dict:
    return dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed,
                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                typical_p=args.typical, xtc_probability=args.xtc_probability, xtc_threshold=args.xtc_threshold,
                top_n_sigma=args.top_nsigma, mirostat=args.mirostat, mirostat_tau=args.mirostat_ent,
                mirostat_eta=args.mirostat_lr, dynatemp_range=args.dynatemp_range, dynatemp_exponent=args.dynatemp_exp,
                dry_multiplier=args.dry_multiplier, dry_base=args.dry_base, dry_allowed_length=args.dry_allowed_length,
                dry_penalty_last_n=args.dry_penalty_last_n,
                **({} if args.dry_sequence_breaker is None else {"dry_sequence_breakers": _breakers(args)}))


def _breakers(args) -> tuple:
    """--dry-sequence-breaker's texts, as llama.cpp reads them: they replace the default ones, and
    "none" drops every one given before it."""
    out: list[str] = []
    for b in args.dry_sequence_breaker:
        out = [] if b == "none" else out + [process_escapes(b) if args.escape else b]
    return tuple(out)


def max_tokens(args) -> int | None:
    return None if args.n_predict < 0 else args.n_predict
