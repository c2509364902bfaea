"""Decode speed under hard RAM caps: stepstream's expert streaming against llama.cpp's mmap.

    python -m runtime.bench.streaming [--model FILE.gguf] [--caps 0.45,0.55,0.75] [-n 32] [-r 3]
        [--prefetch gated,ungated,off] [--no-llama]

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

Each --prefetch mode of ours runs in turn (the gate of offload.prefetch_gate, every
candidate read ahead, none). Before the caps, the disk is measured (parallel 8 MB O_DIRECT
reads of the model file at several depths, and reads of one expert matrix's size), and
one uncapped run with every expert in RAM gives the compute time per token. Each row then
gives the roofline, time per token >= max(compute in RAM, bytes of the experts read for
compute / the disk's best measured bandwidth), and the share of it reached.
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
from runtime.base.errors import StepstreamError
from runtime.base.child import child_env

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


PREFETCH_MODES = ("gated", "ungated", "off")


def child_ours(model: str, budget: int, n_prompt: int, n_gen: int, threads: int, prefetch: str = "gated") -> dict:
    """Decode under a RAM budget for the expert cache (budget < 0: every expert in RAM)."""
    from runtime.base.system import peak_rss_bytes
    from runtime.loader import load

    common = dict(n_threads=threads, n_ctx=n_prompt + n_gen + 8)
    m = (load(model, experts="ram", **common) if budget < 0
         else load(model, ram_budget=budget, prefetch=prefetch != "off", **common))
    if prefetch == "ungated" and m.placement is not None:
        m.provider.gate = None
    prompt, gen = _tokens(n_prompt, n_gen, m.cfg.vocab)
    m.eval(prompt)
    if m.placement is None:  # all in RAM: compute alone
        t0 = time.perf_counter()
        for t in gen:
            m.eval([t])
        dt = time.perf_counter() - t0
        m.close()
        return {"decode_tok_s": len(gen) / dt, "decode_seconds": dt, "peak_rss_bytes": peak_rss_bytes()}
    st = m.provider.stats
    names = ("bytes_read", "ideal_bytes", "stall_seconds", "hits", "requests", "prefetched_in_time",
             "prefetch_used", "prefetch_wasted", "prefetch_reads", "prefetch_refused", "prefetch_cancelled",
             "read_seconds")
    before = {k: getattr(st, k) for k in names}
    t0 = time.perf_counter()
    for t in gen:
        m.eval([t])
    dt = time.perf_counter() - t0
    d = {k: getattr(st, k) - before[k] for k in names}
    used, wasted = d["prefetch_used"], d["prefetch_wasted"]
    out = {"decode_tok_s": len(gen) / dt, "decode_seconds": dt,
           "bytes_read_per_token": d["bytes_read"] / len(gen),
           "ideal_bytes_per_token": d["ideal_bytes"] / len(gen),
           "read_ratio": d["bytes_read"] / max(1, d["ideal_bytes"]),
           "read_gb_s": d["bytes_read"] / 1e9 / d["read_seconds"] if d["read_seconds"] else 0.0,
           "stall_share": d["stall_seconds"] / dt,
           "hit_rate": d["hits"] / max(1, d["requests"]),
           "ready_rate": (d["hits"] + d["prefetched_in_time"]) / max(1, d["requests"]),
           "prefetch_reads": d["prefetch_reads"], "prefetch_used": used, "prefetch_wasted": wasted,
           "prefetch_refused": d["prefetch_refused"], "prefetch_cancelled": d["prefetch_cancelled"],
           "prefetch_precision": used / (used + wasted) if used + wasted else float("nan"),
           "prefetch_recall": st.prefetch_recall, "guess_precision": st.guess_precision,
           "gate_ranks": m.provider.gate.per_rank() if m.provider.gate is not None else [],
           "gate_over_budget": m.provider.gate.over_budget if m.provider.gate is not None else 0,
           "cache_bytes": m.placement.cache_bytes, "cache_slots": m.placement.cache_slots,
           "peak_rss_bytes": peak_rss_bytes(), "rss_anon_bytes": rss_anon_bytes()}
    m.close()
    return out


def open_llama_streaming(model: str, n_ctx: int, n_batch: int, threads: int):
    """llama.cpp through llama-cpp-python in its best mode when the file does not fit: tensors
    memory-mapped and loaded lazily, no extra (repacked) buffers, which would copy every weight
    into anonymous memory. Patches the library's default model params, so call it in a child."""
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
    return llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_batch=n_batch, n_threads=threads,
                           n_threads_batch=threads, use_mmap=True, verbose=False)


def child_llama(model: str, n_prompt: int, n_gen: int, threads: int) -> dict:
    llm = open_llama_streaming(model, n_prompt + n_gen + 8, n_prompt, threads)
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
    r = runner(cmd, capture_output=True, text=True, timeout=timeout, env=child_env())
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


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
        return value

    return parse


positive_int, positive_float = _positive(int), _positive(float)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.bench.streaming", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="q4_k_m GGUF (default: the large miniature, made in --workdir)")
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "stepstream" / "bench"),
                   help="where the default model is made and kept (default: %(default)s)")
    p.add_argument("--caps", default="0.45,0.55,0.75",
                   help="RAM caps as fractions of the file size (default: %(default)s)")
    p.add_argument("-p", "--n-prompt", type=positive_int, default=8, help="prompt tokens (default: %(default)s)")
    p.add_argument("-n", "--n-gen", type=positive_int, default=32, help="decoded tokens timed (default: %(default)s)")
    p.add_argument("-r", "--repetitions", type=positive_int, default=3,
                   help="runs of each setting, alternated (default: %(default)s)")
    p.add_argument("-t", "--threads", type=positive_int, default=2, help="compute threads (default: %(default)s)")
    p.add_argument("--prefetch", default="gated", help="our read-ahead modes to run, alternating: gated, ungated, off")
    p.add_argument("--no-llama", action="store_true", help="run stepstream only")
    p.add_argument("--no-ram-run", action="store_true", help="skip the uncapped all-in-RAM run (the compute time)")
    p.add_argument("--timeout", type=positive_float, default=900,
                   help="seconds after which a run is stopped and recorded as failed (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write all results to this file")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    return p


def _kinds(a) -> list[str]:
    modes = [m.strip() for m in a.prefetch.split(",") if m.strip()]
    bad = [m for m in modes if m not in PREFETCH_MODES]
    if bad or not modes:
        raise SystemExit(f"--prefetch {a.prefetch!r}: choose among {', '.join(PREFETCH_MODES)}")
    return [f"ours:{m}" for m in modes] + ([] if a.no_llama else ["llama"])


def _run_cap(a, model: Path, frac: float, footprint: int, common: list[str]) -> dict:
    """Every engine (and read-ahead mode) under a cap of `frac` of the file, alternating, -r times."""
    cap_bytes = int(model.stat().st_size * frac)
    budget = cap_bytes - footprint - MARGIN
    kinds = _kinds(a)
    runs: dict[str, list] = {k: [] for k in kinds}
    for _ in range(a.repetitions):
        for kind in kinds:
            drop_page_cache(model)
            args = (["ours", str(model), str(budget), kind.split(":")[1], *common] if kind.startswith("ours")
                    else ["llama", str(model), *common])
            with MemoryCap(cap_bytes) as cap:
                res = _child(args, cap, a.timeout)
                res["cgroup_max_usage"] = cap.max_usage
            runs[kind].append(res)
    return {"cap_fraction": frac, "cap_bytes": cap_bytes, "budget": budget, "runs": runs}


def _median(runs: list[dict], key: str) -> float:
    vals = [r[key] for r in runs if key in r and r[key] == r[key]]  # NaN (nothing to measure) left out
    return statistics.median(vals) if vals else float("nan")


def roofline_seconds(compute_s: float, missed_bytes: float, disk_bytes_per_s: float) -> float:
    """The least time a token can take: compute with every expert in RAM, or reading the bytes of
    the experts it missed at the disk's bandwidth, whichever is longer (they can overlap)."""
    return max(compute_s, missed_bytes / disk_bytes_per_s)


HEADER = (f"{'cap':>9} {'engine':>14} {'tok/s':>7} {'ms/tok':>7} {'read/tok':>9} {'miss/tok':>9} {'read/miss':>9} "
          f"{'precision':>9} {'stall':>6} {'hit':>5} {'roofline':>9} {'share':>6} {'vs llama':>8}")


def _print_row(row: dict, compute_s: float, disk_bytes_per_s: float) -> None:
    errs = [r["error"] for k in row["runs"] for r in row["runs"][k] if "error" in r]
    for kind, runs in row["runs"].items():
        tok_s = _median(runs, "decode_tok_s")
        line = f"{row['cap_bytes'] / 2**20:>6.0f}MiB {kind:>14} {tok_s:>7.2f} {1e3 / tok_s:>7.1f}"
        if kind.startswith("ours"):
            miss = _median(runs, "ideal_bytes_per_token")
            roof = roofline_seconds(compute_s, miss, disk_bytes_per_s)
            line += (f" {_median(runs, 'bytes_read_per_token') / 1e6:>7.1f}MB {miss / 1e6:>7.1f}MB "
                     f"{_median(runs, 'read_ratio'):>8.3f}x {_median(runs, 'prefetch_precision'):>9.1%} "
                     f"{_median(runs, 'stall_share'):>6.1%} {_median(runs, 'hit_rate'):>5.0%} "
                     f"{roof * 1e3:>7.1f}ms {roof * tok_s:>6.1%}")
            if "llama" in row["runs"]:  # the ratio of the medians, one cap's runs against the other's
                line += f" {tok_s / _median(row['runs']['llama'], 'decode_tok_s'):>7.2f}x"
        print(line)
    if errs:
        print(f"  errors: {errs}")


def measure_disk(model: Path, expert_extent: int) -> dict:
    """The disk's read curve on the model file: 8 MB reads (smaller ones, and fewer depths, on a
    file too small to hold their distinct offsets: the miniatures), and reads of one expert
    matrix's size."""
    from offload.direct_io import depths_that_fit, knee, measure_read_bandwidth

    size = model.stat().st_size
    block = 8 * 2**20
    while block > expert_extent and len(depths_that_fit(size, block)) < 3:
        block //= 2
    big_depths, small_depths = depths_that_fit(size, block), depths_that_fit(size, expert_extent, (1, 2, 4, 8))
    if not big_depths or not small_depths:
        raise StepstreamError(f"{model}: {size} bytes are too few to measure the disk's reads at several depths "
                              f"without reading a block twice; use a larger model file")
    big = measure_read_bandwidth(model, depths=big_depths, block=block)
    small = measure_read_bandwidth(model, depths=small_depths, block=expert_extent, seed=1)
    return {"big": [(p.depth, p.gb_s) for p in big], "big_bytes": block, "extent": [(p.depth, p.gb_s) for p in small],
            "extent_bytes": expert_extent, "knee_big": knee(big), "knee_extent": knee(small),
            "best_gb_s": max(p.gb_s for p in big + small)}


def _expert_sizes(model: Path) -> tuple[int, int, int]:
    """(bytes of the largest expert matrix, of one expert's cache slot, experts one token uses per layer)."""
    from offload.expert_table import build_expert_table
    from offload.provider import slot_bytes_for
    from runtime.base.config import ModelConfig
    from runtime.base.gguf_file import GGUFModelFile

    f = GGUFModelFile(model)
    cfg = ModelConfig.from_gguf(f)
    table = build_expert_table(f, cfg)
    extent = max(ext.nbytes for layer in table.layers.values() for ext in layer.extents(0))
    return extent, slot_bytes_for(table), cfg.n_expert_used


def _warm_page_cache(model: Path) -> None:
    """Read the whole file once, so the all-in-RAM run times compute, not page faults from disk."""
    with open(model, "rb", buffering=0) as f:
        while f.read(64 * 2**20):
            pass


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.child:
        kind, model, *rest = a.child
        n_prompt, n_gen, threads = int(rest[-3]), int(rest[-2]), int(rest[-1])
        res = (child_ours(model, int(rest[0]), n_prompt, n_gen, threads, *rest[1:-3]) if kind == "ours"
               else child_llama(model, n_prompt, n_gen, threads))
        print(json.dumps(res))
        return 0

    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = Path(a.model) if a.model else ensure_model(workdir)
    size = model.stat().st_size
    common = [str(a.n_prompt), str(a.n_gen), str(a.threads)]
    from offload.placement import READ_WORKERS

    extent, slot, k = _expert_sizes(model)
    try:
        disk = measure_disk(model, extent)
    except StepstreamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"disk: {disk['big_bytes'] / 2**20:g} MiB O_DIRECT reads by depth "
          + ", ".join(f"{d}: {g:.2f}" for d, g in disk["big"])
          + f" GB/s (90% of the best at depth {disk['knee_big']}); reads of one expert matrix "
          f"({disk['extent_bytes'] / 2**20:.2f} MiB) " + ", ".join(f"{d}: {g:.2f}" for d, g in disk["extent"])
          + f" GB/s (depth {disk['knee_extent']}); {READ_WORKERS} reader threads")
    disk_bps = disk["best_gb_s"] * 1e9
    # Our footprint beside the cache, from one uncapped run with a small (fully used) cache:
    # anonymous memory, plus a working set of library code pages.
    small_cache = max(16 * 2**20, 2 * k * slot)  # the smallest cache that runs, about
    probe = _child(["ours", str(model), str(small_cache), "off", *common], None, a.timeout)
    if "error" in probe:
        print(f"probe run failed: {probe['error']}", file=sys.stderr)
        return 1
    footprint = probe["rss_anon_bytes"] - probe["cache_bytes"] + FILE_WORKING_SET
    compute_s, ram = float("nan"), None
    if not a.no_ram_run:
        _warm_page_cache(model)
        ram = _child(["ours", str(model), "-1", "off", *common], None, a.timeout)
        if "error" in ram:
            print(f"all-in-RAM run failed: {ram['error']}", file=sys.stderr)
            return 1
        compute_s = 1 / ram["decode_tok_s"]
        drop_page_cache(model)
    print(f"model {model.name}: {size / 2**20:.0f} MiB; our footprint without the expert cache "
          f"{footprint / 2**20:.0f} MiB (peak RSS of the probe {probe['peak_rss_bytes'] / 2**20:.0f} MiB); "
          f"{a.threads} threads, {a.n_gen} decoded tokens, median of {a.repetitions}; all experts in RAM: "
          f"{1 / compute_s:.2f} tok/s ({compute_s * 1e3:.1f} ms/token of compute); roofline = max(compute, "
          f"bytes of the experts read for compute / {disk_bps / 1e9:.2f} GB/s)")
    print(HEADER)
    results = []
    try:
        for frac in [float(x) for x in a.caps.split(",")]:
            results.append(_run_cap(a, model, frac, footprint, common))
            _print_row(results[-1], compute_s, disk_bps)
    except CgroupUnavailable as e:
        print(f"cannot cap memory here: {e}", file=sys.stderr)
        return 1
    if a.json:
        Path(a.json).write_text(json.dumps({"model": str(model), "size": size, "footprint": footprint,
                                            "disk": disk, "ram_run": ram, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
