"""Seconds from a cold start to the first token: `python -m runtime.bench.cold_start`.

A first run after an install compiles every Numba kernel it needs before it can say
anything, and that wait is the first impression the project gives. This runs a `stepstream`
command (by default `demo -n 1`) as a black box: the installed console script's entry point,
called in a child process whose Numba cache directory is empty (NUMBA_CACHE_DIR: quant.jit's
locator then keeps every kernel there and nowhere else). It reports the seconds from the
child's start to the first generated text on its stdout, and the child's CPU seconds by then
(compiling runs on one thread, so on a machine shared with other work the CPU time is close to
what the wait would be on an idle one): each run and the medians. `--warm` runs once more on
the cache the last cold run filled, so the cost of compiling stands beside that of loading.

With `--compiles` the child also records every function Numba compiles (numba:compile
events, which fire only on a real compile, never on a cache hit), with its seconds of compile
time less those of the functions compiled inside it, and the list is printed, costliest first.
tests/test_cold_start.py uses `compile_events` to check that the shipped model's first token
compiles no kernel for a format its file does not hold.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from runtime.base.child import child_env
from runtime.base.errors import StepstreamError

DEFAULT_COMMAND = ["demo", "-n", "1"]
DEMO_PROMPT = "def read_config(path):\n    \"\"\"Read a JSON config file and return it as a dict.\"\"\"\n"

# The child: record Numba's compile events (self time, the nested compiles subtracted, and the
# int8 format set it is compiled for) into the JSON file named by argv[1] (none if empty), then
# run the installed `stepstream` command's entry point on argv[2:].
_CHILD = r"""
import atexit, json, sys, time
from numba.core import event

out, argv = sys.argv[1], sys.argv[2:]
records, stack = [], []

class Compiles(event.Listener):
    def on_start(self, ev):
        stack.append([time.perf_counter(), 0.0])

    def on_end(self, ev):
        t0, nested = stack.pop()
        total = time.perf_counter() - t0
        if stack:
            stack[-1][1] += total
        f = ev.data["dispatcher"].py_func
        args = ev.data["args"]
        records.append({"function": f"{f.__module__}.{f.__qualname__}", "args": [str(a) for a in args],
                        "seconds": total - nested, "formats": formats_of(f, args)})

def formats_of(f, args):
    # the int8 format set f is compiled for: a closure variable `formats` (a kernel built per
    # set) or a literal first argument `formats` (a format switch); None if neither
    free = dict(zip(f.__code__.co_freevars, [c.cell_contents for c in f.__closure__ or ()]))
    if isinstance(free.get("formats"), int):
        return free["formats"]
    if f.__code__.co_varnames[:1] == ("formats",) and args and hasattr(args[0], "literal_value"):
        return args[0].literal_value
    return None

if out:
    event.register("numba:compile", Compiles())
    atexit.register(lambda: open(out, "w").write(json.dumps(records)))
from importlib.metadata import entry_points
(command,) = [e for e in entry_points(group="console_scripts") if e.name == "stepstream"]
sys.exit(command.load()(argv))
"""


def _child_env(cache_dir: str, threads: int | None) -> dict:
    env = child_env({k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CACHE")})
    env["NUMBA_CACHE_DIR"] = cache_dir
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # two shared cores: a spinning pool would skew the clock
    if threads is not None:
        env["NUMBA_NUM_THREADS"] = str(threads)
    return env


def _cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) a live process has used so far; None where /proc has none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class FirstToken(NamedTuple):
    seconds: float  # wall clock from the child's start to its first generated text
    cpu: float | None  # the child's CPU seconds by then (None without /proc)
    stderr: str


def time_to_first_token(argv: list[str], prompt: str, cache_dir: str, record: str = "",
                        threads: int | None = None, timeout: float = 900.0) -> FirstToken:
    """Run `stepstream <argv>` in a child process with Numba's cache in `cache_dir`; the time
    from its start until its stdout holds more than the echoed `prompt` (the first generated
    text). The child runs to its end before this returns."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", _CHILD, record, *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=_child_env(cache_dir, threads))
    echoed, first, cpu, err = len(prompt.encode()), None, None, b""
    got = b""
    streams = [child.stdout, child.stderr]
    while streams:
        if time.perf_counter() - start > timeout:
            child.kill()
            child.wait()
            raise StepstreamError(f"stepstream {' '.join(argv)} gave no first token in {timeout:.0f} s")
        ready, _, _ = select.select(streams, [], [], 1.0)
        for s in ready:
            chunk = os.read(s.fileno(), 65536)
            if not chunk:
                streams.remove(s)
            elif s is child.stdout:
                got += chunk
                if first is None and len(got) > echoed:
                    first, cpu = time.perf_counter() - start, _cpu_seconds(child.pid)
            else:
                err += chunk
    child.wait()
    if child.returncode != 0 or first is None:
        last = err.decode(errors="replace").strip().splitlines()[-1:] or ["(nothing on stderr)"]
        raise StepstreamError(f"stepstream {' '.join(argv)} failed (exit {child.returncode}): {last[0]}")
    return FirstToken(first, cpu, err.decode(errors="replace"))


def compile_events(argv: list[str], prompt: str, threads: int | None = None,
                   warm: bool = False) -> tuple[FirstToken, list[dict]] | tuple[FirstToken, list[dict], list[dict]]:
    """One cold run of `stepstream <argv>`: its time to the first token and the functions
    Numba compiled ({"function", "args", "seconds", "formats"}: formats is the int8 format set
    of a kernel built per set, quant.int8_kernels.format_set, else None), in compile order.
    With warm, also what a second run on the cache the first one filled compiled."""
    with tempfile.TemporaryDirectory(prefix="stepstream-cold-") as tmp:
        record, cache = str(Path(tmp) / "compiles.json"), str(Path(tmp) / "cache")
        first = time_to_first_token(argv, prompt, cache, record, threads)
        events = json.loads(Path(record).read_text())
        if not warm:
            return first, events
        time_to_first_token(argv, prompt, cache, record, threads)
        return first, events, json.loads(Path(record).read_text())


def with_prompt(argv: list[str]) -> tuple[list[str], str]:
    """The command with its prompt spelled out, and the prompt: the text it echoes before its
    first token. A `demo` without -p gets DEMO_PROMPT (the demo's own default, which this
    module, below the CLI in the layers, cannot import; tests/test_cold_start.py checks the
    copy). Other commands must pass -p."""
    for flag in ("-p", "--prompt"):
        if flag in argv:
            if argv.index(flag) + 1 == len(argv):
                raise StepstreamError(f"stepstream {' '.join(argv)}: {flag} needs a prompt after it")
            return argv, argv[argv.index(flag) + 1]
    if argv and argv[0] == "demo":
        return [*argv, "-p", DEMO_PROMPT], DEMO_PROMPT
    raise StepstreamError(f"stepstream {' '.join(argv)}: give the prompt with -p (the first token is the text "
                          "after its echo)")


def _load() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def _figures(r: FirstToken) -> str:
    return f"{r.seconds:.1f} s" + (f" ({r.cpu:.1f} s of CPU)" if r.cpu is not None else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.bench.cold_start", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="cold runs, each with a fresh empty cache (default: 3)")
    p.add_argument("--warm", action="store_true", help="one more run on the cache the last cold run filled")
    p.add_argument("--compiles", action="store_true", help="list what each cold run compiled (the last run's list)")
    p.add_argument("-t", "--threads", type=int, default=None, help="NUMBA_NUM_THREADS for the child")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds a run may wait for its first token (default: 900)")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help=f"the stepstream command and its arguments (default: {' '.join(DEFAULT_COMMAND)})")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error(f"--runs must be at least 1, got {args.runs}")
    try:
        command, prompt = with_prompt(args.command or DEFAULT_COMMAND)
    except StepstreamError as e:
        p.error(str(e))
    shown = " ".join(repr(a) if not a or any(c.isspace() for c in a) else a for a in command)
    print(f"stepstream {shown}: seconds to the first token, empty Numba cache; {_load()}")
    try:
        runs, events = _cold_runs(args, command, prompt)
    except StepstreamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _report(runs, events)
    return 0


def _cold_runs(args, command: list[str], prompt: str) -> tuple[list[FirstToken], list[dict]]:
    runs, events = [], []
    with tempfile.TemporaryDirectory(prefix="stepstream-cold-") as tmp:
        for i in range(args.runs):
            cache = str(Path(tmp) / f"cache{i}")
            record = str(Path(tmp) / f"compiles{i}.json") if args.compiles else ""
            runs.append(time_to_first_token(command, prompt, cache, record, args.threads, args.timeout))
            if record:
                events = json.loads(Path(record).read_text())
            print(f"  cold run {i + 1}: {_figures(runs[-1])}" + (f", {len(events)} compiles" if record else ""),
                  flush=True)
        if args.warm:
            print(f"  warm run (cache of cold run {args.runs}): "
                  f"{_figures(time_to_first_token(command, prompt, cache, '', args.threads, args.timeout))}")
    return runs, events


def _report(runs: list[FirstToken], events: list[dict]) -> None:
    cpu = [r.cpu for r in runs if r.cpu is not None]
    print(f"median of {len(runs)} cold runs: {statistics.median(r.seconds for r in runs):.1f} s"
          + (f" ({statistics.median(cpu):.1f} s of CPU)" if cpu else "") + f"; {_load()}")
    if events:
        total = sum(e["seconds"] for e in events)
        print(f"\n{len(events)} functions compiled, {total:.1f} s of compile time (self time, costliest first):")
        for e in sorted(events, key=lambda e: -e["seconds"]):
            print(f"  {e['seconds']:6.2f} s  {e['function']}({', '.join(e['args'])})")


if __name__ == "__main__":
    sys.exit(main())
