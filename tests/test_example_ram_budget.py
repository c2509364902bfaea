"""examples/run_with_ram_budget.py as a user runs it: its text is plain decoding's (the greedy
tokens of the model with every expert in RAM), and a bad --budget is one line, exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import runtime

ROOT = Path(runtime.__file__).resolve().parents[1]
MODEL = ROOT / "runtime" / "data" / "step35-mini-q4_k_m.gguf"


def _example(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NUMBA_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([sys.executable, str(ROOT / "examples" / "run_with_ram_budget.py"), str(MODEL), *args],
                          capture_output=True, text=True, env=env, timeout=600)


def test_the_text_is_plain_decodings():
    r = _example("--budget", "40%", "-n", "12", "--prompt", "def main():")
    assert r.returncode == 0, r.stderr
    m = runtime.load(MODEL, experts="ram")
    want = "def main():" + m.detokenize(list(m.generate(m.tokenize("def main():"), max_tokens=12, temperature=0)))\
        .decode("utf-8", "replace")
    assert r.stdout.startswith("placement: budget ") and "expert cache" in r.stdout.splitlines()[0]
    assert want in r.stdout
    assert "tok/s" in r.stdout and "hit rate" in r.stdout


@pytest.mark.parametrize("budget, words", [("abc%", "a share must be above 0% and at most 100%"),
                                           ("0", "--budget 0: must be a positive size"), ("lots", "cannot read 'lots' as a size")])
def test_a_bad_budget_is_one_line(budget, words):
    r = _example("--budget", budget)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert words in r.stderr.strip().splitlines()[-1]
