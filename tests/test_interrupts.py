"""Ctrl-C and SIGTERM held back while the main thread waits on a worker (runtime.base.interrupts),
and the converter stopping at its next chunk when one arrives. Each case runs in a process of
its own: the signals are real, sent with os.kill."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_a_signal_waits_for_check_while_the_main_thread_waits_on_a_future():
    """SIGINT and then SIGTERM (with the commands' Terminated handler) land while the main thread
    waits in Future.result(): the result comes back, check() raises each, and the handlers are the
    old ones afterwards. Without the hold, result() itself raises."""
    r = _run("""
        import os, signal, threading, time
        from concurrent.futures import ThreadPoolExecutor
        from runtime.base import interrupts
        from runtime.base.errors import Terminated, raise_terminated

        def slow(sig):
            threading.Timer(0.1, os.kill, (os.getpid(), sig)).start()
            time.sleep(0.5)
            return sig

        signal.signal(signal.SIGTERM, raise_terminated)
        got = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with interrupts.held_back(), ThreadPoolExecutor(1) as ex:
                got.append(int(ex.submit(slow, sig).result()))
                try:
                    interrupts.check()
                except Terminated:
                    got.append("Terminated")
                except KeyboardInterrupt:
                    got.append("KeyboardInterrupt")
                interrupts.check()  # acted on once
        got.append(signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        got.append(signal.getsignal(signal.SIGTERM) is raise_terminated)
        try:
            with ThreadPoolExecutor(1) as ex:
                ex.submit(slow, signal.SIGINT).result()
        except KeyboardInterrupt:
            got.append("unheld: raised in result()")
        print(got)
        """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str([int(signal.SIGINT), "KeyboardInterrupt", int(signal.SIGTERM), "Terminated",
                                    True, True, "unheld: raised in result()"])


def test_a_signal_still_waiting_at_the_end_is_raised_there_with_the_handlers_restored():
    r = _run("""
        import os, signal
        from runtime.base import interrupts
        try:
            with interrupts.held_back():
                os.kill(os.getpid(), signal.SIGINT)
                sum(range(100000))  # bytecodes run: the handler has been called
                print("still inside", flush=True)
        except KeyboardInterrupt:
            print("raised at the end", signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["still inside", "raised at the end True"]


def test_a_third_signal_ends_the_process_at_once_and_a_default_disposition_is_left_alone():
    """While the main thread waits 30 s on a worker: three SIGINTs end the process by SIGINT at
    once; with SIGTERM's default disposition (the Python API's), one SIGTERM ends it as before."""
    code = """
        import os, signal, sys, threading, time
        from concurrent.futures import ThreadPoolExecutor
        from runtime.base import interrupts
        sig, n = int(sys.argv[1]), int(sys.argv[2])
        def send():
            for _ in range(n):
                time.sleep(0.2)
                os.kill(os.getpid(), sig)
        threading.Thread(target=send, daemon=True).start()
        with interrupts.held_back(), ThreadPoolExecutor(1) as ex:
            ex.submit(time.sleep, 30).result()
        print("not ended")
        """
    for sig, n in ((signal.SIGINT, 3), (signal.SIGTERM, 1)):
        t0 = time.monotonic()
        r = _run(code, str(int(sig)), str(n), timeout=60)
        assert r.returncode == -sig, (sig, r.returncode, r.stdout, r.stderr)
        assert time.monotonic() - t0 < 20


def test_the_converter_stops_at_the_next_chunk_after_a_signal_during_a_read(tiny_ckpt, tmp_path):
    """A SIGINT sent while the reader thread reads a chunk (the main thread waiting on it or
    quantizing): the run raises KeyboardInterrupt from the chunk loop's check, not from wherever
    the main thread was (inside a lock, perhaps), before the reader starts another chunk, and
    leaves neither the output nor its .part."""
    out = tmp_path / "m.gguf"
    r = _run("""
        import json, os, signal, sys, threading, traceback
        from pathlib import Path
        from convert import converter, tensor_stream
        loads, after = [], []
        load = tensor_stream._load
        def signalling_load(*a):
            loads.append(threading.current_thread().name)
            if len(loads) == 3:
                os.kill(os.getpid(), signal.SIGINT)
            elif len(loads) > 3:
                after.append(len(loads))
            return load(*a)
        tensor_stream._load = signalling_load
        out = Path(sys.argv[2])
        try:
            converter.convert(Path(sys.argv[1]), out, "q8_0", progress=False)
            outcome = "finished"
        except KeyboardInterrupt as e:
            outcome = "KeyboardInterrupt"
            raised_in = [f"{Path(f.filename).name}:{f.name}" for f in traceback.extract_tb(e.__traceback__)[-2:]]
        print(json.dumps({"outcome": outcome, "raised_in": raised_in, "reader": sorted(set(loads)), "loads_after": after,
                          "files": sorted(p.name for p in out.parent.iterdir())}))
        """, str(tiny_ckpt), str(out))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["outcome"] == "KeyboardInterrupt", got
    assert got["raised_in"] == ["tensor_stream.py:write_tensor", "interrupts.py:check"], got
    assert all(name.startswith("convert-read") for name in got["reader"]), got
    assert got["loads_after"] == [] and got["files"] == [], got


def test_sigterm_ends_every_command_with_143_as_the_readme_says():
    """`kill` on `stepstream run` ended it by the signal's default (status -15 to Python, no
    line), where Ctrl-C prints "interrupted" and exits 130: every command now unwinds from
    SIGTERM as from Ctrl-C, says "terminated" and exits 143."""
    model = REPO / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
    p = subprocess.Popen([sys.executable, "-m", "runtime.cli", "run", "-m", str(model), "-p", "def f(x):", "-n", "4000",
                          "-c", "4096", "--temp", "1"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL)
    try:
        assert p.stdout.read(40)  # generating
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 143, (p.returncode, err[-2000:])
    assert err.decode().rstrip().endswith("terminated") and b"Traceback" not in err


def test_ctrl_c_during_bench_beside_llama_cpp_is_an_interruption():
    """Ctrl-C (to the whole process group, as a terminal sends it) during `bench --llama-cpp`
    killed llama.cpp's child first, and the parent, closing it, reported "llama.cpp's benchmark
    process exited (code 1)" with exit status 2. Now: "interrupted", 130, no child left."""
    import os

    model = REPO / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
    p = subprocess.Popen([sys.executable, "-m", "runtime.cli", "bench", "-m", str(model), "-p", "512", "-n", "1000",
                          "-r", "50", "--llama-cpp"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        assert p.stderr.readline().startswith(b"loading the kernels")  # ours loaded; llama.cpp's child starts
        time.sleep(2.5)  # the child loading or running: either way Ctrl-C reaches both processes
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, (p.returncode, err[-2000:])
    assert err.decode().rstrip().endswith("interrupted") and b"Traceback" not in err, err[-2000:]
    for _ in range(100):  # multiprocessing's resource tracker leaves once it sees the parent gone
        left = subprocess.run(["pgrep", "-a", "-g", str(p.pid)], capture_output=True, text=True).stdout.splitlines()
        if not left:
            break
        time.sleep(0.1)
    assert not left, left


def test_sigterm_dropped_inside_a_c_callback_is_raised_after_the_block():
    """While numba loads its kernels, a signal's exception is raised inside llvmlite's ctypes
    callbacks, and ctypes drops it ("Exception ignored"): SIGTERM during "loading the kernels..."
    let `run` go on to exit 0 after a 96-s compile (a review's finding; Ctrl-C was kept already).
    Here the exception is raised in a ctypes callback of libc's qsort, as there."""
    r = _run("""
        import ctypes, os, signal
        from runtime.base.errors import Terminated, raise_terminated
        from runtime.cli.common import interrupts_kept

        signal.signal(signal.SIGTERM, raise_terminated)  # as every command installs it
        libc = ctypes.CDLL(None)
        CMP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))
        sent = []

        def compare(a, b):
            if not sent:
                sent.append(1)
                os.kill(os.getpid(), signal.SIGTERM)  # raised here, inside the callback: dropped
            return a[0] - b[0]

        values = (ctypes.c_int * 8)(*range(8, 0, -1))
        try:
            with interrupts_kept():
                libc.qsort(values, 8, ctypes.sizeof(ctypes.c_int), CMP(compare))
            print("went on")
        except Terminated:
            print("terminated", list(values) == sorted(values))
        assert signal.getsignal(signal.SIGTERM) is raise_terminated
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "terminated True", (r.stdout, r.stderr)
    assert "Exception ignored" not in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_sigterm_during_a_chat_reply_ends_the_chat():
    """chat caught Terminated with the Ctrl-C that stops a reply: SIGTERM printed "[reply
    stopped]" and the chat waited for input. Now it ends: "terminated", exit 143."""
    model = REPO / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
    p = subprocess.Popen([sys.executable, "-m", "runtime.cli", "chat", "-m", str(model), "-n", "-1", "--temp", "1",
                          "-c", "4096"], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        p.stdin.write(b"Write a long story about the sea.\n")
        p.stdin.flush()
        assert p.stdout.read(20)  # the reply is streaming; stdin stays open
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 143, (p.returncode, err[-2000:])
    assert err.decode().rstrip().endswith("terminated") and b"[reply stopped]" not in err


@pytest.mark.parametrize("nohup", [False, True])
def test_sighup_unwinds_as_sigterm_does_unless_ignored(nohup):
    """A closed terminal or a dropped ssh session (SIGHUP) ended a conversion by the signal's
    default, leaving its partial files and no word (a review); it now unwinds as SIGTERM does and
    exits 129. Under `nohup` (SIGHUP ignored) the command runs on."""
    model = REPO / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
    ignore = (lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if nohup else None
    p = subprocess.Popen([sys.executable, "-m", "runtime.cli", "run", "-m", str(model), "-p", "def f(x):", "-n", "4000",
                          "-c", "4096", "--temp", "1"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, preexec_fn=ignore)
    try:
        assert p.stdout.read(40)  # generating
        p.send_signal(signal.SIGHUP)
        if nohup:
            assert p.stdout.read(40)  # still generating
            p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    want, word = (143, "terminated") if nohup else (129, "hung up")
    assert p.returncode == want, (p.returncode, err[-2000:])
    assert err.decode().rstrip().endswith(word) and b"Traceback" not in err
