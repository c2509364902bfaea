"""Fixes from a user review of the real-scale workflow, through the command line: an empty prompt
found only after loading, an error or Ctrl-C written into the generated text with the --stats
lost, a too-small --ram-budget that named neither file nor flag, a routing trace given as
--profile, and profile --random-tokens checked after loading (and counting -n)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import runtime
from tests.helpers.gguf_edit import rewrite

ROOT = Path(runtime.__file__).resolve().parent.parent
MODEL = ROOT / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
CLI = [sys.executable, "-m", "runtime.cli"]


def _cli(*args, timeout=300):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_an_empty_prompt_is_refused_before_loading(tmp_path):
    no_bos = tmp_path / "no-bos.gguf"
    rewrite(MODEL, no_bos, change={"tokenizer.ggml.add_bos_token": False})
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for source, named in ((["-p", ""], "-p/--prompt"), (["-f", empty], str(empty))):
        r = _cli("run", "-m", no_bos, *source, "-n", "2")
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr == f"error: {named}: the prompt is empty (this model adds no BOS token to start from)\n"
    r = _cli("run", "-m", MODEL, "-p", "", "-n", "2", "-t", "1", "--temp", "0")  # BOS alone: a prompt
    assert r.returncode == 0, r.stderr


def test_ctrl_c_ends_the_text_s_line_and_keeps_the_stats():
    p = subprocess.Popen([*CLI, "run", "-m", str(MODEL), "-p", "def f():", "-n", "100000", "-c", "8192", "--stats",
                          "-t", "1", "--ram-budget", "2MiB"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = p.stderr.readline()
    while b"loading the kernels" not in line:
        line = p.stderr.readline()
    time.sleep(2)  # generating
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130
    assert out.endswith(b"\n") and len(out) > 20
    err = err.decode()
    assert "experts: " in err and "peak RSS" in err  # --stats of what ran
    assert err.rstrip().endswith("interrupted")


def test_a_budget_below_one_token_s_experts_names_the_file_and_the_flag():
    r = _cli("run", "-m", MODEL, "-p", "hi", "-n", "1", "--ram-budget", "100KiB")
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: {MODEL.name}: a RAM budget (--ram-budget) of 0.1 MiB holds 0 experts of ")
    assert "at least 4 are needed (one token's experts in one layer): " in r.stderr


def test_a_routing_trace_given_as_profile_is_named(tmp_path):
    trace = tmp_path / "t.npz"
    np.savez(trace, ids=np.zeros((1, 1, 1), np.int16))
    r = _cli("run", "-m", MODEL, "-p", "hi", "-n", "1", "--profile", trace)
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: {trace}: a routing trace (.npz), not an expert profile: --profile takes the JSON")


def test_random_tokens_beyond_the_context_are_refused_before_loading(tmp_path):
    r = _cli("profile", "-m", MODEL, "--random-tokens", "100000", "-o", tmp_path / "p.json")
    assert r.returncode == 2 and "loading" not in r.stderr and "profile:" not in r.stderr
    assert r.stderr.startswith("error: --random-tokens 100000 need 100000 positions, more than the context length")
    # -n does not count: random tokens are teacher-forced, nothing is generated after them
    r = _cli("profile", "-m", MODEL, "--random-tokens", "64", "-c", "64", "-n", "16", "-t", "1",
             "-o", tmp_path / "p.json")
    assert r.returncode == 0, r.stderr
    assert "64 tokens" in r.stdout


SHRINK = """
import os, shutil, sys
import runtime
from runtime.base.errors import StepstreamError
path, how = sys.argv[1], sys.argv[2]
m = runtime.load(path, experts="ram", n_threads=1, mtp=0)
assert len(list(m.generate(m.tokenize("def f():"), max_tokens=4, temperature=0))) == 4
# another process changes it, as a user's truncate or cp would (this process holds a read lease on
# the file, and its own truncate(2) would be interrupted by the lease's signal: EINTR)
import subprocess
if how == "shrink":
    subprocess.run([sys.executable, "-c", "import os, sys; os.truncate(sys.argv[1], 1_000_000)", path], check=True)
else:  # rewritten in place: same size, other bytes
    subprocess.run([sys.executable, "-c", "import os, sys\\nwith open(sys.argv[1], 'r+b') as f:\\n"
                    "    f.seek(os.path.getsize(sys.argv[1]) // 2)\\n    f.write(bytes([127]) * 4096)", path], check=True)
try:
    m.generate(m.tokenize("class Stack:"), max_tokens=4, temperature=0).__next__()
except StepstreamError as e:
    print(e)
    sys.exit(2)
"""


def test_a_model_file_changed_under_the_map_is_an_error_not_a_bus_error(tmp_path):
    """A GGUF cut short while `run` was going killed it with SIGBUS (exit 135, no message)."""
    for how, said in (("shrink", "it is 1000000 bytes, it was "), ("rewrite", "it was written to")):
        path = tmp_path / f"{how}.gguf"
        path.write_bytes(MODEL.read_bytes())
        r = subprocess.run([sys.executable, "-c", SHRINK, str(path), how], capture_output=True, text=True,
                           timeout=300, cwd=ROOT)
        assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
        assert r.stdout.startswith(f"{path}: the file changed on disk while the model was loaded ({said}")
        assert r.stdout.rstrip().endswith("its mapped weights cannot be read any more: load it again")
