"""The suite's compile recorder (tests/compile_log): every process started with it on PYTHONPATH
logs each Numba compile (a callee compiled inside its caller too), and numba stays unimported until used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from runtime.base.child import child_env

RECORDER = Path(__file__).resolve().parent / "compile_log"

_CODE = """
import sys
assert "numba" not in sys.modules, "the recorder imported numba at startup"
import time, numba

@numba.njit
def inner(x):
    return x * 2

@numba.njit
def outer(x):
    return inner(x) + 1

assert outer(3) == 7
"""


def _run(code: str, log: Path, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(RECORDER), "STEPSTREAM_COMPILE_LOG": str(log), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_each_compile_is_one_line_naming_its_test(tmp_path):
    log = tmp_path / "compiles.jsonl"
    r = _run(_CODE, log, PYTEST_CURRENT_TEST="tests/test_x.py::test_y (call)")
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    by_name = {rec["function"]: rec for rec in records}
    assert set(by_name) == {"__main__.inner", "__main__.outer"}, sorted(by_name)
    assert by_name["__main__.outer"]["args"] == ["int64"]
    assert all(rec["test"] == "tests/test_x.py::test_y (call)" and rec["pid"] > 0 for rec in records)
    assert all(rec["seconds"] > 0 for rec in records)
    summary = subprocess.run([sys.executable, "-m", "tests.compile_log", str(log)], capture_output=True, text=True,
                             timeout=120, cwd=RECORDER.parent.parent)
    assert summary.returncode == 0, summary.stderr
    assert summary.stdout.startswith("2 compiles") and "tests/test_x.py" in summary.stdout


def test_a_child_process_is_recorded_and_nothing_without_the_variable(tmp_path):
    log = tmp_path / "compiles.jsonl"
    # a grandchild started as the runtime starts its children (runtime.base.child.child_env)
    spawn = ("import subprocess, sys; from runtime.base.child import child_env; "
             f"sys.exit(subprocess.run([sys.executable, '-c', {_CODE!r}], env=child_env()).returncode)")
    r = _run(spawn, log, PYTHONPATH=os.pathsep.join([str(RECORDER), str(RECORDER.parent.parent)]))
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(log.read_text().splitlines()) == 2
    env = {k: v for k, v in child_env().items() if k != "STEPSTREAM_COMPILE_LOG"}  # the recorder stays off
    env["PYTHONPATH"] = str(RECORDER)
    r = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(log.read_text().splitlines()) == 2 and os.listdir(tmp_path) == ["compiles.jsonl"]
