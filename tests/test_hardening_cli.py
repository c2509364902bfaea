"""What a new user types: odd arguments, odd files, and the small things `stepstream` reports.

Every case runs the real command line in a child process on the embedded model, as a user
would: a value the runtime cannot use ends in exit status 2 and one line on stderr that names
it, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import runtime
from runtime.cli import SUBCOMMANDS
from runtime.cli.demo import model_path

ROOT = Path(runtime.__file__).resolve().parents[1]  # the checkout under test, whichever is installed
MODEL = str(model_path())


def cli(*argv: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "runtime.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The error line, after checking it is the only thing the error added to stderr."""
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    # A model that loaded first says so in one line of its own ("loading the kernels... done").
    lines = [l for l in lines if not l.startswith(("loading the kernels", "placement:"))]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    (d / "adir").mkdir()
    (d / "binary.dat").write_bytes(b"\x00\xff\xfe\x80 not text")
    (d / "prompts.txt").write_text("def f(x):\n")
    (d / "not_a_dir").write_text("a file where a directory should go\n")
    (d / "long.txt").write_text((Path(runtime.__file__).parent / "cli" / "common.py").read_text() * 6)  # > 1,024 tokens
    return d


# (argv, what the line must say). {model} is the embedded GGUF.
REFUSED = {
    # 6b: a prompt file that is not there
    "run -f missing": (["run", "-m", "{model}", "-f", "missing.txt"], ["missing.txt", "not found"]),
    # 14: -m given a directory, on every command that takes -m
    "run -m dir": (["run", "-m", "adir", "-p", "x"], ["-m/--model", "adir", "directory"]),
    "bench -m dir": (["bench", "-m", "adir"], ["-m/--model", "adir", "directory"]),
    "chat -m dir": (["chat", "-m", "adir"], ["-m/--model", "adir", "directory"]),
    "profile -m dir": (["profile", "-m", "adir", "-f", "prompts.txt"], ["-m/--model", "adir", "directory"]),
    "perplexity -m dir": (["perplexity", "-m", "adir", "-f", "prompts.txt"], ["-m/--model", "adir", "directory"]),
    # 14: a binary text file, no chunks, an output in a directory that does not exist
    "perplexity -f binary": (["perplexity", "-m", "{model}", "-f", "binary.dat"], ["binary.dat", "not UTF-8", "0xff"]),
    "perplexity --chunks 0": (["perplexity", "-m", "{model}", "-f", "long.txt", "--chunks", "0"],
                              ["--chunks", "got 0"]),
    "profile -o nowhere": (["profile", "-m", "{model}", "-f", "prompts.txt", "-o", "/nonexistent-dir-12/x.json"],
                           ["/nonexistent-dir-12/x.json", "does not exist"]),
    # 15a-d: values that were taken in silence
    "run -n -5": (["run", "-m", "{model}", "-p", "x", "-n", "-5"], ["-n/--n-predict", "got -5", "-1"]),
    "bench -r 0": (["bench", "-m", "{model}", "-r", "0"], ["-r/--repetitions", "got 0"]),
    "run --temp -1": (["run", "-m", "{model}", "-p", "x", "--temp", "-1"], ["--temp", "got -1"]),
    "run --top-p 2": (["run", "-m", "{model}", "-p", "x", "--top-p", "2"], ["--top-p", "got 2"]),
    "demo -n -5": (["demo", "-n", "-5"], ["-n/--n-predict", "got -5", "-1"]),
    "chat -n 0": (["chat", "-m", "{model}", "-n", "0"], ["-n/--n-predict", "got 0"]),
    # the other tracebacks a new user met with odd arguments
    "run -f dir": (["run", "-m", "{model}", "-f", "adir"], ["adir", "directory"]),
    "run -f binary": (["run", "-m", "{model}", "-f", "binary.dat"], ["binary.dat", "not UTF-8"]),
    "run --profile dir": (["run", "-m", "{model}", "-p", "x", "--profile", "adir"], ["--profile", "adir", "directory"]),
    "run -s -2": (["run", "-m", "{model}", "-p", "x", "-s", "-2"], ["-s/--seed", "got -2"]),
    "run --temp nan": (["run", "-m", "{model}", "-p", "x", "--temp", "nan"], ["--temp", "nan"]),
    "bench --seed -1": (["bench", "-m", "{model}", "--seed", "-1"], ["--seed", "got -1"]),
    "bench -p -1": (["bench", "-m", "{model}", "-p", "-1"], ["-p/--n-prompt", "got -1"]),  # -p 0: decoding alone
    "demo --temp nan": (["demo", "--temp", "nan"], ["--temp", "nan"]),
    "profile -f binary": (["profile", "-m", "{model}", "-f", "binary.dat"], ["binary.dat", "not UTF-8"]),
    "profile -f dir": (["profile", "-m", "{model}", "-f", "adir"], ["adir", "directory"]),
    "profile -n -1": (["profile", "-m", "{model}", "-f", "prompts.txt", "-n", "-1"], ["-n/--n-predict", "got -1"]),
    "profile -o dir": (["profile", "-m", "{model}", "-f", "prompts.txt", "-o", "adir"], ["adir", "directory"]),
    "profile -c 4": (["profile", "-m", "{model}", "-f", "prompts.txt", "-c", "4", "-o", "p.json"],
                     ["-n 16", "context of 4"]),
    # demo loaded the model and printed its placement before naming a Latin-1 prompt, without the flag
    "demo -p Latin-1": (["demo", "-p", "caf\udce9"], ["-p/--prompt", "not UTF-8", "0xe9"]),
    # llama.cpp's flags were read as one of ours and a value: -ngl 99 as `-n gl`, -mmp 0 as `-m mp`
    "bench -ngl 99": (["bench", "-m", "{model}", "-ngl", "99"], ["unrecognized option -ngl", "--gpu-budget"]),
    "run -mmp 0": (["run", "-m", "{model}", "-p", "x", "-mmp", "0"], ["unrecognized option -mmp"]),
    "bench -ts 1": (["bench", "-m", "{model}", "-ts", "1"], ["unrecognized option -ts"]),
    # --no-stream with --profile streamed anyway, in silence (--no-stream --ram-budget was refused)
    "run --no-stream --profile": (["run", "-m", "{model}", "-p", "x", "--no-stream", "--profile", "prompts.txt"],
                                  ["--profile", "--no-stream"]),
    # the API's field was named to a user who typed the flag
    "run --cache-policy pinned": (["run", "-m", "{model}", "-p", "x", "--cache-policy", "pinned"],
                                  ["--cache-policy pinned", "--profile FILE"]),
    "mini onto a file": (["mini", "not_a_dir"], ["not_a_dir", "not a directory"]),
    "mini --seed -1": (["mini", "m", "--seed", "-1"], ["--seed", "got -1"]),
    "train-mini --steps 0": (["train-mini", "t", "--steps", "0"], ["--steps", "got 0"]),
}


@pytest.fixture(scope="module")
def refused(files) -> dict[str, subprocess.CompletedProcess]:
    """Every case at once: each child mostly waits on its imports, so they overlap well."""
    def attempt(argv):
        try:
            return cli(*[a.format(model=MODEL) for a in argv], cwd=files, timeout=150)
        except subprocess.TimeoutExpired as e:  # e.g. `run -n -5` generating 4,094 tokens: that case fails alone
            return subprocess.CompletedProcess(e.cmd, 124, "", f"timed out after {e.timeout} s")

    with ThreadPoolExecutor(max_workers=8) as pool:
        runs = {case: pool.submit(attempt, argv) for case, (argv, _) in REFUSED.items()}
        return {case: run.result() for case, run in runs.items()}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_in_one_line(case, files, refused):
    _, words = REFUSED[case]
    line = one_line_error(refused[case])
    for w in words:
        assert w in line, (w, line)
    assert not (files / "m").exists() and not (files / "m.part").exists() and not (files / "p.json").exists()


def test_minus_reads_the_prompt_from_standard_input(files):
    """`-f -` said "-: prompt file not found": the prompt of a pipeline is its standard input."""
    # (one thread, waiting passively: three processes spinning two threads each beside the suite's
    # workers took 102 s of a 2-core CI run, 4.5 s alone)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    args = [sys.executable, "-m", "runtime.cli", "run", "-m", MODEL, "-n", "6", "--temp", "0", "--no-stream", "-t", "1"]
    piped = subprocess.run(args + ["-f", "-"], cwd=files, env=env, capture_output=True, input=b"def f(x):", timeout=300)
    given = subprocess.run(args + ["-p", "def f(x):"], cwd=files, env=env, capture_output=True, timeout=300)
    assert piped.returncode == given.returncode == 0, (piped.stderr[-2000:], given.stderr[-2000:])
    assert piped.stdout == given.stdout and piped.stdout.startswith(b"def f(x):")
    bad = subprocess.run(args + ["-f", "-"], cwd=files, env=env, capture_output=True, input=b"\xff", timeout=300, text=False)
    assert bad.returncode == 2 and b"standard input: the prompt file is not UTF-8 text (byte 0xff" in bad.stderr


def test_a_text_too_short_for_perplexity_is_one_line_without_a_progress_bar(files):
    line = one_line_error(cli("perplexity", "-m", MODEL, "-f", "prompts.txt", cwd=files))
    assert line.startswith("error: the text has ") and "needs at least 1024" in line


def test_no_rate_from_a_generation_that_stops_after_its_first_piece(files):
    """6c: when the first text arrives with the last token (here a stop string that the first two
    tokens complete, the first one's text held back as its possible start), there is no time
    to measure a rate over: the old line said "then 247419.77 tok/s"."""
    model = runtime.load(MODEL, n_ctx=256)
    prompt = "import os\n"
    stop = model.create_completion(prompt, max_tokens=2, temperature=0)["choices"][0]["text"]
    first = model.create_completion(prompt, max_tokens=1, temperature=0)["choices"][0]["text"]
    assert first and len(stop) > len(first), (first, stop)  # the stop string really spans two tokens
    r = cli("run", "-m", MODEL, "-p", prompt, "-n", "8", "--temp", "0", "-r", stop, "--stats", cwd=files)
    assert r.returncode == 0, r.stderr
    result = next(l for l in r.stderr.splitlines() if l.startswith("["))
    assert result.startswith("[stop]") and "2 generated" in result, result
    assert "tok/s" not in result, result
    assert "too few tokens for a decode rate" in r.stderr


def test_stats_without_streaming_print_peak_rss_and_speeds(files):
    """18a: --stats on a model held in RAM printed nothing."""
    r = cli("run", "-m", MODEL, "-p", "def f(x):", "-n", "6", "--temp", "0", "--no-stream", "--stats", cwd=files)
    assert r.returncode == 0, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"peak RSS \d+ MiB; prompt of \d+ tokens and first token: [\d.]+ s; "
                        r"then [\d.]+ tok/s over \d+ tokens?", line), line


def test_demo_waits_passively_when_a_core_is_busy(files):
    """17: `demo` now picks the OpenMP wait policy as `run` does; one busy core (beside the
    default thread count, one per core) makes it passive."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        r = subprocess.run([sys.executable, "-m", "runtime.cli", "demo", "-n", "4"], cwd=files, capture_output=True,
                           text=True, timeout=300, env={**env, "PYTHONPATH": str(ROOT)})
    finally:
        busy.kill()
        busy.wait()
    assert r.returncode == 0, r.stderr
    assert "OpenMP waits PASSIVE" in r.stderr, r.stderr[-2000:]


def test_demo_minus_one_generates_until_the_context_is_full(files):
    """15d: `demo -n -1` generated nothing, while `run -n -1` means no limit. Now both run to end
    of text or the end of the context; a prompt that nearly fills the demo's 1,024 positions
    keeps it short."""
    model = runtime.load(MODEL, n_ctx=1024)
    text = (Path(runtime.__file__).parent / "cli" / "demo.py").read_text() * 3
    prompt = model.tokenizer.decode(model.tokenize(text, add_bos=False)[:1000])
    n_prompt = len(model.tokenize(prompt, special=True))
    assert 990 <= n_prompt <= 1010, n_prompt
    r = cli("demo", "-n", "-1", "-p", prompt, "--no-escape", cwd=files)  # source code, taken as written
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) > len(prompt), "nothing was generated"
    n = int(re.search(r"then [\d.]+ tok/s over (\d+) tokens?", r.stderr).group(1))
    assert 1 <= n <= 1024 - n_prompt


def _parsers():
    for name, (module, _) in SUBCOMMANDS.items():
        if name == "train-mini":
            pytest.importorskip("torch")
        p = argparse.ArgumentParser(prog=f"stepstream {name}")
        importlib.import_module(module).add_arguments(p)
        yield name, p


def test_every_quoted_default_is_the_real_one():
    """18b: `bench --help` said the batch was 64 while the bench ran (and its JSON said) 512."""
    checked = 0
    for name, p in _parsers():
        for a in p._actions:
            m = re.search(r"\(default:? ([^)]*)\)", a.help or "")
            if not m:
                continue
            default = p.get_default(a.dest)
            if default is None or isinstance(default, bool) or (isinstance(default, str) and " " in default):
                continue  # no default, a switch, or a prompt described in words
            quoted = m.group(1).split()[0].rstrip(",;:")
            same = (float(quoted) == float(default)) if isinstance(default, (int, float)) and \
                re.fullmatch(r"-?[\d.e+-]+", quoted) else quoted == str(default)
            assert same, f"stepstream {name} {a.option_strings or a.dest}: help says {quoted!r}, the default is {default!r}"
            checked += 1
    assert checked > 30


def test_bench_help_quotes_the_batch_it_runs(files):
    r = cli("bench", "--help", cwd=files)
    assert r.returncode == 0
    assert re.search(r"--batch-size BATCH_SIZE\s+prompt tokens evaluated together \(default: 512\)", r.stdout), r.stdout


def test_mini_help_quotes_the_size_it_writes(tiny_ckpt, files):
    """18c: the help said ~40 MB for the tiny preset, which writes 29.9 MB."""
    r = cli("mini", "--help", cwd=files)
    assert r.returncode == 0
    help_text = " ".join(r.stdout.split())
    quoted = float(re.search(r"tiny: [^;]*?([\d.]+) MB bf16", help_text).group(1))
    written = sum(f.stat().st_size for f in Path(tiny_ckpt).glob("*.safetensors")) / 1e6
    assert abs(quoted - written) / written < 0.005, (quoted, written)
    for name in ("stress", "large"):
        assert re.search(rf"{name}: [^;]*[\d.]+ MB bf16", help_text), name


def test_version_comes_from_the_installed_package(files):
    """18e: there was no `stepstream --version`."""
    r = cli("--version", cwd=files)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"stepstream {importlib.metadata.version('stepstream')}"


def test_a_reader_that_goes_away_ends_the_run_quietly(files):
    """`stepstream run ... | head -c 20` printed a BrokenPipeError traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "runtime.cli", "run", "-m", MODEL, "-p", "def f(x):", "-n", "200",
                          "--temp", "0", "-r", "never appears"], cwd=files, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert p.stdout.read(9) == b"def f(x):"  # the echoed prompt: the model has loaded
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err, err


@pytest.mark.parametrize("argv, blocked, words", [
    (["bench-serve", "--help"], "httpx", None),
    (["bench-serve", "-m", MODEL], "httpx", ["bench-serve needs the [serve] extra (httpx is missing)",
                                            "pip install 'stepstream[serve]'"]),
    (["train-mini", "--help"], "torch", None),
    (["train-mini", "ckpt"], "torch", ["training needs PyTorch", "pip install -e '.[train]'"]),
])
def test_a_command_whose_extra_is_missing_says_which(argv, blocked, words, tmp_path):
    """`bench-serve` (httpx) and `train-mini` (torch), even their --help, ended in a traceback on
    an install without the extra: --help works, a run is one line naming the extra."""
    code = (f"import sys; sys.modules[{blocked!r}] = None; from runtime.cli import main; "
            f"sys.exit(main({argv!r}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL)
    if words is None:
        assert r.returncode == 0 and "usage:" in r.stdout and "Traceback" not in r.stderr, r.stderr[-2000:]
    else:
        line = one_line_error(r)
        for w in words:
            assert w in line, (w, line)
