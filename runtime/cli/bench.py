"""`stepstream bench`: prompt-processing and generation speed, optionally beside llama.cpp.

Like llama-bench: `-p N` random prompt tokens are evaluated in one go from an empty cache
(prefill), then `-n N` further random tokens are fed one at a time after them (decode: a
token-generation step without the sampling), each timed separately; the median of `-r`
repetitions is reported. Both engines get the very same token ids. With `--llama-cpp`, llama-cpp-python runs the
same prompt and the same token-by-token decode with the same threads, in a child process
so that its memory does not count towards ours; the two engines' repetitions alternate, so that
a shared machine's noise falls on both.

With `--sweep-ram 25%,35%,6GiB`, nothing runs in this process: each engine runs in a child of
its own under each cgroup memory cap in turn, with the page cache evicted first
(runtime.bench.sweep), and the results go to --sweep-out.json and a plot to --sweep-out.png.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import sys
import time

import numpy as np


from runtime.base.errors import StepstreamError
from runtime.cli.common import add_model_args, context_size, load_model, print_stats
from runtime.cli.arg_types import mtp_choice, non_negative_int, positive_int
from runtime.base.system import peak_rss_bytes


def add_arguments(p) -> None:
    add_model_args(p, batch_default=512,  # llama-bench's micro-batch: the whole prompt in one chunk
                   ctx_help="-p + -n, as llama-bench sizes it")
    p.add_argument("-p", "--n-prompt", type=non_negative_int, default=128,
                   help="prompt tokens to evaluate; 0 times decoding alone, as llama-bench's -p 0 (default: 128)")
    p.add_argument("-n", "--n-gen", type=non_negative_int, default=32,
                   help="tokens to generate; 0 = measure the prompt only (default: 32)")
    p.add_argument("-r", "--repetitions", type=positive_int, default=1,
                   help="runs of each test; the median is reported (default: 1)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random prompt (default: 0)")
    p.add_argument("--llama-cpp", action="store_true", help="also measure llama.cpp (llama-cpp-python) on the same file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--mtp", type=mtp_choice, default=None, metavar="auto|0..3",
                   help="also time greedy generation of -n tokens after a text prompt (a source file of this "
                        "package) with this MTP draft length: decode rate, acceptance per head, tokens per verify "
                        "pass, the length auto settled on, expert bytes read per token when streaming")
    g = p.add_argument_group("RAM sweep (each engine in a child process under a cgroup-v1 memory cap)")
    g.add_argument("--sweep-ram", default=None, metavar="CAPS",
                   help="comma-separated RAM caps, as shares of the model file (35%%) or sizes (6GiB): run "
                        "stepstream (and llama.cpp with --llama-cpp) under each, -r times, alternating, with the "
                        "page cache evicted before every run")
    g.add_argument("--sweep-out", default=None, metavar="PREFIX",
                   help="where the sweep writes PREFIX.json (after every run) and PREFIX.png (default: bench-sweep); "
                        "a directory (an existing one, or a path ending in /) means DIR/bench-sweep.json and .png")
    g.add_argument("--force", action="store_true",
                   help="with --sweep-ram: replace the JSON and PNG of an earlier sweep at --sweep-out (refused without)")
    g.add_argument("--sweep-timeout", type=positive_int, default=None, metavar="S",
                   help="seconds after which a sweep run is stopped and recorded as failed (default: 1800)")


SWEEP_OUT = "bench-sweep"  # --sweep-out's default
SWEEP_TIMEOUT_S = 1800  # --sweep-timeout's default


def _prompt(vocab: int, n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def _warm(model, prompt: list[int], gen: list[int]) -> None:
    """One untimed pass over the whole prompt and one token, as llama-bench's warm-up: the first
    calls of each path load or compile its kernels and grow the heap, and a prompt shorter than
    the timed one takes another path (up to 8 tokens the few-token kernels, beyond them GEMM)."""
    model.reset()
    if prompt:
        model.eval(prompt)
    model.eval(gen[:1] or prompt[:1])


def _timed(model, prompt: list[int], gen: list[int]) -> tuple[float, float]:
    """One repetition: the prompt from an empty cache, then the tokens one at a time; (prefill s, decode s).
    Streaming statistics start again before the decode: what a bench reports of them (--json's
    "experts", --stats) is the last repetition's decode, what `plan` predicts, not the warm-up's
    or the prefill's requests mixed in."""
    model.reset()
    t0 = time.perf_counter()
    if prompt:  # -p 0: decoding from an empty cache, as llama-bench's tg test
        model.eval(prompt)
    pp = time.perf_counter() - t0
    stats = getattr(getattr(model, "provider", None), "stats", None)  # ours streaming (llama.cpp's runs here too)
    if stats is not None and gen:
        stats.restart()
    t0 = time.perf_counter()
    for t in gen:
        model.eval([t])
    return pp, time.perf_counter() - t0


def bench_ours(model, prompt: list[int], gen: list[int], reps: int) -> dict:
    _warm(model, prompt, gen)
    times = [_timed(model, prompt, gen) for _ in range(reps)]
    return _rates(prompt, gen, [p for p, _ in times], [t for _, t in times])


def _rates(prompt, gen, pp: list[float], tg: list[float]) -> dict:
    return {"prefill_tok_s": len(prompt) / float(np.median(pp)) if prompt else None,
            "decode_tok_s": len(gen) / float(np.median(tg)) if gen else None,
            "peak_rss_bytes": peak_rss_bytes()}


_QUIET = []  # the log callback, kept alive while llama.cpp may call it


def _quiet_llama_cpp(llama_cpp) -> None:
    """No llama.cpp log lines in the bench's table (verbose=False leaves some through, such as
    its SWA cache notice)."""
    if not _QUIET and hasattr(llama_cpp, "llama_log_set") and hasattr(llama_cpp, "llama_log_callback"):
        _QUIET.append(llama_cpp.llama_log_callback(lambda level, text, user_data: None))
        llama_cpp.llama_log_set(_QUIET[0], None)


def _llama_cpp_child(path: str, prompt: list[int], gen: list[int], threads: int | None, batch: int,
                     kv_types: tuple[str, str], n_ctx: int, commands, results) -> None:
    """llama.cpp's side of an alternated run: after loading and a warm-up it puts None on
    results, then runs one repetition per True on commands (putting its two times), and on
    False closes and puts its peak RSS."""
    import signal

    import llama_cpp

    # Ctrl-C reaches the whole process group: the parent decides, and ends this process itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _quiet_llama_cpp(llama_cpp)
    threads = threads or os.cpu_count()
    ggml = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}
    # The same cache types as ours; llama.cpp stores a quantized V cache only with flash attention.
    flash = {"flash_attn": True} if kv_types[1] == "q8_0" else {}
    # ours' context (-c, or the prompt and the decoded tokens), with the room its warm-up needs
    llm = llama_cpp.Llama(model_path=path, n_ctx=max(n_ctx, len(prompt) + len(gen) + 8), n_batch=batch, n_ubatch=batch,
                          n_threads=threads, n_threads_batch=threads, type_k=ggml[kv_types[0]],
                          type_v=ggml[kv_types[1]], verbose=False, **flash)
    _warm(llm, prompt, gen)
    results.put(llm.n_ctx())  # loaded and warm
    while commands.get():
        results.put(_timed(llm, prompt, gen))
    llm.close()
    results.put(peak_rss_bytes())


class LlamaCppBeside:
    """llama.cpp (llama-cpp-python) on the same file in a child process of its own (its memory
    does not count towards ours), loaded and warmed up once, then run one repetition at a time
    when asked: so the caller alternates the two engines' repetitions, and a shared machine's
    slow minute slows both alike instead of only the engine that happened to run in it."""

    def __init__(self, path: str, prompt: list[int], gen: list[int], threads: int | None, batch: int,
                 kv_types: tuple[str, str] = ("f16", "f16"), n_ctx: int = 0):
        ctx = multiprocessing.get_context("spawn")
        self.commands, self.results = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_llama_cpp_child, daemon=True,
                                args=(path, prompt, gen, threads, batch, kv_types, n_ctx, self.commands, self.results))
        self.proc.start()
        try:
            self.n_ctx = self._get()  # the context llama.cpp made
        except BaseException:  # Ctrl-C while it loads, or it failed
            self.terminate()
            raise

    def _get(self):
        import queue

        while True:
            try:
                return self.results.get(timeout=1.0)
            except queue.Empty:
                if not self.proc.is_alive():
                    raise StepstreamError(f"llama.cpp's benchmark process exited (code {self.proc.exitcode}) "
                                          "before it reported; run llama.cpp on the file alone to see why")

    def repetition(self) -> tuple[float, float]:
        """One repetition in the child: (prefill s, decode s)."""
        self.commands.put(True)
        return self._get()

    def close(self) -> int:
        """Ends the child; its peak RSS in bytes."""
        self.commands.put(False)
        rss = self._get()
        self.proc.join()
        self._close_queues()
        return rss

    def terminate(self) -> None:
        """Ends the child now, wherever it is (an interrupted or failed benchmark)."""
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self._close_queues()

    def _close_queues(self) -> None:
        for q in (self.commands, self.results):
            q.close()
            q.cancel_join_thread()


def bench_beside_llama_cpp(model, prompt: list[int], gen: list[int], reps: int, threads: int | None, batch: int
                           ) -> tuple[dict, dict, list[dict]]:
    """Our repetitions and llama.cpp's alternated, ours first in each pair (llama.cpp's KV cache
    in ours' types, RuntimeOptions.kv_types): (ours, llama.cpp's, the runs in the order they ran)."""
    _warm(model, prompt, gen)
    other = LlamaCppBeside(str(model.file.path), prompt, gen, threads, batch, model.options.kv_types, model.n_ctx)
    runs = []
    try:
        for _ in range(reps):
            for engine, rep in (("stepstream", lambda: _timed(model, prompt, gen)), ("llama.cpp", other.repetition)):
                pp, tg = rep()
                runs.append({"engine": engine, "prefill_s": pp, "decode_s": tg})
    except BaseException:  # Ctrl-C, SIGTERM or a failure: the child ends now, the error stays the one raised
        other.terminate()
        raise
    rss = other.close()
    times = {e: ([r["prefill_s"] for r in runs if r["engine"] == e], [r["decode_s"] for r in runs if r["engine"] == e])
             for e in ("stepstream", "llama.cpp")}
    return ({**_rates(prompt, gen, *times["stepstream"]), "n_ctx": model.n_ctx},
            {**_rates(prompt, gen, *times["llama.cpp"]), "peak_rss_bytes": rss, "n_ctx": other.n_ctx}, runs)


# Flags that choose how one in-process run loads or what it reports; a sweep sets these itself.
SWEEP_EXCLUDES = (("ram_budget", "--ram-budget"), ("stream", "--stream"), ("no_stream", "--no-stream"),
                  ("ctx_size", "-c/--ctx-size"),
                  ("gpu_budget", "--gpu-budget"), ("profile", "--profile"), ("mtp", "--mtp"), ("json", "--json"),
                  ("stats", "--stats"))


def run_sweep(args) -> int:
    import signal
    import threading

    from runtime.base.errors import raise_terminated
    from runtime.bench.sweep import (SweepOptions, output_paths, parse_caps, run_sweep as sweep, table_text, write_json,
                                     write_plot)
    from runtime.cli.text_args import writable_output

    caps = parse_caps(args.sweep_ram)
    for name, flag in SWEEP_EXCLUDES:
        value = getattr(args, name, None)
        if value is not None and value is not False:  # (-c 0 is given: 0 == False)
            why = ("both engines' contexts hold the prompt and the decoded tokens (-p + -n + 8)" if name == "ctx_size"
                   else "the sweep sets each run's RAM itself")
            raise StepstreamError(f"{flag} does not go with --sweep-ram: {why}")
    if (args.cache_type_k, args.cache_type_v) != ("f16", "f16"):
        raise StepstreamError("--cache-type-k/-v do not go with --sweep-ram: both engines' runs keep the "
                              "default f16 KV cache")
    out_json, out_png = output_paths(args.sweep_out or SWEEP_OUT, args.force)
    writable_output(out_json, "sweep results")
    writable_output(out_png, "sweep plot")
    # Passive OpenMP waits for every child of both engines, unless the user set a policy: the runs
    # stream under memory caps, where spinning threads take the cores from the reader threads and
    # the kernel's reclaim (a review: 3.4 / 4.0 tok/s decode at 30% / 50% with libgomp's default,
    # 20.6 / 15.2 with PASSIVE), and a 0.2 s sample of the machine's load at the start (what
    # choose_wait_policy does for one run) chose the default 4 times in 10 on this shared host.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import numba

    # ours never run more than numba's limit (this machine's cores by default): llama.cpp's runs get the same
    threads = min(args.threads or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS)
    if args.threads is not None and threads != args.threads:
        print(f"-t {args.threads}: the kernels run at most {threads} threads here (NUMBA_NUM_THREADS); "
              f"both engines use {threads}", file=sys.stderr)
    opts = SweepOptions(model=args.model, caps=tuple(caps),
                        engines=("stepstream", "llama.cpp") if args.llama_cpp else ("stepstream",),
                        repeats=args.repetitions, n_prompt=args.n_prompt, n_gen=args.n_gen, threads=threads,
                        batch=args.batch_size, seed=args.seed, prefetch=not args.no_prefetch,
                        fill_cache=args.fill_cache,
                        direct_io=not args.no_direct_io, cache_policy=args.cache_policy, activations=args.activations,
                        timeout=args.sweep_timeout or SWEEP_TIMEOUT_S)
    last = {}

    def keep(report: dict) -> None:
        """After each run: the results so far on disk. A failed write (a full disk) does not stop
        the sweep; the next run's write, or the last, tries again, and the table on stdout holds
        the results whatever happens."""
        last["report"] = report
        ran = [r for row in report["caps"] for e in row["engines"].values() for r in e["runs"]
               if r["status"] != "does not fit"]
        if not ran and not last.get("written") and out_json.exists():
            last["kept"] = True  # nothing measured yet: an earlier sweep's report (--force) stays whole
            return
        try:
            write_json(report, out_json)
            last["written"] = True
            last.pop("kept", None)
            last.pop("error", None)
        except StepstreamError as e:
            last["error"] = e

    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, raise_terminated) if main_thread else None  # `kill` cleans up as Ctrl-C
    try:
        report = sweep(opts, log=lambda line: print(line, flush=True), after_run=keep)
    except KeyboardInterrupt:
        if last.get("report", {}).get("state") == "interrupted":
            print(table_text(last["report"]), flush=True)
            if "error" in last:
                print(f"{last['error']} (interrupted: the table above holds what ran)", flush=True)
            elif "kept" in last:
                print(f"interrupted before any run ended: {out_json} is left as it was (--force replaces it only "
                      "with results)", flush=True)
            else:
                print(f"wrote {out_json} (interrupted: its \"state\" says so, and \"not_run\" lists what did "
                      "not run)", flush=True)
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(table_text(report), flush=True)
    try:
        write_json(report, out_json)
    except StepstreamError as e:
        raise StepstreamError(f"{e}; the table above holds the sweep's results") from None
    hint = write_plot(report, out_png)
    print(f"wrote {out_json}" + (f"; {hint}" if hint else f" and {out_png}"))
    ran = [r for row in report["caps"] for e in row["engines"].values() for r in e["runs"] if r["status"] != "does not fit"]
    if ran and not any(r["status"] == "ok" for r in ran):  # a table of dashes is no result: say so, exit 2
        reasons = sorted({r.get("reason", r["status"]) for r in ran})
        raise StepstreamError(f"--sweep-ram: every run failed ({len(ran)} of {len(ran)}): {reasons[0]}"
                              + (f" (and {len(reasons) - 1} other reason{'s' if len(reasons) > 2 else ''})"
                                 if len(reasons) > 1 else ""))
    return 0


def run(args) -> int:
    if args.llama_cpp and importlib.util.find_spec("llama_cpp") is None:  # before any run, ours included
        raise StepstreamError("--llama-cpp needs llama-cpp-python, which is not installed: "
                              "pip install 'llama-cpp-python>=0.3.36' (or the test extras, pip install -e '.[test]')")
    if args.n_prompt == 0 and args.n_gen == 0:
        raise StepstreamError("-p 0 and -n 0: nothing to time (give -p N for prefill, -n N for decoding, or both)")
    if args.sweep_ram is not None:
        if args.n_prompt == 0:
            raise StepstreamError("-p 0 goes without --sweep-ram (a sweep times the prefill of each cap too)")
        return run_sweep(args)
    if args.force:  # it replaces a sweep's outputs; a plain bench writes no file
        raise StepstreamError("--force goes with --sweep-ram (it lets a sweep replace an earlier sweep's JSON and PNG)")
    for flag, value in (("--sweep-out", args.sweep_out), ("--sweep-timeout", args.sweep_timeout)):
        if value is not None:  # a plain bench would run and ignore it
            raise StepstreamError(f"{flag} goes with --sweep-ram (a plain bench writes no sweep and runs no child)")
    # Room for the prompt and the decoded tokens (the warm-up's one at least), and without -c no
    # more (the KV cache, and a default budget's share of memory, sized for them), as llama-bench.
    if args.mtp is not None and args.n_gen < 2:  # its rate is over the tokens after the first
        raise StepstreamError(f"--mtp times generation with the MTP heads over the tokens after the first, which "
                              f"-n {args.n_gen} leaves none of; give -n 2 or more")
    args.threads_note = "; both engines use {limit}" if args.llama_cpp else ""  # (load_model's note on -t)
    needed = args.n_prompt + max(args.n_gen, 1)
    context_size(args, needed, f"-p {args.n_prompt} and -n {args.n_gen}")
    if args.ctx_size is None:
        args.ctx_size = needed
    model = load_model(args)
    import numba

    # The threads our kernels really run on (-t beyond NUMBA_NUM_THREADS, this machine's cores by
    # default, is capped): llama.cpp gets the same count, and the report says it
    threads = numba.get_num_threads()  # (load_model said so when -t asked for more)
    if args.mtp == "auto" and args.n_gen and model.n_mtp == 0:  # a forced length: load_model said so
        print(f"{model.file.path}: no MTP heads; generation is timed without drafting", file=sys.stderr)
    ids = _prompt(model.cfg.vocab, args.n_prompt + args.n_gen, args.seed)
    prompt, gen = ids[: args.n_prompt], ids[args.n_prompt :]
    report = {"model": str(model.file.path), "n_prompt": args.n_prompt, "n_gen": args.n_gen,
              "threads": threads, "batch_size": args.batch_size, "repetitions": args.repetitions,
              "activations": model.options.activations, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "default"}
    if args.llama_cpp:
        ours, report["llama_cpp"], report["runs"] = bench_beside_llama_cpp(
            model, prompt, gen, args.repetitions, threads, args.batch_size)
    else:
        ours = bench_ours(model, prompt, gen, args.repetitions)
    report.update(ours)
    stats_text = None
    if model.placement is not None:
        report["placement"] = model.placement.as_dict()
        scope = "the last repetition's decode" if gen else "the warm-up and every prefill"
        report["experts"] = {**model.provider.stats.as_dict(), "scope": scope}
        # --stats prints the same counts (the --mtp generation timed below streams experts too)
        stats_text = f"{model.provider.stats.text()} [{scope}]"
    if model.gpu_placement is not None:
        report["gpu"] = {**model.gpu_placement.as_dict(), **model.gpu.tier.counts.as_dict()}
    if args.mtp is not None and args.n_gen:
        from runtime.bench.generation import bench_generation, text_prompt

        report["generation"] = bench_generation(model, text_prompt(model, max(args.n_prompt, 1)), args.n_gen,
                                                args.repetitions, args.mtp)
    speeds = "; ".join(([f"prefill {report['prefill_tok_s']:.2f} tok/s over {args.n_prompt} tokens"] if args.n_prompt
                        else []) + ([f"decode {report['decode_tok_s']:.2f} tok/s over {args.n_gen} tokens"]
                                    if args.n_gen else []))
    if args.json:
        print(json.dumps(report))
        print_stats(args, model, speeds, stats_text)
        return 0
    rows = [("stepstream", report)] + ([("llama.cpp", report["llama_cpp"])] if args.llama_cpp else [])
    print(f"{'engine':<12} {'pp' + str(args.n_prompt) + ' tok/s':>14} {'tg' + str(args.n_gen) + ' tok/s':>14} {'peak RSS MiB':>13}", file=sys.stdout)
    for name, r in rows:
        decode = f"{r['decode_tok_s']:>14.2f}" if args.n_gen else f"{'-':>14}"
        prefill = f"{r['prefill_tok_s']:>14.2f}" if args.n_prompt else f"{'-':>14}"
        print(f"{name:<12} {prefill} {decode} {r['peak_rss_bytes'] / 2**20:>13.0f}")
    if args.llama_cpp:
        ll = report["llama_cpp"]
        decode = f"{report['decode_tok_s'] / ll['decode_tok_s']:>13.2f}x" if args.n_gen else f"{'-':>14}"
        prefill = f"{report['prefill_tok_s'] / ll['prefill_tok_s']:>13.2f}x" if args.n_prompt else f"{'-':>14}"
        print(f"{'ratio':<12} {prefill} {decode}")
    if "generation" in report:
        g = report["generation"]
        drafting = (f"{g['tokens_per_pass']:.2f} tokens per verify pass, acceptance per head {g['acceptance']} "
                    f"(of {g['drafts_per_head']} drafts), k settled on {g['settled_k']}"
                    if g["drafts_per_head"] is not None else
                    "no drafts (the file has no MTP heads)" if not model.n_mtp else "no drafts")
        print(f"generation --mtp {args.mtp}: {g['decode_tok_s']:.2f} tok/s over the {args.n_gen - 1} greedy tokens "
              f"after the first; {drafting}")
    print(f"(medians of {args.repetitions}; activations {report['activations']}, "
          f"OpenMP waits {report['omp_wait_policy']})")
    print_stats(args, model, speeds, stats_text)
    return 0
