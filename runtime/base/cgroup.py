"""Hard RAM caps for benchmarks and tests: a cgroup-v1 memory group, page cache included.

A process started inside the group (its pid written to cgroup.procs before it execs)
may not hold more than `limit_in_bytes` of anonymous memory plus page cache; the kernel
reclaims page cache first and kills the process only when that is not enough.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

ROOT = Path("/sys/fs/cgroup/memory")


class CgroupUnavailable(RuntimeError):
    pass


class MemoryCap:
    def __init__(self, limit_bytes: int, name: str | None = None):
        self.limit = int(limit_bytes)
        self.path = ROOT / (name or f"stepstream-{os.getpid()}-{uuid.uuid4().hex[:8]}")

    def __enter__(self) -> "MemoryCap":
        try:
            self.path.mkdir()
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
            swap = self.path / "memory.memsw.limit_in_bytes"
            if swap.exists():
                try:
                    swap.write_text(str(self.limit))
                except OSError:
                    pass
        except OSError as e:
            self._remove()
            raise CgroupUnavailable(f"cannot create a memory cgroup under {ROOT} ({e.strerror or e})") from None
        return self

    def _enter_group(self) -> None:  # runs in the child between fork and exec
        with open(self.path / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))

    def run(self, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, preexec_fn=self._enter_group, **kwargs)

    def read(self, name: str) -> int:
        return int((self.path / name).read_text().split()[0])

    @property
    def max_usage(self) -> int:
        return self.read("memory.max_usage_in_bytes")

    @property
    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def _remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass

    def __exit__(self, *exc) -> None:
        self._remove()


def drop_page_cache(path: str | os.PathLike) -> None:
    """Evict a file's pages from the page cache (POSIX_FADV_DONTNEED), so the next read hits the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
