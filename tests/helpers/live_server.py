"""A real `stepstream serve` process on a free port, for tests that talk to it over HTTP."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

URL = re.compile(r"at (http://\S+)/v1")


@contextlib.contextmanager
def live_server(model: Path, *args: str, timeout: float = 120.0):
    """Yields the base URL (http://127.0.0.1:PORT) of a server started with `args`; stops it after."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", "-m", str(model), "--port", "0", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + timeout
        url = None
        while url is None:
            line = proc.stderr.readline()
            if not line:
                raise RuntimeError(f"the server exited ({proc.wait()}) before listening:\n" + "".join(lines))
            lines.append(line)
            m = URL.search(line)
            url = m.group(1) if m else None
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not start:\n" + "".join(lines))
        # keep reading what it prints, so a full pipe never blocks it
        threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
        while httpx.get(url + "/health", timeout=5).status_code != 200:
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
