"""A model file cut short or copied over while the model reads it: one line and exit status 2,
never SIGBUS (exit 135). The weights are read through a map of the file; a file cut short
under a map kills the process at the first page past its new end. A read lease
(runtime.base.gguf_file._Leases) holds another process's truncation or open for writing back
until no evaluation is reading the map; the next evaluation then finds the change.

A review found SIGBUS in 3 of 3 runs of each: `cp` over the file mid-decode, truncation
mid-decode and mid-prefill, and `serve` dying mid-stream. References: the exit status and the
stderr of real processes, real `cp` and `truncate`, and the text of an untouched run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import runtime
from runtime.base.errors import StepstreamError

MODEL = Path(runtime.__file__).parent / "data" / "step35-mini-q4_k_m.gguf"
ROOT = Path(runtime.__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's file leases")


def _start_run(path: Path, n: int, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "runtime.cli", "run", "-m", str(path), "-p", "def f():", "-n", str(n),
                             "--temp", "0"], stdout=open(out, "w"), stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _wait_for_text(out: Path, p: subprocess.Popen, chars: int = 40) -> None:
    deadline = time.monotonic() + 300
    while out.stat().st_size < chars:
        assert p.poll() is None and time.monotonic() < deadline, "the run ended before it generated"
        time.sleep(0.05)


@pytest.mark.parametrize("round_", range(3))
def test_a_file_copied_over_mid_decode_is_one_line_not_sigbus(tmp_path, round_):
    live, other = tmp_path / "live.gguf", tmp_path / "other.gguf"
    shutil.copy(MODEL, live)
    with open(other, "wb") as f:  # another file of another size, as a user's new download
        f.write(MODEL.read_bytes()[: MODEL.stat().st_size // 2])
    p = _start_run(live, 4000, tmp_path / "out.txt")
    try:
        _wait_for_text(tmp_path / "out.txt", p)
        cp = subprocess.run(["cp", str(other), str(live)], capture_output=True, text=True, timeout=120)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert cp.returncode == 0, cp.stderr  # the copy waits for the step in flight, then goes through
    assert p.returncode == 2, err
    assert err.strip().splitlines()[-1].startswith(f"error: {live}: the file changed on disk"), err
    assert live.stat().st_size == other.stat().st_size


def test_coreutils_truncate_is_refused_while_the_model_runs_and_the_text_is_whole(tmp_path):
    """`truncate` opens without waiting (O_NONBLOCK): it fails at once, the file stays whole, and
    the run goes on to the same text as an untouched run."""
    live = tmp_path / "live.gguf"
    shutil.copy(MODEL, live)
    ref = subprocess.run([sys.executable, "-m", "runtime.cli", "run", "-m", str(live), "-p", "def f():", "-n", "300",
                          "--temp", "0"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert ref.returncode == 0, ref.stderr
    p = _start_run(live, 300, tmp_path / "out.txt")
    try:
        _wait_for_text(tmp_path / "out.txt", p)
        tr = subprocess.run(["truncate", "-s", "1000", str(live)], capture_output=True, text=True, timeout=60)
        _, err = p.communicate(timeout=300)
    finally:
        p.kill()
    assert tr.returncode != 0 and "Resource temporarily unavailable" in tr.stderr, tr
    assert live.stat().st_size == MODEL.stat().st_size
    assert p.returncode == 0, err
    assert (tmp_path / "out.txt").read_text() == ref.stdout


def test_a_truncation_from_another_thread_waits_for_the_evaluation_and_is_then_named(tmp_path):
    """In one process (the Python API): truncate(2) from another thread is held back while the
    evaluations run, lands between two of them, and the next one is refused in one error; the
    model keeps refusing, and never reads the map again."""
    live = tmp_path / "live.gguf"
    shutil.copy(MODEL, live)
    m = runtime.load(live, n_ctx=512)
    m.eval(m.tokenize("def f():"))
    done = threading.Event()
    cut = threading.Thread(target=lambda: (os.truncate(live, 4096), done.set()))
    cut.start()
    # the evaluation after the cut names the new size, or, where it runs before the truncating
    # thread has finished (a loaded machine), the writer it found (both are the truth then)
    with pytest.raises(StepstreamError, match="the file changed on disk while the model was loaded "
                                              r"\((it is 4096 bytes|another process has it open for writing)"):
        for t in range(400):
            m.eval([t % 100 + 10])
    cut.join(60)
    assert done.is_set()
    for call in (lambda: m.eval([5]), lambda: m.create_completion("x", max_tokens=2)):
        with pytest.raises(StepstreamError, match=r"the file changed on disk while the model was loaded \(it is 4096 bytes"):
            call()


def test_serve_after_its_file_changed_says_so_in_health_and_its_log(tmp_path):
    """A review found /health answering 200 "ok" while every completion failed with 500 for good,
    and nothing in the log: now /health answers 503 with the reason, and the log says it once."""
    import httpx

    from tests.helpers.live_server import start_server, stop_server

    live = tmp_path / "live.gguf"
    shutil.copy(MODEL, live)
    s = start_server(live, "--ctx-size", "256")
    try:
        body = {"prompt": "def f():", "max_tokens": 3, "temperature": 0}
        assert httpx.post(s.url + "/v1/completions", json=body, timeout=120).status_code == 200
        cp = subprocess.run(["cp", str(tmp_path / "live.gguf"), str(tmp_path / "other.gguf")], timeout=60)
        assert cp.returncode == 0
        with open(tmp_path / "other.gguf", "r+b") as f:  # the same size, other bytes: a rewrite in place
            f.seek(MODEL.stat().st_size // 2)
            f.write(b"\x7f" * 4096)
        cp = subprocess.run(["cp", str(tmp_path / "other.gguf"), str(live)], capture_output=True, text=True, timeout=120)
        assert cp.returncode == 0, cp.stderr
        for _ in range(2):
            r = httpx.post(s.url + "/v1/completions", json=body, timeout=120)
            assert r.status_code == 500 and "the file changed on disk" in r.json()["error"]["message"], r.text
        h = httpx.get(s.url + "/health", timeout=30)
        assert h.status_code == 503, h.text
        assert h.json()["status"] == "error" and "the file changed on disk" in h.json()["error"], h.text
    finally:
        stop_server(s)
    said = [line for line in s.log.splitlines() if "the file changed on disk" in line]
    assert len(said) == 1 and said[0].startswith("error: "), s.log


def test_a_change_during_an_evaluation_is_named_as_the_change_not_as_its_nan(tmp_path, monkeypatch):
    """Without a lease (another file system, another owner), weights rewritten in place while an
    evaluation reads them show up as NaN: the error names the change, not the NaN (review 8 saw
    "NaN or Inf in the forward pass" for a streamed file rewritten in place)."""
    import numpy as np

    from runtime.base import gguf_file

    monkeypatch.setattr(gguf_file._Leases, "take", classmethod(lambda cls, part: False))
    live = tmp_path / "live.gguf"
    shutil.copy(MODEL, live)
    m = runtime.load(live, n_ctx=128)
    m.eval(m.tokenize("def f():"))

    def step(ids):  # another process rewrites the file mid-evaluation; the kernels then meet NaN
        subprocess.run([sys.executable, "-c", "import sys\nwith open(sys.argv[1], 'r+b') as f:\n"
                        "    f.seek(1 << 20)\n    f.write(b'\\x7f' * 4096)", str(live)], check=True)
        raise ZeroDivisionError("float division by zero")

    n = m.n_past
    with pytest.raises(StepstreamError, match="the file changed on disk while the model was loaded"):
        m._atomically(step, np.array([5]))
    assert m.n_past == n  # rolled back, as every failed evaluation is


@pytest.mark.parametrize("how", ["rename", "delete", "symlink"])
def test_a_file_renamed_over_or_deleted_after_load_is_harmless_to_streaming(tmp_path, how):
    """Streamed experts were read by opening the model's path on the first read: a new file
    renamed over it after load ran the new file's experts beside the loaded weights, with no
    error (a review's finding); a deleted file ended the run. The reader now reopens each part
    through the descriptor held since load: the text is the loaded file's."""
    from runtime.base.gguf_file import GGUFModelFile

    live = tmp_path / "live.gguf"
    shutil.copy(MODEL, live)
    other = tmp_path / "other.gguf"
    data = bytearray(MODEL.read_bytes())
    f = GGUFModelFile(MODEL)
    for name, t in f.tensors.items():  # another model of the same layout: its experts' bytes reversed
        if "_exps" in name:
            n = t.data.nbytes
            data[t.offset:t.offset + n] = data[t.offset:t.offset + n][::-1]
    assert data != MODEL.read_bytes()
    other.write_bytes(bytes(data))
    path = live
    if how == "symlink":
        path = tmp_path / "current.gguf"
        path.symlink_to(live)
    want = runtime.load(MODEL, experts="ram", n_threads=1, n_ctx=256).create_completion(
        "def f(x):", max_tokens=24, temperature=0)["choices"][0]["text"]
    m = runtime.load(path, ram_budget="1MiB", n_threads=1, n_ctx=256)
    if how == "rename":
        os.replace(other, live)
    elif how == "delete":
        live.unlink()
    else:
        path.unlink()
        path.symlink_to(other)
    got = m.create_completion("def f(x):", max_tokens=24, temperature=0)["choices"][0]["text"]
    assert got == want


def test_an_unreadable_model_file_is_one_line(tmp_path, monkeypatch):
    """A file the user may not read gave a PermissionError traceback (a review ran it without
    CAP_DAC_OVERRIDE); as root the open is faked to fail as it does for them."""
    from runtime.base import gguf_file

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(gguf_file, "open", denied, raising=False)
    with pytest.raises(StepstreamError, match=r"step35-mini-q4_k_m.gguf: cannot open for reading \(Permission denied\)"):
        gguf_file.GGUFModelFile(MODEL)


_CUT_DURING_COPY = """
import os, subprocess, sys, time
import runtime
from offload import placement
from runtime.base.errors import StepstreamError
path, copy = sys.argv[1], placement.make_resident
cutters = []

def copy_while_cut(*args, **kwargs):
    # another process truncates the file as the streaming load copies the resident weights
    cutters.append(subprocess.Popen([sys.executable, "-c", f"import os; os.truncate({path!r}, 4096)"]))
    time.sleep(1.5)  # its SIGIO has arrived: without a lease held, the truncation went through
    return copy(*args, **kwargs)

placement.make_resident = copy_while_cut
try:
    runtime.load(path, experts="stream")
except StepstreamError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
finally:
    for c in cutters:
        c.wait(60)
"""


def test_a_truncation_while_a_streaming_load_copies_the_weights_is_one_line(tmp_path):
    """The lease was let go while the streaming load copied the resident weights through the map
    (no evaluation counted as in flight), and the copy died of SIGBUS (exit 135). It now waits,
    and the load stops in one line."""
    live = tmp_path / "live.gguf"
    shutil.copy(MODEL, live)
    p = subprocess.run([sys.executable, "-c", _CUT_DURING_COPY, str(live)], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert f"error: {live}: the file changed on disk while the model was loaded" in p.stderr, p.stderr
    assert live.stat().st_size == 4096  # the writer got the file once the copy was done


def test_a_long_prompt_lets_a_held_writer_through_between_batches(tmp_path):
    """A prompt was one evaluation, which held a writer back for as long as it lasted: past the
    kernel's lease-break-time (45 s) the writer went through anyway and the process died of
    SIGBUS mid-prompt. Batch by batch, the writer gets the file between two batches and the next
    one is refused, before the prompt's end."""
    live = tmp_path / "live.gguf"
    shutil.copy(MODEL, live)
    m = runtime.load(live, n_ctx=1024, n_batch=16, n_threads=1)
    prompt = m.tokenize("def f(x):\n    return x + 1\n" * 40)[:600]
    started = threading.Event()
    original = m._prefill

    def prefill_and_cut(chunk):  # inside the first batch's evaluation, another thread truncates
        if not started.is_set():
            started.set()
            threading.Thread(target=os.truncate, args=(live, 4096), daemon=True).start()
            time.sleep(0.5)  # the writer is now held back by the lease
        return original(chunk)

    m._prefill = prefill_and_cut
    with pytest.raises(StepstreamError, match="the file changed on disk while the model was loaded"):
        m.eval_prompt(prompt)
    assert m.n_past == 16  # the first batch, and not the prompt's 599 positions before the writer's turn
