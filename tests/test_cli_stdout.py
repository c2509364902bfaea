"""Standard output that cannot be written (a full disk under `> out.json`; /dev/full is the
kernel's always-full device): one line naming standard output, exit status 2, no traceback
(a review found a traceback and status 1 in run, bench --json, perplexity, plan and profile).
A closed pipe keeps its own answer: status 141, quietly, as `cat`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import runtime

MODEL = Path(runtime.__file__).parent / "data" / "step35-mini-q4_k_m.gguf"
ROOT = Path(runtime.__file__).resolve().parent.parent


def _cli(*args: str, stdout) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=600, cwd=ROOT)


needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


@needs_dev_full
@pytest.mark.parametrize("args", [("plan", "-m", str(MODEL)), ("plan", "-m", str(MODEL), "--json"),
                                  ("run", "-m", str(MODEL), "-p", "def f(x):", "-n", "3")],
                         ids=["plan", "plan-json", "run"])
def test_a_full_stdout_is_one_line_and_status_2(args):
    with open("/dev/full", "w") as full:
        r = _cli(*args, stdout=full)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: could not write standard output: No space left on device"], r.stderr
    assert r.stderr.strip().splitlines()[-1] == errors[0]


def test_stdout_written_as_before(tmp_path):
    """The checked stdout passes everything through: plan --json to a file parses whole."""
    out = tmp_path / "plan.json"
    with open(out, "w") as f:
        r = _cli("plan", "-m", str(MODEL), "--json", stdout=f)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["model"]


def test_a_closed_pipe_is_still_status_141():
    p = subprocess.Popen([sys.executable, "-m", "runtime.cli", "run", "-m", str(MODEL), "-p", "def f(x):", "-n", "40"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    p.stdout.read(1)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(120) == 141, err
    assert "Traceback" not in err
