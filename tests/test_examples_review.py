"""The example scripts as a first-time user runs them (review 7, items 2-5 and 14): a bad argument,
a missing server or a machine without a GPU is one line on stderr and exit status 2, never a
traceback; run_with_ram_budget.py picks OpenMP's wait policy as `stepstream run` does and times
the decode apart from the prompt; convert_checkpoint.py has --force and leaves no temporary folder."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MODEL = ROOT / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "NUMBA_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def _run(argv: list[str], env: dict | None = None, timeout: float = 120, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env or ENV, timeout=timeout)


def _example(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return _run([sys.executable, str(EXAMPLES / name), *args], env=env)


def _one_line(r: subprocess.CompletedProcess, *words: str) -> None:
    """Exit status 2 and one line on stderr holding `words`."""
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- gpu_bench.sh ------------------------------------------------------------------------------

needs_no_gpu = pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")


def _gpu_bench(tmp_path: Path, path: str) -> subprocess.CompletedProcess:
    # OUT lies under a regular file, so a script that went past its check would stop at its
    # `mkdir -p "$OUT"` at once instead of running the GPU tests and writing a 9 GB model.
    (tmp_path / "a-file").write_text("")
    env = {**ENV, "OUT": str(tmp_path / "a-file" / "gpu_out"), "PATH": path}
    return _run(["bash", str(EXAMPLES / "gpu_bench.sh")], env=env, timeout=60)


@needs_no_gpu
def test_gpu_bench_without_nvidia_smi_stops_at_once(tmp_path):
    _one_line(_gpu_bench(tmp_path, os.environ["PATH"]), "no NVIDIA GPU found", "needs a lent card")


@needs_no_gpu
def test_gpu_bench_with_a_card_numba_cannot_use_stops_at_once(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"  # sees a card, which numba (no numba-cuda, no driver here) cannot open
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-0)'\n")
    fake.chmod(0o755)
    _one_line(_gpu_bench(tmp_path, f"{bin_dir}{os.pathsep}{os.environ['PATH']}"),
              "numba cannot use the NVIDIA GPU", "needs a lent card")


def test_gpu_bench_without_gguf_nor_its_wheel_stops_before_anything(tmp_path):
    """The device image has no gguf: without the wheel carried in .whl/, pip failed after the
    machine had started ("*.whl is not a valid wheel filename")."""
    hidden = tmp_path / "hide" / "gguf"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    (tmp_path / "a-file").write_text("")
    env = {**ENV, "OUT": str(tmp_path / "a-file" / "gpu_out"), "PYTHONPATH": str(tmp_path / "hide"),
           "PATH": os.environ["PATH"], "WHEELS": str(tmp_path / "no-wheels")}
    r = _run(["bash", str(EXAMPLES / "gpu_bench.sh")], env=env, timeout=60, cwd=tmp_path)  # from elsewhere, too
    _one_line(r, "gguf is not installed and .whl/ holds no gguf wheel", "examples/gpu_wheels.sh")


# ---- run_with_ram_budget.py --------------------------------------------------------------------

def test_ram_budget_example_waits_passively_on_a_busy_machine():
    """As `stepstream run`: with every core busy elsewhere, OMP_WAIT_POLICY is PASSIVE before the
    model loads (its kernels start OpenMP, which reads the variable once)."""
    wrapper = f"""
import os, runpy, sys
import psutil
import runtime
os.environ.pop("OMP_WAIT_POLICY", None)
psutil.cpu_percent = lambda *a, **k: 100.0  # other processes hold every core
def load(*a, **k):
    print("policy at load:", os.environ.get("OMP_WAIT_POLICY"))
    raise SystemExit(0)
runtime.load = load
sys.argv = ["run_with_ram_budget.py", {str(MODEL)!r}, "--budget", "1MiB"]
runpy.run_path({str(EXAMPLES / "run_with_ram_budget.py")!r}, run_name="__main__")
"""
    env = {k: v for k, v in ENV.items() if k != "OMP_WAIT_POLICY"}
    r = _run([sys.executable, "-c", wrapper], env=env)
    assert r.returncode == 0, r.stderr
    assert "policy at load: PASSIVE" in r.stdout, r.stdout


def test_ram_budget_example_times_the_decode_apart_from_the_prompt():
    r = _example("run_with_ram_budget.py", str(MODEL), "--budget", "40%", "-n", "8", "--prompt", "def main():")
    assert r.returncode == 0, r.stderr
    # the prompt's evaluation (and the first token) on its own, then the rate over the tokens after it
    assert re.search(r"^prompt of \d+ tokens and first token: [\d.]+ s; then [\d.]+ tok/s over [1-7] tokens?$",
                     r.stdout, re.M), r.stdout


@pytest.mark.parametrize("n", ["-5", "0"])
def test_ram_budget_example_refuses_a_count_the_cli_refuses(n):
    _one_line(_example("run_with_ram_budget.py", str(MODEL), "-n", n), "-n", "positive count of tokens, or -1", n)


def test_ram_budget_example_refuses_a_size_without_a_unit():
    """--budget 30 was 30 bytes, refused by load as a --ram-budget (a flag it has not) of 0.0 MiB;
    sizes take a unit, as `stepstream run --ram-budget` does."""
    _one_line(_example("run_with_ram_budget.py", str(MODEL), "--budget", "30"), "--budget 30", "give a unit")


# ---- compare_llama_cpp.py ----------------------------------------------------------------------

@pytest.mark.parametrize("which, words", [("missing", ["missing.gguf", "not found"]),
                                          ("text", ["notes.txt", "not a GGUF file"]),
                                          ("threads", ["-t/--threads", "positive integer", "got 0"])])
def test_compare_llama_cpp_bad_arguments_are_one_line(tmp_path, which, words):
    pytest.importorskip("llama_cpp")
    (tmp_path / "notes.txt").write_text("hello\n")
    args = {"missing": [str(tmp_path / "missing.gguf")], "text": [str(tmp_path / "notes.txt")],
            "threads": [str(MODEL), "-t", "0"]}[which]
    _one_line(_example("compare_llama_cpp.py", *args), *words)


# ---- convert_checkpoint.py ---------------------------------------------------------------------

@pytest.fixture
def tmpdir_env(tmp_path):
    """The environment with TMPDIR in a folder of its own, to see what the script leaves there."""
    (tmp_path / "tmp").mkdir()
    return {**ENV, "TMPDIR": str(tmp_path / "tmp")}, tmp_path / "tmp"


def test_convert_example_without_arguments_leaves_no_temporary_folder(tmpdir_env):
    env, tmp = tmpdir_env
    r = _example("convert_checkpoint.py", "--type", "q8_0", env=env)
    assert r.returncode == 0, r.stderr
    assert "wrote " in r.stdout and "117 tensors" in r.stdout
    assert list(tmp.iterdir()) == []


def test_convert_example_bad_type_is_one_line_and_leaves_nothing(tmpdir_env):
    env, tmp = tmpdir_env
    _one_line(_example("convert_checkpoint.py", "--type", "q9", env=env), "--type", "'q9'", "q4_k_m")
    assert list(tmp.iterdir()) == []


def test_convert_example_directory_without_config_is_one_line(tmp_path, tmpdir_env):
    env, tmp = tmpdir_env
    (tmp_path / "adir").mkdir()
    _one_line(_example("convert_checkpoint.py", str(tmp_path / "adir"), str(tmp_path / "x.gguf"), env=env),
              "config.json", "not found")
    assert list(tmp.iterdir()) == []


def test_convert_example_replaces_an_existing_file_only_with_force(tiny_ckpt, tmp_path):
    hf = tiny_ckpt
    out = tmp_path / "x.gguf"
    out.write_bytes(b"an earlier file")
    _one_line(_example("convert_checkpoint.py", str(hf), str(out), "--type", "q8_0"), str(out), "--force")
    assert out.read_bytes() == b"an earlier file"
    r = _example("convert_checkpoint.py", str(hf), str(out), "--type", "q8_0", "--force")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:4] == b"GGUF"


# ---- agent_tool_loop.py ------------------------------------------------------------------------

def test_agent_loop_without_a_server_is_one_line():
    pytest.importorskip("openai")
    url = f"http://127.0.0.1:{_free_port()}/v1"
    _one_line(_example("agent_tool_loop.py", "How many lines?", "--base-url", url),
              "cannot reach the server", url, "stepstream serve")


def test_agent_loop_with_a_wrong_base_url_is_one_line():
    """A server that is not the OpenAI API there (404 for /models) is named, with its answer."""
    pytest.importorskip("openai")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/nothing-here"
        _one_line(_example("agent_tool_loop.py", "q", "--base-url", url), url, "answered 404")
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("steps", ["0", "-1"])
def test_agent_loop_refuses_no_steps(steps):
    pytest.importorskip("openai")
    _one_line(_example("agent_tool_loop.py", "q", "--steps", steps), "--steps", "positive integer", steps)


def test_agent_loop_help_keeps_the_whole_description():
    pytest.importorskip("openai")
    r = _example("agent_tool_loop.py", "--help")
    assert r.returncode == 0, r.stderr
    assert "we run it and send\nthe result back, until it answers in plain text." in r.stdout


@pytest.mark.parametrize("script, package, words", [
    ("compare_llama_cpp.py", "llama_cpp", "needs llama-cpp-python: pip install"),
    ("agent_tool_loop.py", "openai", "needs the openai client: pip install openai")])
def test_a_missing_package_is_named_in_one_line(tmp_path, script, package, words):
    """As where the README's first command installed only stepstream: a package that raises on
    import stands in for the missing one."""
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text(f"raise ModuleNotFoundError('No module named {package}', "
                                                    f"name='{package}')\n")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    args = [str(MODEL)] if script == "compare_llama_cpp.py" else ["hi"]
    _one_line(_example(script, *args, env=env), words)


def test_structured_output_prints_a_value_its_pydantic_model_accepts(tmp_path):
    """examples/structured_output.py on the embedded model: the reply parses into the model (bounds,
    pattern and date held); a file that is no GGUF is one line, exit status 2."""
    r = _example("structured_output.py", "-t", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Trip(city=") and "country_code='" in r.stdout, r.stdout
    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"nope")
    _one_line(_example("structured_output.py", str(bad)), "not.gguf")


def test_grammar_output_prints_text_of_its_grammars_shape(tmp_path):
    """examples/grammar_output.py on the embedded model: the reply is text the verdict grammar
    accepts (checked by the recognizer: a verdict of the three, then three reasons); a grammar
    file that cannot be used is one line naming its line and column, exit status 2."""
    import re

    r = _example("grammar_output.py", "-t", "1")
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"Verdict: (positive|negative|mixed)\n(- [A-Za-z0-9][^\n]{0,60}\n){3}", r.stdout), r.stdout
    bad = tmp_path / "bad.gbnf"
    bad.write_text('root ::= "a" | \nb\n')
    _one_line(_example("grammar_output.py", str(MODEL), "x", "--grammar-file", str(bad)), "bad.gbnf", "line 2")
