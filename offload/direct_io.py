"""Reads that bypass the page cache: O_DIRECT into aligned buffers.

With O_DIRECT the bytes go from the disk straight into our buffer, so the expert
cache's budget is the true memory cost of the experts: nothing piles up in the page
cache, which a memory cgroup would also charge to us. O_DIRECT needs the file offset,
the length and the buffer address aligned to the device's logical block; we align to
4096 bytes, read the aligned span that covers an extent, and hand back a view of the
extent inside it. Where the filesystem refuses O_DIRECT (tmpfs, some network
filesystems), reads fall back to buffered `pread` followed by POSIX_FADV_DONTNEED on the
range, with a warning.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import numpy as np

from runtime.base.errors import StepstreamError

ALIGN = 4096


def aligned_empty(nbytes: int, align: int = ALIGN) -> np.ndarray:
    """uint8 [nbytes] whose first byte sits on an `align` boundary."""
    raw = np.empty(nbytes + align, dtype=np.uint8)
    shift = (-raw.ctypes.data) % align
    return raw[shift : shift + nbytes]


def span(offset: int, nbytes: int) -> tuple[int, int, int]:
    """(aligned start, aligned length, position of `offset` inside it)."""
    start = offset - offset % ALIGN
    end = -(-(offset + nbytes) // ALIGN) * ALIGN
    return start, end - start, offset - start


def span_bytes(nbytes: int) -> int:
    """Room an extent of `nbytes` at any offset needs once aligned."""
    return -(-(nbytes + ALIGN - 1) // ALIGN) * ALIGN


class ReadError(StepstreamError):
    pass


class DirectReader:
    """One descriptor per file, opened on first use; thread-safe (pread has no shared position)."""

    def __init__(self, direct: bool = True):
        self.want_direct = direct and hasattr(os, "O_DIRECT")
        self._fds: dict[Path, tuple[int, bool]] = {}
        self._lock = threading.Lock()
        self.fallback_paths: list[Path] = []

    def _fd(self, path: Path) -> tuple[int, bool]:
        with self._lock:
            got = self._fds.get(path)
            if got is not None:
                return got
            fd, direct = -1, False
            if self.want_direct:
                try:
                    fd, direct = os.open(path, os.O_RDONLY | os.O_DIRECT), True
                except OSError:
                    pass
            if fd < 0:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise ReadError(f"{path}: cannot open for reading ({e.strerror})") from None
                if self.want_direct:
                    self.fallback_paths.append(path)
                    warnings.warn(f"{path}: the filesystem refuses O_DIRECT; expert reads go through the page cache "
                                  "and are dropped from it after each read", RuntimeWarning, stacklevel=3)
            self._fds[path] = (fd, direct)
            return fd, direct

    def read(self, path: Path, offset: int, nbytes: int, buf: np.ndarray) -> np.ndarray:
        """Read [offset, offset+nbytes) of `path` using `buf` (aligned, >= span_bytes(nbytes)); a view of the bytes."""
        fd, direct = self._fd(path)
        start, length, skip = span(offset, nbytes)
        if buf.nbytes < length:
            raise ValueError(f"buffer of {buf.nbytes} bytes cannot hold the {length}-byte aligned span")
        target = memoryview(buf[:length])
        got = 0
        try:
            while got < length:
                n = os.preadv(fd, [target[got:]], start + got)
                if n == 0:
                    break
                got += n
        except OSError as e:
            raise ReadError(f"{path}: read of {nbytes} bytes at offset {offset} failed ({e.strerror})") from None
        if got < skip + nbytes:
            raise ReadError(f"{path}: read of {nbytes} bytes at offset {offset} came back short ({max(0, got - skip)} bytes); the file is truncated")
        if not direct:
            os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
        return buf[skip : skip + nbytes]

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()
