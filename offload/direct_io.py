"""Reads that bypass the page cache: O_DIRECT into aligned buffers, size-checked, retried.

With O_DIRECT the bytes go from the disk straight into our buffer, so the expert
cache's budget is the true memory cost of the experts: nothing piles up in the page
cache, which a memory cgroup would also charge to us. O_DIRECT needs the file offset,
the length and the buffer address aligned to the device's logical block; we align to
4096 bytes, read the aligned span that covers an extent, and hand back a view of the
extent inside it.

Platforms and filesystems differ; what this host offers is probed when a reader is made:
    O_DIRECT                  Linux and most Unixes
    fcntl F_NOCACHE           macOS (no O_DIRECT): reads skip the page cache
    posix_fadvise DONTNEED    where O_DIRECT is refused (tmpfs, some network filesystems, or
                              reads that fail with EINVAL although the open succeeded):
                              buffered reads, dropped from the page cache after each read
    none of them              (Windows) buffered reads that stay in the page cache, with a warning
Positional reads use os.preadv, else os.pread (a copy), else lseek + read under a
per-file lock (Windows has neither). O_DIRECT is used with preadv only: the other two
read into buffers Python allocates, which O_DIRECT's alignment rules refuse.

Faults: EIO, EAGAIN and EINTR are retried a few times (a read has no side effects);
short reads go on from where they stopped; a read that ends early because the file
shrank, or a fault that persists, raises ReadError naming the file and the offset.
"""

from __future__ import annotations

import errno
import itertools
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.base.errors import StepstreamError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

ALIGN = 4096
RETRIES = 3  # further tries after a transient fault (EIO, EAGAIN, EINTR)
RETRY_PAUSE_S = 0.01  # first pause between tries; doubles each time
_TRANSIENT = {errno.EIO, errno.EAGAIN, errno.EINTR}
_DARWIN_F_NOCACHE = 48  # <sys/fcntl.h>; Python's fcntl module names it only in recent versions


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


@dataclass(frozen=True)
class IoPlatform:
    """The calls this host offers for expert reads (probed from `os` and `fcntl` when a reader is made)."""

    o_direct: bool
    f_nocache: int | None  # the fcntl command, on macOS
    fadvise: bool
    positional: str  # "preadv", "pread" or "seek"

    @classmethod
    def probe(cls) -> "IoPlatform":
        nocache = None
        if fcntl is not None:
            nocache = getattr(fcntl, "F_NOCACHE", _DARWIN_F_NOCACHE if sys.platform == "darwin" else None)
        positional = "preadv" if hasattr(os, "preadv") else "pread" if hasattr(os, "pread") else "seek"
        return cls(hasattr(os, "O_DIRECT"), nocache,
                   hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED"), positional)

    def describe(self) -> str:
        bypass = ("O_DIRECT" if self.o_direct else "F_NOCACHE" if self.f_nocache is not None
                  else "posix_fadvise" if self.fadvise else "nothing (reads stay in the page cache)")
        return f"page cache bypass: {bypass}; positional reads: {self.positional}"


@dataclass
class _File:
    fd: int
    direct: bool  # opened with O_DIRECT: offsets, lengths and buffers must stay aligned
    drop_after_read: bool  # posix_fadvise(DONTNEED) after each read
    lock: threading.Lock = field(default_factory=threading.Lock)  # for lseek + read only


class DirectReader:
    """One descriptor per file, opened on first use; thread-safe (positional reads share no offset)."""

    def __init__(self, direct: bool = True, held: dict[Path, int] | None = None):
        """held: descriptors the model file holds open on its parts since load; each part is
        reopened through its own (/proc/self/fd/N on Linux), so the reads come from the file
        that was loaded: a file renamed over it or deleted afterwards changes nothing (opening
        the path on the first read ran the new file's experts beside the old file's weights)."""
        self.platform = IoPlatform.probe()
        self.want_direct = direct
        self._held = dict(held or {})
        self._files: dict[Path, _File] = {}
        self._retired: list[int] = []  # descriptors replaced while other reads may still use them
        self._lock = threading.Lock()
        self.fallback_paths: list[Path] = []  # files where O_DIRECT was refused (at open or at read)
        self.retries = 0  # transient faults that a retry got past

    # ------------------------------------------------------------------ opening

    def _open(self, path: Path, flags: int) -> int:
        """A new descriptor on `path`'s file as loaded: through the held descriptor when there is
        one (its /proc link reopens the same inode with new flags; without /proc, or where the
        inode's mode now forbids an open, a duplicate of the held descriptor, read buffered)."""
        held = self._held.get(path)
        if held is None:
            return os.open(path, flags)
        link = f"/proc/self/fd/{held}"
        if os.path.exists(link):
            try:
                return os.open(link, flags)
            except PermissionError:
                pass
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "O_DIRECT through a duplicated descriptor")  # the caller goes on buffered
        return os.dup(held)

    def _open_buffered(self, path: Path) -> _File:
        try:
            fd = self._open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as e:
            raise ReadError(f"{path}: cannot open for reading ({e.strerror})") from None
        if self.want_direct and self.platform.f_nocache is not None:
            try:
                fcntl.fcntl(fd, self.platform.f_nocache, 1)
                return _File(fd, False, False)
            except OSError:
                pass
        if self.want_direct and not self.platform.fadvise:
            warnings.warn(f"{path}: this platform has no O_DIRECT, F_NOCACHE or posix_fadvise; expert reads stay "
                          "in the page cache, outside the RAM budget", RuntimeWarning, stacklevel=4)
        # dropped after each read only in place of O_DIRECT: with direct_io off (--no-direct-io)
        # the reads go through the page cache and stay there, as asked
        return _File(fd, False, self.want_direct and self.platform.fadvise)

    def _file(self, path: Path) -> _File:
        with self._lock:
            got = self._files.get(path)
            if got is not None:
                return got
            f = None
            if self.want_direct and self.platform.o_direct and self.platform.positional == "preadv":
                try:
                    f = _File(self._open(path, os.O_RDONLY | os.O_DIRECT), True, False)
                except OSError:
                    pass
            if f is None:
                f = self._open_buffered(path)
                if self.want_direct and self.platform.o_direct and self.platform.positional == "preadv":
                    self.fallback_paths.append(path)
                    warnings.warn(f"{path}: the filesystem refuses O_DIRECT; expert reads go through the page cache "
                                  "and are dropped from it after each read", RuntimeWarning, stacklevel=3)
            self._files[path] = f
            return f

    def _drop_direct(self, path: Path, old: _File, offset: int) -> _File:
        """O_DIRECT was accepted at open but a read was refused (EINVAL): go on buffered."""
        with self._lock:
            current = self._files[path]
            if current is not old:
                return current  # another thread already switched
            f = self._open_buffered(path)
            self._files[path] = f
            self._retired.append(old.fd)
            self.fallback_paths.append(path)
        warnings.warn(f"{path}: the filesystem refuses O_DIRECT reads (EINVAL at offset {offset}); expert reads go "
                      "through the page cache and are dropped from it after each read", RuntimeWarning, stacklevel=4)
        return f

    # ------------------------------------------------------------------ reading

    def _pread(self, f: _File, view: memoryview, offset: int) -> int:
        how = self.platform.positional
        if how == "preadv":
            return os.preadv(f.fd, [view], offset)
        if how == "pread":
            data = os.pread(f.fd, len(view), offset)
        else:
            with f.lock:
                os.lseek(f.fd, offset, os.SEEK_SET)
                data = os.read(f.fd, len(view))
        view[: len(data)] = data
        return len(data)

    def read(self, path: Path, offset: int, nbytes: int, buf: np.ndarray) -> np.ndarray:
        """Read [offset, offset+nbytes) of `path` using `buf` (aligned, >= span_bytes(nbytes)); a view of
        exactly `nbytes` bytes, or ReadError naming the file and the offset."""
        if offset < 0 or nbytes < 0:
            raise ReadError(f"{path}: read of {nbytes} bytes at offset {offset} is outside any file")
        start, length, skip = span(offset, nbytes)
        if buf.nbytes < length:
            raise ValueError(f"buffer of {buf.nbytes} bytes cannot hold the {length}-byte aligned span")
        target = memoryview(buf[:length])
        f = self._file(path)
        need = skip + nbytes
        got = 0  # bytes of the span in `buf`, from its start
        faults = stuck = 0
        while got < need:
            try:
                n = self._pread(f, target[got:], start + got)
            except OSError as e:
                if e.errno == errno.EINVAL and f.direct:
                    f = self._drop_direct(path, f, offset)
                    continue
                if e.errno in _TRANSIENT and faults < RETRIES:
                    faults += 1
                    self.retries += 1
                    time.sleep(RETRY_PAUSE_S * 2 ** (faults - 1))
                    continue
                tries = f" after {faults + 1} tries" if faults else ""
                raise ReadError(f"{path}: read of {nbytes} bytes at offset {offset} failed{tries} "
                                f"({e.strerror or e})") from None
            if n <= 0:
                break  # end of file
            if got + n >= need:
                got += n
                break
            # A short read: go on from where it stopped (for O_DIRECT, from the block it stopped in).
            advanced = got + n - (got + n) % ALIGN if f.direct else got + n
            stuck = stuck + 1 if advanced <= got else 0
            if stuck > RETRIES:
                got += n
                break
            got = advanced
        if got < need:
            raise ReadError(self._short_message(path, f, offset, nbytes, max(0, got - skip)))
        if f.drop_after_read:
            try:
                os.posix_fadvise(f.fd, start, length, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass  # advice only
        return buf[skip : skip + nbytes]

    @staticmethod
    def _short_message(path: Path, f: _File, offset: int, nbytes: int, got: int) -> str:
        head = f"{path}: read of {nbytes} bytes at offset {offset} came back short ({got} bytes)"
        try:
            size = os.fstat(f.fd).st_size
        except OSError:
            return f"{head}; the file is truncated"
        if size < offset + nbytes:
            return f"{head}; the file is truncated (it holds {size} bytes, the expert ends at byte {offset + nbytes})"
        return f"{head} although the file holds {size} bytes; the device returned less than asked"

    def close(self) -> None:
        with self._lock:
            for fd in [f.fd for f in self._files.values()] + self._retired:
                os.close(fd)
            self._files.clear()
            self._retired.clear()


# ---------------------------------------------------------------------- reading in parallel

DEMAND, AHEAD = 0, 1  # ReadPool priorities: a read compute waits for, a read ahead of a guess
_STOP = 2


class ReadPool:
    """Worker threads that run queued reads, demand reads before reads ahead.

    A wrong guess read ahead must not make a true miss wait in the queue behind it: a miss
    queued later still starts first. Reads already running are not interrupted (one expert's
    read takes a few ms). The worker count is the queue depth the disk sees; see
    `measure_read_bandwidth` for how deep it must be to reach the disk's bandwidth.
    """

    def __init__(self, workers: int, name: str = "expert-read"):
        if workers < 1:
            raise StepstreamError(f"read workers must be >= 1, got {workers}")
        self.workers = workers
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()  # FIFO within a priority
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, priority: int, fn: Callable, *args) -> None:
        """Queue fn(*args); it must not raise (the callers park errors in the cache's slots)."""
        self._queue.put((priority, next(self._seq), fn, args))

    def _work(self) -> None:
        while True:
            priority, _, fn, args = self._queue.get()
            if priority == _STOP:
                return
            try:
                fn(*args)
            except BaseException:  # noqa: BLE001 - a worker must outlive one failed job
                pass

    def shutdown(self) -> None:
        """Run what is queued, then stop the workers."""
        for _ in self._threads:
            self._queue.put((_STOP, next(self._seq), None, ()))
        for t in self._threads:
            t.join()


@dataclass(frozen=True)
class DiskPoint:
    depth: int  # reads in flight
    gb_s: float  # bytes / wall seconds / 1e9
    reads: int


def depths_that_fit(size: int, block: int, depths: tuple[int, ...] = (1, 2, 4, 8, 16),
                    reads_per_depth: int | None = None) -> tuple[int, ...]:
    """The leading `depths` whose reads measure_read_bandwidth can take from a file of `size`
    bytes without reading an offset twice."""
    out, need = [], 0
    for d in depths:
        need += reads_per_depth or max(16, 4 * d)
        if need > size // block:
            break
        out.append(d)
    return tuple(out)


def measure_read_bandwidth(path: str | os.PathLike, depths: tuple[int, ...] = (1, 2, 4, 8, 16),
                           block: int = 8 * 2**20, reads_per_depth: int | None = None,
                           seed: int = 0) -> list[DiskPoint]:
    """The disk's read bandwidth against queue depth: `depth` threads each reading `block`-byte
    O_DIRECT spans of `path` at distinct random aligned offsets, no offset read twice, after
    dropping the file from the page cache. One point per depth."""
    size = os.path.getsize(path)
    n_blocks = size // block
    per = [reads_per_depth or max(16, 4 * d) for d in depths]
    if n_blocks < sum(per):
        raise StepstreamError(f"{path}: {size} bytes hold {n_blocks} blocks of {block}; "
                              f"measuring depths {depths} needs {sum(per)}")
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass  # advice only; O_DIRECT bypasses the page cache anyway
    order = np.random.default_rng(seed).permutation(n_blocks)
    reader = DirectReader()
    points, used = [], 0
    try:
        for depth, n in zip(depths, per):
            offsets = [int(b) * block for b in order[used : used + n]]
            used += n
            bufs = [aligned_empty(span_bytes(block)) for _ in range(depth)]
            jobs = iter(offsets)
            lock = threading.Lock()

            def work(buf):
                while True:
                    with lock:
                        off = next(jobs, None)
                    if off is None:
                        return
                    reader.read(path, off, block, buf)

            threads = [threading.Thread(target=work, args=(b,)) for b in bufs]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            points.append(DiskPoint(depth, n * block / (time.perf_counter() - t0) / 1e9, n))
    finally:
        reader.close()
    return points


def knee(points: list[DiskPoint], share: float = 0.9) -> int:
    """The smallest depth that reaches `share` of the best measured bandwidth."""
    best = max(p.gb_s for p in points)
    return min(p.depth for p in points if p.gb_s >= share * best)
