"""Back the expert cache's memory with pages before its slots are first used, on a thread.

A fresh anonymous page costs a fault and a zeroing on first touch. On a virtual machine whose
guest hands unused memory back to its host (free page reporting, ballooning), the host must
also back it again: on this project's VM a first touch ran at 0.5-0.9 GB/s, and filling the
cache of the 3-layer synth file at a 55% cap paid it inside expert reads, which decode waits
on. `Prefault` runs MADV_POPULATE_WRITE (Linux 5.14) over the arena in 64 MiB steps, lowest
address first (the order the cache hands out free slots), from a thread that spends its time
in the kernel, without the GIL. The advice faults pages in as a write would but leaves their bytes alone, so
it may run while reads fill slots. Where the kernel lacks it, it stops at the first refusal;
nothing else changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading

import numpy as np

MADV_POPULATE_WRITE = 23
STEP = 64 * 2**20


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = libc.madvise
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


class Prefault:
    """Populate the pages of `arena` (uint8, page-aligned start) in the background."""

    def __init__(self, arena: np.ndarray, step: int = STEP, start: bool = True):
        self._arena = arena  # held until the thread ends: the pages must stay mapped
        self._step = step
        self._stop = threading.Event()
        self.populated = 0  # bytes advised so far
        self.refused: int | None = None  # errno of a refusal (no such advice here)
        self._thread = threading.Thread(target=self._run, name="expert-cache-prefault", daemon=True)
        if start:
            self._thread.start()

    def _run(self) -> None:
        madvise = _madvise()
        if madvise is None:
            self.refused = 0
            self._arena = None
            return
        base, total = self._arena.ctypes.data, self._arena.nbytes
        for off in range(0, total, self._step):
            if self._stop.is_set():
                break
            n = min(self._step, total - off)
            if madvise(base + off, n, MADV_POPULATE_WRITE) != 0:
                self.refused = ctypes.get_errno()
                break
            self.populated = off + n
        self._arena = None

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def stop(self) -> None:
        """Stop after the step in progress, and wait for it."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._arena = None
