"""Backing the expert cache's memory ahead of use (offload.prefault): pages become resident,
bytes already written stay as they are even while writers fill slots, a kernel that refuses
the advice changes nothing, and closing the provider ends the thread.

References: mincore(2) for the arena's resident pages; the bytes the test wrote.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
import threading

import numpy as np
import pytest

from offload import prefault
from offload.cache import ExpertCache
from offload.direct_io import aligned_empty
from offload.prefault import Prefault
from offload.provider import StreamingExperts

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE is Linux's")
MiB = 2**20


def resident_bytes(a: np.ndarray) -> int:
    """Bytes of the pages under `a` that are resident, from mincore(2) over exactly `a`'s pages.

    /proc/self/smaps is not used: the kernel merges neighbouring anonymous mappings, so the
    mapping holding `a` may also hold other arrays' pages."""
    page = os.sysconf("SC_PAGE_SIZE")
    lo = a.ctypes.data - a.ctypes.data % page
    hi = -(-(a.ctypes.data + a.nbytes) // page) * page
    vec = (ctypes.c_ubyte * ((hi - lo) // page))()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    if libc.mincore(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return int(np.count_nonzero(np.frombuffer(vec, np.uint8) & 1)) * page


def kernel_populates() -> bool:
    a = aligned_empty(4096)
    p = Prefault(a)
    p.join()
    return p.refused is None


@linux
def test_pages_become_resident_and_written_bytes_stay():
    if not kernel_populates():
        pytest.skip("this kernel refuses MADV_POPULATE_WRITE (before Linux 5.14)")
    # A fresh anonymous map: np.empty may reuse heap pages a loaded model kept resident
    # (system.keep_freed_memory, in an earlier test of the same worker), and they hold old bytes.
    a = np.frombuffer(mmap.mmap(-1, 192 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), np.uint8)
    pattern = np.arange(MiB, dtype=np.uint8) ^ np.uint8(0x5A)
    a[64 * MiB:65 * MiB] = pattern  # one slot already filled
    before = resident_bytes(a)
    assert before < 32 * MiB, before
    p = Prefault(a, step=16 * MiB)
    p.join()
    assert p.refused is None and p.populated == a.nbytes
    assert resident_bytes(a) >= 190 * MiB
    np.testing.assert_array_equal(a[64 * MiB:65 * MiB], pattern)
    assert not a[:64 * MiB].any()


@linux
def test_writers_filling_slots_during_the_prefault_keep_their_bytes():
    if not kernel_populates():
        pytest.skip("this kernel refuses MADV_POPULATE_WRITE (before Linux 5.14)")
    a = aligned_empty(256 * MiB)
    slot = 3 * MiB + 4096
    n = a.nbytes // slot
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, (n, 4096), dtype=np.uint8)
    p = Prefault(a, step=MiB)  # many small steps, so writers and the advice interleave

    def fill(rows):
        for k in rows:
            s = a[k * slot:(k + 1) * slot]
            s[:4096] = data[k]
            s[-4096:] = data[k][::-1]

    writers = [threading.Thread(target=fill, args=(range(w, n, 2),)) for w in range(2)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    p.join()
    for k in range(n):
        s = a[k * slot:(k + 1) * slot]
        np.testing.assert_array_equal(s[:4096], data[k])
        np.testing.assert_array_equal(s[-4096:], data[k][::-1])


@linux
def test_a_refused_advice_stops_quietly(monkeypatch):
    monkeypatch.setattr(prefault, "MADV_POPULATE_WRITE", 0x7FFF)  # no such advice: EINVAL
    a = aligned_empty(8 * MiB)
    a[:4] = [1, 2, 3, 4]
    p = Prefault(a)
    p.join()
    assert p.refused == errno.EINVAL and p.populated == 0
    assert list(a[:4]) == [1, 2, 3, 4]


def test_closing_the_provider_stops_the_thread(tmp_path):
    cache = ExpertCache(64 * MiB, MiB)
    provider = StreamingExperts(table=None, cache=cache)
    assert provider.prefault is not None
    provider.close()
    assert not provider.prefault._thread.is_alive()
    off = StreamingExperts(table=None, cache=ExpertCache(4 * MiB, MiB), prefault=False)
    assert off.prefault is None
    off.close()
