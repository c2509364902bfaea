"""A real `stepstream serve` process on a free port, for tests that talk to it over HTTP."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

URL = re.compile(r"at (http://\S+)/v1")


@dataclass
class Server:
    proc: subprocess.Popen
    url: str = ""
    lines: list[str] = field(default_factory=list)  # what it printed on stderr

    @property
    def log(self) -> str:
        return "".join(self.lines)


def start_server(model: Path, *args: str, timeout: float = 300.0) -> Server:
    """A started server, listening and healthy (the caller stops it: stop_server)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    s = Server(subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", "-m", str(model), "--port", "0", *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env))
    found = threading.Event()

    def read():  # all along, so a full pipe never blocks the server
        for line in s.proc.stderr:
            s.lines.append(line)
            m = URL.search(line)
            if m and not found.is_set():
                s.url = m.group(1)
                found.set()
        found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout) or not s.url:
        stop_server(s)
        raise RuntimeError("the server did not start:\n" + s.log)
    deadline = time.monotonic() + timeout
    while httpx.get(s.url + "/health", timeout=5).status_code != 200:
        if time.monotonic() > deadline:
            stop_server(s)
            raise RuntimeError("the server never became healthy:\n" + s.log)
        time.sleep(0.05)
    return s


def stop_server(s: Server, timeout: float = 10.0) -> int:
    if s.proc.poll() is None:
        s.proc.terminate()
    try:
        return s.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        s.proc.kill()
        return s.proc.wait()


@contextlib.contextmanager
def live_server(model: Path, *args: str, timeout: float = 300.0, check_log: bool = True):
    """Yields the base URL (http://127.0.0.1:PORT) of a server started with `args`; stops it after
    and, with check_log, fails if it printed a traceback. The timeout covers a cold kernel cache:
    `serve` compiled for 103-105 s alone on this 2-core host from a fresh clone, and 120 s ran out
    beside another test worker (every test of test_server.py errored at setup)."""
    s = start_server(model, *args, timeout=timeout)
    try:
        yield s.url
    finally:
        stop_server(s)
    if check_log and "Traceback" in s.log:
        raise AssertionError("the server printed a traceback:\n" + s.log[-4000:])
