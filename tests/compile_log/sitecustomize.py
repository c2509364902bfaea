"""Records every Numba compile of every Python process started with this directory on
PYTHONPATH and STEPSTREAM_COMPILE_LOG naming a file: one JSON line per compiled function (pid,
the pytest test running, the function, its argument types, its seconds less those of the
functions compiled inside it). Child processes inherit both variables (runtime.base.child keeps
PYTHONPATH), so a server or CLI started by a test is recorded under that test's name.

    STEPSTREAM_COMPILE_LOG=/tmp/compiles.jsonl PYTHONPATH=tests/compile_log python -m pytest ...
    python -m tests.compile_log /tmp/compiles.jsonl

Numba is not imported here (a process's NUMBA_* settings are read when it is): the recorder is
registered when numba.core.event is first imported.
"""

import importlib.abc
import importlib.machinery
import json
import os
import sys
import threading
import time

LOG = os.environ.get("STEPSTREAM_COMPILE_LOG")


def _register(event) -> None:
    local = threading.local()

    class Recorder(event.Listener):
        def on_start(self, ev):
            if not hasattr(local, "stack"):
                local.stack = []
            local.stack.append([time.perf_counter(), 0.0])

        def on_end(self, ev):
            t0, nested = local.stack.pop()
            total = time.perf_counter() - t0
            if local.stack:
                local.stack[-1][1] += total
            f = ev.data["dispatcher"].py_func
            record = {"pid": os.getpid(), "test": os.environ.get("PYTEST_CURRENT_TEST", ""),
                      "function": f"{f.__module__}.{f.__qualname__}", "args": [str(a) for a in ev.data["args"]],
                      "seconds": total - nested}
            fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (json.dumps(record) + "\n").encode())  # one write: lines of processes do not mix
            finally:
                os.close(fd)

    event.register("numba:compile", Recorder())


class _OnImport(importlib.abc.MetaPathFinder):
    """Finds numba.core.event as the path finder does, and registers the recorder once it ran."""

    def find_spec(self, name, path, target=None):
        if name != "numba.core.event":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register(module)

        spec.loader.exec_module = exec_module
        return spec


if LOG:
    sys.meta_path.insert(0, _OnImport())
