"""Ctrl-C and SIGTERM held back while the main thread shares locks with a worker thread.

Python runs a signal's handler in the main thread between any two bytecodes, the standard
library's lock code included. If KeyboardInterrupt (or our SIGTERM's Terminated) is raised in
`threading.Condition.__enter__` just after the lock was taken, as a `Future.result()` can be,
the lock is never released: the worker that finishes the future blocks on it for ever, and the
main thread, unwinding, waits in `ThreadPoolExecutor`'s shutdown for that worker. Seen: a
converter sent SIGINT mid-run still alive ten minutes later, its reader thread waiting for the
future's lock and its main thread joining the reader.

Inside `held_back()` the two signals are noted, not raised; `check()`, called where the main
thread holds no lock (the converter calls it between chunks, well under a second apart), runs
the handler that was in place, which raises as before. A third signal while one waits ends
the process at once, as if unhandled (the user insists; what is left is what a SIGKILL leaves).
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())
_FORCE_AFTER = 3  # the signal count, while one waits, that ends the process at once

_held: dict[int, object] = {}  # signal -> the handler held back's signals go to, while held_back() runs
_pending: list[int] = []  # signals noted and not yet acted on, in arrival order


def _note(signum, frame) -> None:
    _pending.append(signum)
    if len(_pending) >= _FORCE_AFTER:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def check() -> None:
    """Act on a held-back signal: run the handler that was in place (which raises
    KeyboardInterrupt or Terminated). A no-op outside held_back() or when none arrived."""
    if _pending:
        signum = _pending[0]
        _pending.clear()
        _held[signum](signum, None)


@contextmanager
def held_back():
    """Hold back SIGINT and SIGTERM, where their handlers raise, until check() or the end of the
    block (which acts on one still waiting, unless an exception already unwinds it). Signals
    whose disposition is the default (the process ends: nothing to deadlock) or ignored are
    left alone, and so is everything off the main thread, where handlers cannot be set."""
    if threading.current_thread() is not threading.main_thread() or _held:
        yield
        return
    for s in SIGNALS:
        previous = signal.getsignal(s)
        if callable(previous):
            _held[s] = previous
            signal.signal(s, _note)
    try:
        yield
        check()
    finally:
        for s, previous in _held.items():
            signal.signal(s, previous)
        _held.clear()
        _pending.clear()
