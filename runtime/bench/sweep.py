"""`stepstream bench --sweep-ram 25%,35%,55%,75%,100% [--llama-cpp]`: decode speed against a hard
RAM cap, stepstream's expert streaming beside llama.cpp's memory map.

Every run is a child process inside a cgroup-v1 memory group (runtime.base.cgroup) whose
limit is the cap, page cache included, and the model file is evicted from the page cache
before each run, so that every run starts from the disk. Runs alternate between the engines
(ours, llama.cpp, ours, ... -r times per cap), so that a neighbour's load on a shared machine
falls on both alike. A cap is a share of the model file's size (35%) or a size (6GiB).

- stepstream streams routed experts into a cache of the budget the cap implies: the cap less
  our footprint beside the cache (measured once, uncapped, as runtime.bench.streaming does)
  and a margin. A cap below the smallest cache offload.placement accepts is recorded as
  "does not fit", with the smallest cap that would.
- llama.cpp runs memory-mapped and lazily loaded (runtime.bench.streaming.open_llama_streaming),
  its streaming mode: the kernel pages weights in and out under the cap.

A run that fails (the cap's OOM killer, a timeout, an error in the child) is recorded with its
reason and the sweep goes on. Each child reports prefill and decode tok/s (after a warm-up
that loads the kernels), its peak RSS and the bytes it read from storage (/proc/self/io,
which counts O_DIRECT reads and mmap page faults alike); the parent adds the cgroup's peak
usage. The JSON holds every run; the PNG (matplotlib, the `plot` extra) draws the median
decode tok/s of each engine against the cap.

The JSON is rewritten (under a temporary name, then renamed) after every run, its "state"
"running"; at the end "complete". Ctrl-C or SIGTERM stops the run in progress (its child killed
and its memory group removed), and the JSON then says "interrupted" and lists in "not_run" each
cap and engine whose runs did not all run; an engine that did not run at all has the status
"not run", never "ok".
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from runtime.base.cgroup import CgroupUnavailable, MemoryCap, drop_page_cache, remove_stale_groups, run_process
from runtime.base.child import child_env
from runtime.base.errors import StepstreamError
from runtime.base.memory_limit import size_text
from runtime.base.paths import written_path
from runtime.base.units import parse_bytes
from runtime.bench.streaming import FILE_WORKING_SET, MARGIN, open_llama_streaming, rss_anon_bytes

ENGINES = ("stepstream", "llama.cpp")
OUT_NAME = "bench-sweep"  # the outputs' name in a directory given as --sweep-out
PLOT_HINT = "for the plot, install matplotlib: pip install 'stepstream[plot]'"


# ---------------------------------------------------------------- caps

@dataclass(frozen=True)
class Cap:
    text: str  # as given: "35%" or "6GiB"
    share: float | None = None  # of the model file's size
    nbytes: int | None = None  # an absolute size

    def bytes_for(self, file_bytes: int) -> int:
        return int(file_bytes * self.share) if self.share is not None else int(self.nbytes)


def parse_caps(text: str) -> list[Cap]:
    """'25%,35%,6GiB' -> caps. A bare number is refused: 0.35 could be a share or 35 bytes."""
    caps = []
    for item in (s.strip() for s in str(text).split(",")):
        if not item:
            raise StepstreamError(f"--sweep-ram {text!r}: an empty item; give caps such as 25%,35%,6GiB")
        if item.endswith("%"):
            try:
                pct = float(item[:-1])
            except ValueError:
                raise StepstreamError(f"--sweep-ram: {item!r} is not a percentage such as 35%") from None
            if pct != pct or pct == float("inf"):
                raise StepstreamError(f"--sweep-ram: {item!r} is not a finite percentage such as 35%")
            if not pct > 0:
                raise StepstreamError(f"--sweep-ram: a cap must be more than 0% of the file, got {item}")
            caps.append(Cap(item, share=pct / 100))
            continue
        if re.fullmatch(r"[0-9]*\.?[0-9]+", item):
            raise StepstreamError(f"--sweep-ram: {item!r} has no unit; give a share of the file (35%) or a size (6GiB)")
        try:
            n = parse_bytes(item)
        except StepstreamError as e:
            raise StepstreamError(f"--sweep-ram: {e}") from None
        if n <= 0:
            raise StepstreamError(f"--sweep-ram: a cap must be more than 0 bytes, got {item}")
        caps.append(Cap(item, nbytes=n))
    return caps


def output_paths(prefix: str, force: bool = False) -> tuple[Path, Path]:
    """--sweep-out PREFIX -> (PREFIX.json, PREFIX.png); a directory (one that exists, or a path
    ending in /, made here if it does not) -> DIR/bench-sweep.*, and a PREFIX ending in .json or .png loses it. Either file
    existing is refused unless `force`: a sweep takes many minutes at real widths, and its results
    are not replaced silently."""
    if prefix.endswith(("/", os.sep)) or Path(prefix).is_dir():
        base = Path(prefix) / OUT_NAME
        try:  # a path ending in / names a directory, made now if it is new (before any run is spent)
            base.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StepstreamError(f"--sweep-out {prefix}: cannot make the directory: {e.strerror or e}") from None
    else:
        base = Path(re.sub(r"\.(json|png)$", "", prefix))
    paths = base.with_name(base.name + ".json"), base.with_name(base.name + ".png")
    for path in paths:
        if os.path.lexists(path) and not force:
            raise StepstreamError(f"--sweep-out {prefix}: {path} already exists (an earlier sweep's); give another "
                                  "--sweep-out, or add --force to replace it")
    return paths


def schedule(n_caps: int, engines: tuple[str, ...] | list[str], repeats: int) -> list[tuple[int, str, int]]:
    """The order of the runs: (cap index, engine, repetition); per cap, the engines take turns."""
    return [(c, e, r) for c in range(n_caps) for r in range(repeats) for e in engines]


# ---------------------------------------------------------------- the children

def _tokens(vocab: int, n_prompt: int, n_gen: int, seed: int) -> tuple[list[int], list[int]]:
    import numpy as np

    ids = np.random.default_rng(seed).integers(0, vocab, n_prompt + n_gen).tolist()  # as `bench` draws them
    return ids[:n_prompt], ids[n_prompt:]


def _read_bytes() -> int:
    """Bytes this process caused to be read from storage: O_DIRECT reads and mmap faults alike."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def _timed(eval_one, prompt: list[int], gen: list[int]) -> dict:
    """Prefill the prompt in one call, then feed the generated ids one at a time."""
    r0, t0 = _read_bytes(), time.perf_counter()
    eval_one(prompt)
    t1 = time.perf_counter()
    for t in gen:
        eval_one([t])
    t2 = time.perf_counter()
    return {"prefill_tok_s": len(prompt) / (t1 - t0), "decode_tok_s": len(gen) / (t2 - t1) if gen else None,
            "decode_seconds": t2 - t1, "bytes_read_timed": _read_bytes() - r0}


def _n_ctx(spec: dict) -> int:
    return spec["n_prompt"] + spec["n_gen"] + 8  # the prompt, the decoded tokens, a little room


def child_ours(spec: dict) -> dict:
    from runtime.base.system import peak_rss_bytes
    from runtime.loader import load

    # The budget the cap implies is a ceiling (ram_budget_fit): the loader's start check counts a
    # little more than the footprint the sweep measured. A chunk holds at most the prompt.
    m = load(spec["model"], ram_budget=spec["budget"], ram_budget_fit=True, n_threads=spec["threads"],
             n_batch=min(spec["batch"], max(1, spec["n_prompt"])),
             n_ctx=_n_ctx(spec), prefetch=spec["prefetch"], fill_cache=spec["fill_cache"],
             direct_io=spec["direct_io"], cache_policy=spec["cache_policy"], activations=spec["activations"])
    try:
        m.warm_up()
        prompt, gen = _tokens(m.cfg.vocab, spec["n_prompt"], spec["n_gen"], spec["seed"])
        st = m.provider.stats
        before, hits, requests = st.bytes_read, st.hits, st.requests
        out = _timed(m.eval, prompt, gen)
        out.update(expert_bytes_read=st.bytes_read - before, hit_rate=(st.hits - hits) / max(1, st.requests - requests),
                   cache_bytes=m.placement.cache_bytes, cache_slots=m.placement.cache_slots,
                   rss_anon_bytes=rss_anon_bytes())
    finally:
        m.close()
    out.update(peak_rss_bytes=peak_rss_bytes(), bytes_read=_read_bytes())
    return out


def child_llama(spec: dict) -> dict:
    from runtime.base.system import peak_rss_bytes

    threads = spec["threads"] or os.cpu_count()
    llm = open_llama_streaming(spec["model"], _n_ctx(spec), spec["batch"], threads)
    try:
        llm.eval([0, 1, 2, 3, 4])  # warm-up, as our Model.warm_up: a chunk, then one token
        llm.eval([0])
        llm.reset()
        prompt, gen = _tokens(llm.n_vocab(), spec["n_prompt"], spec["n_gen"], spec["seed"])
        out = _timed(llm.eval, prompt, gen)
    finally:
        llm.close()
    out.update(peak_rss_bytes=peak_rss_bytes(), bytes_read=_read_bytes())
    return out


def child_main(spec_json: str) -> int:
    """In the child: one run, its result as the last line of stdout (a StepstreamError as {"error": ...})."""
    spec = json.loads(spec_json)
    try:
        out = child_ours(spec) if spec["engine"] == "stepstream" else child_llama(spec)
    except StepstreamError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return 3
    print(json.dumps(out), flush=True)
    return 0


def cached_bytes(path: str) -> int:
    """Bytes of the file now in the page cache (mincore over a map of it), -1 when unknown. Eviction
    leaves the pages another process maps, and a run would then start warm: the report says so."""
    import ctypes
    import mmap

    import numpy as np

    size = os.path.getsize(path)
    if size == 0:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    if addr in (None, ctypes.c_void_p(-1).value):
        return -1
    try:
        vec = np.zeros((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE, np.uint8)
        ok = libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec.ctypes.data_as(ctypes.c_void_p)) == 0
    finally:
        libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    return int((vec & 1).sum()) * mmap.PAGESIZE if ok else -1


def run_child(spec: dict, cap_bytes: int | None, timeout: float) -> dict:
    """One run in a child process, under a cgroup cap of cap_bytes (None: uncapped), after the model
    file is evicted from the page cache. Never raises for the child's failure: the result then holds
    status "failed" and the reason."""
    drop_page_cache(spec["model"])
    cached = cached_bytes(spec["model"])
    cmd = [sys.executable, "-m", "runtime.bench.sweep", json.dumps(spec)]
    env = child_env()
    t0 = time.perf_counter()
    cap = MemoryCap(cap_bytes) if cap_bytes is not None else None
    with cap if cap is not None else contextlib.nullcontext():
        try:
            r = (cap.run if cap else run_process)(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            r = None
        usage = {"cgroup_max_usage": cap.max_usage, "oom_kills": cap.oom_kills} if cap else {}
    res = _result(r, usage.get("oom_kills", 0), timeout)
    return {**res, **usage, "cached_at_start": cached, "wall_seconds": time.perf_counter() - t0}


def _result(r: subprocess.CompletedProcess | None, oom_kills: int, timeout: float) -> dict:
    if r is None:
        return {"status": "failed", "reason": f"timed out after {timeout:g} s"}
    lines = r.stdout.strip().splitlines()
    try:
        out = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        out = None
    if r.returncode == 0 and isinstance(out, dict) and "error" not in out:
        return {"status": "ok", **out}
    if oom_kills:
        return {"status": "failed", "reason": "killed by the memory cap (OOM)"}
    if isinstance(out, dict) and "error" in out:
        return {"status": "failed", "reason": out["error"]}
    err = r.stderr.strip().splitlines()
    return {"status": "failed", "reason": f"exit status {r.returncode}: {err[-1] if err else 'no message'}"}


# ---------------------------------------------------------------- the sweep

@dataclass(frozen=True)
class SweepOptions:
    model: str
    caps: tuple[Cap, ...]
    engines: tuple[str, ...] = ENGINES
    repeats: int = 1
    n_prompt: int = 128
    n_gen: int = 32
    threads: int | None = None
    batch: int = 512
    seed: int = 0
    prefetch: bool = True
    fill_cache: bool = False
    direct_io: bool = True
    cache_policy: str = "lru"
    activations: str = "q8"
    timeout: float = 1800.0

    def spec(self, engine: str, budget: int | None = None) -> dict:
        return {"engine": engine, "model": self.model, "budget": budget, "threads": self.threads,
                "batch": self.batch, "n_prompt": self.n_prompt, "n_gen": self.n_gen, "seed": self.seed,
                "prefetch": self.prefetch, "fill_cache": self.fill_cache, "direct_io": self.direct_io, "cache_policy": self.cache_policy,
                "activations": self.activations}


def smallest_cache(model: str) -> tuple[int, int]:
    """(bytes, experts) of the smallest expert cache offload.placement.build_streaming accepts: one
    token's K experts in one layer, and the next layer's read-ahead (3/4 of K)."""
    from offload.expert_table import build_expert_table
    from offload.provider import slot_bytes_for
    from runtime.base.config import ModelConfig
    from runtime.base.gguf_file import GGUFModelFile

    f = GGUFModelFile(model)
    cfg = ModelConfig.from_gguf(f)
    k = cfg.n_expert_used
    slots = k + max(1, k * 3 // 4)
    return slots * slot_bytes_for(build_expert_table(f, cfg)), slots


def measure_footprint(o: SweepOptions, smallest: int) -> int:
    """Our memory beside the expert cache, from one uncapped run with a small cache: anonymous
    memory less the cache, plus the library pages the process keeps touching."""
    # The sweep's own tokens, as runtime.bench.streaming's probe. The measure varies from run to run:
    # 1281 and 1089 MiB on the same synth file (895 with 2 decoded tokens), and the budget with it.
    probe = run_child(o.spec("stepstream", 2 * smallest), None, o.timeout)
    if probe["status"] != "ok":
        raise StepstreamError(f"{o.model}: the uncapped run that measures our footprint failed: {probe['reason']}")
    return probe["rss_anon_bytes"] - probe["cache_bytes"] + FILE_WORKING_SET


def _check_cgroup(log=print) -> None:
    """A memory group can be made here; groups that killed sweeps left behind are removed first."""
    stale = remove_stale_groups()
    if stale:
        log(f"removed {len(stale)} memory cgroup(s) that killed runs left behind: {', '.join(stale)}")
    try:
        with MemoryCap(2**30):
            pass
    except CgroupUnavailable as e:
        raise StepstreamError(f"--sweep-ram needs a writable cgroup-v1 memory controller: {e}") from None


def run_sweep(o: SweepOptions, log=print, after_run=None) -> dict:
    """Every engine under every cap, alternating, -r times; the report (see summarize).
    after_run(report so far) is called after each run, and once more, with the state
    "interrupted", when Ctrl-C or SIGTERM stops the sweep (which then goes on as KeyboardInterrupt):
    a sweep takes hours at real widths, and one stopped halfway keeps what it measured."""
    _check_cgroup(log)
    file_bytes = os.path.getsize(o.model)
    smallest, slots = smallest_cache(o.model)
    footprint = measure_footprint(o, smallest) if "stepstream" in o.engines else 0
    minimum = footprint + MARGIN + smallest
    caps = [{"cap": c.text, "cap_bytes": c.bytes_for(file_bytes), "share_of_file": c.bytes_for(file_bytes) / file_bytes,
             "budget": c.bytes_for(file_bytes) - footprint - MARGIN, "runs": {e: [] for e in o.engines}} for c in o.caps]
    log(f"{Path(o.model).name}: {size_text(file_bytes)}; our footprint beside the expert cache "
        f"{size_text(footprint)}; smallest cache {slots} experts ({size_text(smallest)}); so a cap needs "
        f"{size_text(minimum)} for stepstream")
    if o.engines == ("stepstream",) and all(row["budget"] < smallest for row in caps):
        raise StepstreamError(f"--sweep-ram {','.join(c.text for c in o.caps)}: no cap can run stepstream, which needs "
                              f"a cap of {size_text(minimum)} ({minimum:,} bytes) on {Path(o.model).name}; nothing ran")
    try:
        _run_all(o, caps, footprint, minimum, smallest, slots, log, after_run, file_bytes)
    except KeyboardInterrupt:
        if after_run is not None:
            after_run(summarize(o, file_bytes, footprint, minimum, caps, state="interrupted"))
        raise
    return summarize(o, file_bytes, footprint, minimum, caps)


def _run_all(o: SweepOptions, caps: list[dict], footprint: int, minimum: int, smallest: int, slots: int, log,
             after_run, file_bytes: int) -> None:
    plan = schedule(len(caps), o.engines, o.repeats)
    for i, (ci, engine, rep) in enumerate(plan, 1):
        row = caps[ci]
        head = f"[{i}/{len(plan)}] cap {row['cap']} ({size_text(row['cap_bytes'])}) {engine} run {rep + 1}/{o.repeats}:"
        if engine == "stepstream" and row["budget"] < smallest:
            res = {"status": "does not fit", "minimum_bytes": minimum,
                   "reason": f"needs a cap of {size_text(minimum)}: {size_text(footprint)} of footprint, "
                             f"{size_text(MARGIN)} of margin and the smallest expert cache ({slots} experts, "
                             f"{size_text(smallest)})"}
        else:
            budget = row["budget"] if engine == "stepstream" else None
            res = run_child(o.spec(engine, budget), row["cap_bytes"], o.timeout)
        row["runs"][engine].append(res)
        log(f"{head} {run_text(res)}")
        if after_run is not None:
            after_run(summarize(o, file_bytes, footprint, minimum, caps, state="running"))


def run_text(res: dict) -> str:
    cached = res.get("cached_at_start", 0)
    warm = f" ({size_text(cached)} of the file stayed in page cache: another process maps it)" if cached > 2**20 else ""
    if res["status"] != "ok":
        return f"{res['status']}: {res['reason']}{warm}"
    dec = f"decode {res['decode_tok_s']:.2f} tok/s, " if res.get("decode_tok_s") is not None else ""
    peak = f", cgroup peak {size_text(res['cgroup_max_usage'])}" if "cgroup_max_usage" in res else ""
    return (f"{dec}prefill {res['prefill_tok_s']:.2f} tok/s, read {res['bytes_read'] / 1e9:.2f} GB, "
            f"peak RSS {size_text(res['peak_rss_bytes'])}{peak}{warm}")


def _median(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r["status"] == "ok" and r.get(key) is not None]
    return statistics.median(vals) if vals else None


def engine_summary(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["status"] == "ok"]
    statuses = sorted({r["status"] for r in runs})
    status = ("not run" if not runs else "ok" if len(ok) == len(runs) else statuses[0] if len(statuses) == 1
              else "partial")
    return {"status": status, "runs_ok": len(ok), "decode_tok_s_median": _median(runs, "decode_tok_s"),
            "decode_tok_s_runs": [r.get("decode_tok_s") for r in ok],
            "prefill_tok_s_median": _median(runs, "prefill_tok_s"),
            "peak_rss_bytes_max": max((r["peak_rss_bytes"] for r in ok), default=None),
            "cgroup_max_usage_max": max((r["cgroup_max_usage"] for r in ok if "cgroup_max_usage" in r), default=None),
            "bytes_read_median": _median(runs, "bytes_read"),
            "bytes_read_timed_median": _median(runs, "bytes_read_timed"),
            "wall_seconds_median": _median(runs, "wall_seconds"),  # the whole child: loading counts here
            "reasons": sorted({r["reason"] for r in runs if r["status"] != "ok"}),
            "minimum_bytes": next((r["minimum_bytes"] for r in runs if "minimum_bytes" in r), None)}


def pair_ratio(runs: dict[str, list[dict]]) -> float | None:
    """The median over repetitions of stepstream's decode tok/s over llama.cpp's in the same
    repetition: the two ran one after the other, so a neighbour's load falls on both."""
    if not set(ENGINES) <= set(runs):
        return None
    ratios = [a["decode_tok_s"] / b["decode_tok_s"] for a, b in zip(*(runs[e] for e in ENGINES))
              if a["status"] == b["status"] == "ok" and a.get("decode_tok_s") and b.get("decode_tok_s")]
    return statistics.median(ratios) if ratios else None


def summarize(o: SweepOptions, file_bytes: int, footprint: int, minimum: int, caps: list[dict],
              state: str = "complete") -> dict:
    """The report: the settings, the state ("running", "complete" or "interrupted") and the runs
    not (yet) run, then per cap its size and, per engine, the medians and every run."""
    rows = [{**{k: v for k, v in row.items() if k != "runs"},
             "engines": {e: {**engine_summary(runs), "runs": runs} for e, runs in row["runs"].items()},
             "decode_ratio_median": pair_ratio(row["runs"])}
            for row in caps]
    not_run = [{"cap": row["cap"], "engine": e, "runs": o.repeats - len(runs)}
               for row in caps for e, runs in row["runs"].items() if len(runs) < o.repeats]
    return {"state": state, "not_run": not_run, "model": str(o.model), "file_bytes": file_bytes, "engines": list(o.engines), "repetitions": o.repeats,
            "n_prompt": o.n_prompt, "n_gen": o.n_gen, "threads": o.threads or os.cpu_count(), "batch": o.batch,
            "seed": o.seed, "prefetch": o.prefetch, "fill_cache": o.fill_cache, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "default",
            "footprint_bytes": footprint, "margin_bytes": MARGIN, "stepstream_minimum_cap_bytes": minimum,
            "caps": rows}


# ---------------------------------------------------------------- outputs

def table_text(report: dict) -> str:
    """One line per cap and engine: medians over the runs that finished."""
    def num(v, width: int, fmt: str = ".2f") -> str:
        return (format(v, fmt) if v is not None else "-").rjust(width)

    lines = [f"{'cap':>8} {'bytes':>9} {'engine':>11} {'decode tok/s':>13} {'prefill tok/s':>14} "
             f"{'cgroup peak':>12} {'read GB':>8} {'wall s':>7}  runs"]
    for row in report["caps"]:
        for engine, s in row["engines"].items():
            peak = size_text(s["cgroup_max_usage_max"]) if s["cgroup_max_usage_max"] is not None else "-"
            read = s["bytes_read_median"] / 1e9 if s["bytes_read_median"] is not None else None
            if s["status"] in ("not run", "does not fit"):  # nothing ran: no "0/1 ok"
                note = s["status"] + (f": {'; '.join(s['reasons'])}" if s["reasons"] else "")
            else:
                note = f"{s['runs_ok']}/{len(s['runs'])} ok" + (f"; {'; '.join(s['reasons'])}" if s["reasons"] else "")
            if engine == "stepstream" and row.get("decode_ratio_median") is not None:
                note += f"; {row['decode_ratio_median']:.2f}x llama.cpp (median of paired runs)"
            lines.append(f"{row['cap']:>8} {size_text(row['cap_bytes']):>9} {engine:>11} "
                         f"{num(s['decode_tok_s_median'], 13)} {num(s['prefill_tok_s_median'], 14)} "
                         f"{peak:>12} {num(read, 8)} {num(s['wall_seconds_median'], 7, '.0f')}  {note}")
    if report.get("state") == "interrupted":
        lines.append("interrupted; not run: " + (", ".join(f"cap {n['cap']} {n['engine']} ({n['runs']} of "
                                                          f"{report['repetitions']})" for n in report["not_run"])
                                                 or "none"))
    return "\n".join(lines)


def write_json(report: dict, path: Path) -> None:
    """Under a temporary name, then renamed: an interruption mid-write leaves the previous report
    whole. Through a symlink, its target is written."""
    path = written_path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # a full disk, a quota: named, for the caller to say what it kept
            raise StepstreamError(f"{path}: cannot write the sweep results: {e.strerror or e}") from None
        raise


def write_plot(report: dict, path: Path) -> str | None:
    """The PNG of median decode tok/s against the cap, one line per engine, every run a dot;
    None when written, else the one line that says how to get it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return PLOT_HINT
    fig = Figure(figsize=(7, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rows = sorted(report["caps"], key=lambda r: r["cap_bytes"])
    gib = [r["cap_bytes"] / 2**30 for r in rows]
    for k, (engine, color) in enumerate(zip(report["engines"], ("tab:blue", "tab:orange", "tab:green"))):
        pts = [(x, r["engines"][engine]["decode_tok_s_median"]) for x, r in zip(gib, rows)
               if r["engines"][engine]["decode_tok_s_median"] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", color=color, label=f"{engine} (median)")
        dots = [(x, v) for x, r in zip(gib, rows) for v in r["engines"][engine]["decode_tok_s_runs"] if v]
        if dots:
            ax.scatter(*zip(*dots), s=10, color=color, alpha=0.35, linewidths=0)
        for x, r in zip(gib, rows):
            s = r["engines"][engine]
            if s["decode_tok_s_median"] is None:
                ax.scatter([x], [0], marker="x", color=color)
                ax.annotate(s["status"] if s["status"] in ("does not fit", "not run") else "failed", (x, 0),
                            textcoords="offset points", xytext=(4, 4 + 10 * k), fontsize=7, color=color)
    ax.set_xticks(gib, [f"{x:.1f}\n{r['cap']}" for x, r in zip(gib, rows)], fontsize=8)
    ax.set_xlabel("RAM cap: GiB, and as given (a share of the model file or a size)")
    ax.set_ylabel("decode tok/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{Path(report['model']).name} ({report['file_bytes'] / 2**30:.1f} GiB), {report['threads']} threads, "
                 f"{report['n_gen']} tokens, cgroup memory cap, page cache evicted", fontsize=8)
    fig.tight_layout()
    path = written_path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # a plot being replaced stays whole until renamed
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise StepstreamError(f"{path}: cannot write the sweep plot: {e.strerror or e} (the JSON is written)") from None
        raise
    return None


if __name__ == "__main__":  # the child of run_child
    sys.exit(child_main(sys.argv[1]))
