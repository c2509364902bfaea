"""Decode speed under hard RAM caps: stepstream's expert streaming against llama.cpp's mmap.

    python -m runtime.bench.streaming [--model FILE.gguf] [--caps 0.45,0.55,0.75] [-n 32] [-r 3]

Without --model it makes the `large` miniature (64 experts, top-8) and converts it to
q4_k_m in --workdir. For each cap (a fraction of the GGUF's size) both engines run in a
child process inside a cgroup-v1 memory group of that size, page cache included, after
the file has been evicted from the page cache (POSIX_FADV_DONTNEED):

- stepstream streams routed experts with O_DIRECT into an expert cache sized to fit
  the cap (the cap minus the process's own footprint, measured once uncapped);
- llama.cpp runs with model params use_extra_bufts=False, lazy_mode=LLAMA_LAZY_MODE_ON,
  load_mode=LLAMA_LOAD_MODE_MMAP: its best mode when the file does not fit.

Both decode the same teacher-forced tokens one at a time with the same threads after the
same prompt. Printed per cap: decode tok/s of each (median of -r runs) and their ratio,
bytes read per token against the ideal (the bytes of the experts read for compute: misses
and used prefetches), the share of decode time spent waiting for experts, and the hit rate
(hits alone: a prefetched expert is not a hit).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from runtime.base.cgroup import CgroupUnavailable, MemoryCap, drop_page_cache

MARGIN = 16 * 2**20  # headroom inside the cap for allocator slack and thread stacks
# Pages of shared libraries (numpy, LLVM under numba) the process keeps touching; the
# kernel reclaims the rest of its file-backed pages when the cap presses.
FILE_WORKING_SET = 40 * 2**20


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def _tokens(n_prompt: int, n_gen: int, vocab: int) -> tuple[list[int], list[int]]:
    import numpy as np

    ids = np.random.default_rng(7).integers(4, vocab, n_prompt + n_gen).tolist()
    return ids[:n_prompt], ids[n_prompt:]


def child_ours(model: str, budget: int, n_prompt: int, n_gen: int, threads: int) -> dict:
    from runtime.base.system import peak_rss_bytes
    from runtime.loader import load

    m = load(model, ram_budget=budget, n_threads=threads, n_ctx=n_prompt + n_gen + 8)
    prompt, gen = _tokens(n_prompt, n_gen, m.cfg.vocab)
    m.eval(prompt)
    st = m.provider.stats
    before = (st.bytes_read, st.ideal_bytes, st.stall_seconds, st.hits, st.requests, st.prefetched_in_time)
    t0 = time.perf_counter()
    for t in gen:
        m.eval([t])
    dt = time.perf_counter() - t0
    out = {"decode_tok_s": len(gen) / dt, "decode_seconds": dt,
           "bytes_read_per_token": (st.bytes_read - before[0]) / len(gen),
           "ideal_bytes_per_token": (st.ideal_bytes - before[1]) / len(gen),
           "stall_share": (st.stall_seconds - before[2]) / dt,
           "hit_rate": (st.hits - before[3]) / max(1, st.requests - before[4]),
           "ready_rate": (st.hits - before[3] + st.prefetched_in_time - before[5]) / max(1, st.requests - before[4]),
           "prefetch_recall": st.prefetch_recall, "prefetch_precision": st.prefetch_precision,
           "cache_bytes": m.placement.cache_bytes, "cache_slots": m.placement.cache_slots,
           "peak_rss_bytes": peak_rss_bytes(), "rss_anon_bytes": rss_anon_bytes()}
    m.close()
    return out


def child_llama(model: str, n_prompt: int, n_gen: int, threads: int) -> dict:
    import llama_cpp
    import llama_cpp.llama_cpp as C

    default = C.llama_model_default_params

    def streaming_params():
        p = default()
        p.use_extra_bufts = False
        p.lazy_mode = C.LLAMA_LAZY_MODE_ON
        p.load_mode = C.LLAMA_LOAD_MODE_MMAP
        return p

    C.llama_model_default_params = streaming_params
    llm = llama_cpp.Llama(model_path=model, n_ctx=n_prompt + n_gen + 8, n_batch=n_prompt, n_threads=threads,
                          n_threads_batch=threads, use_mmap=True, verbose=False)
    prompt, gen = _tokens(n_prompt, n_gen, llm.n_vocab())
    llm.eval(prompt)
    t0 = time.perf_counter()
    for t in gen:
        llm.eval([t])
    dt = time.perf_counter() - t0
    llm.close()
    return {"decode_tok_s": len(gen) / dt, "decode_seconds": dt}


def _child(args: list[str], cap: MemoryCap | None, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "runtime.bench.streaming", "--child", *args]
    runner = cap.run if cap is not None else subprocess.run
    r = runner(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        killed = cap is not None and cap.oom_kills > 0
        return {"error": "killed by the memory cap (OOM)" if killed else (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def ensure_model(workdir: Path) -> Path:
    from convert.converter import convert
    from convert.mini import write_mini

    model = workdir / "large-q4_k_m.gguf"
    if not model.exists():
        ckpt = workdir / "large"
        if not ckpt.exists():
            write_mini(ckpt, "large", seed=0, progress=True)
        print(convert(ckpt, model, "q4_k_m").text())
    return model


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.bench.streaming", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="q4_k_m GGUF (default: the large miniature, made in --workdir)")
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "stepstream" / "bench"))
    p.add_argument("--caps", default="0.45,0.55,0.75", help="RAM caps as fractions of the file size")
    p.add_argument("-p", "--n-prompt", type=int, default=8)
    p.add_argument("-n", "--n-gen", type=int, default=32)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--json", default=None, help="also write all results to this file")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    return p


def _run_cap(a, model: Path, frac: float, footprint: int, common: list[str]) -> dict:
    """Both engines under a cap of `frac` of the file, alternating, -r times; one result row."""
    cap_bytes = int(model.stat().st_size * frac)
    budget = cap_bytes - footprint - MARGIN
    runs = {"ours": [], "llama": []}
    for _ in range(a.repetitions):
        for kind in ("ours", "llama"):
            drop_page_cache(model)
            args = ["ours", str(model), str(budget), *common] if kind == "ours" else ["llama", str(model), *common]
            with MemoryCap(cap_bytes) as cap:
                res = _child(args, cap, a.timeout)
                res["cgroup_max_usage"] = cap.max_usage
            runs[kind].append(res)
    return {"cap_fraction": frac, "cap_bytes": cap_bytes, "budget": budget, "runs": runs}


def _print_row(row: dict) -> None:
    runs = row["runs"]

    def med(kind, key):
        vals = [r[key] for r in runs[kind] if key in r]
        return statistics.median(vals) if vals else float("nan")

    ours, theirs = med("ours", "decode_tok_s"), med("llama", "decode_tok_s")
    errs = [r["error"] for k in runs for r in runs[k] if "error" in r]
    print(f"{row['cap_bytes'] / 2**20:>6.0f}MiB {ours:>11.2f} {theirs:>12.2f} {ours / theirs:>6.2f} "
          f"{row['budget'] / 2**20:>6.0f}MiB {med('ours', 'bytes_read_per_token') / 2**20:>7.2f}MiB "
          f"{med('ours', 'ideal_bytes_per_token') / 2**20:>7.2f}MiB {med('ours', 'stall_share'):>6.1%} "
          f"{med('ours', 'hit_rate'):>5.0%}" + (f"  errors: {errs}" if errs else ""))


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.child:
        kind, model, *rest = a.child
        n_prompt, n_gen, threads = int(rest[-3]), int(rest[-2]), int(rest[-1])
        res = (child_ours(model, int(rest[0]), n_prompt, n_gen, threads) if kind == "ours"
               else child_llama(model, n_prompt, n_gen, threads))
        print(json.dumps(res))
        return 0

    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = Path(a.model) if a.model else ensure_model(workdir)
    size = model.stat().st_size
    common = [str(a.n_prompt), str(a.n_gen), str(a.threads)]
    # Our footprint beside the cache, from one uncapped run with a small (fully used) cache:
    # anonymous memory, plus a working set of library code pages.
    probe = _child(["ours", str(model), str(16 * 2**20), *common], None, a.timeout)
    if "error" in probe:
        print(f"probe run failed: {probe['error']}", file=sys.stderr)
        return 1
    footprint = probe["rss_anon_bytes"] - probe["cache_bytes"] + FILE_WORKING_SET
    print(f"model {model.name}: {size / 2**20:.0f} MiB; our footprint without the expert cache "
          f"{footprint / 2**20:.0f} MiB (peak RSS of the probe {probe['peak_rss_bytes'] / 2**20:.0f} MiB); "
          f"{a.threads} threads, {a.n_gen} decoded tokens, median of {a.repetitions}")
    print(f"{'cap':>9} {'ours tok/s':>11} {'llama tok/s':>12} {'ratio':>6} {'cache':>9} {'read/tok':>10} "
          f"{'ideal/tok':>10} {'stall':>6} {'hit':>5}")
    results = []
    try:
        for frac in [float(x) for x in a.caps.split(",")]:
            results.append(_run_cap(a, model, frac, footprint, common))
            _print_row(results[-1])
    except CgroupUnavailable as e:
        print(f"cannot cap memory here: {e}", file=sys.stderr)
        return 1
    if a.json:
        Path(a.json).write_text(json.dumps({"model": str(model), "size": size, "footprint": footprint,
                                            "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
