"""Hard RAM caps for benchmarks and tests: a cgroup-v1 memory group, page cache included.

A process started inside the group (its pid written to cgroup.procs before it execs)
may not hold more than `limit_in_bytes` of anonymous memory plus page cache; the kernel
reclaims page cache first and kills the process only when that is not enough.

A group is removed when its `with` block ends, however it ends: a process still in it (the
child after Ctrl-C or a timeout, anything it started) is killed and waited for first, since the
kernel refuses to remove a group that holds a process. A group a killed process (SIGKILL) left
behind is named after that process, `stepstream-PID-...`, and remove_stale_groups removes it.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path("/sys/fs/cgroup/memory")
PREFIX = "stepstream-"
REMOVE_SECONDS = 10.0  # how long a group's last processes get to exit before it is given up on


class CgroupUnavailable(RuntimeError):
    pass


class MemoryCap:
    def __init__(self, limit_bytes: int, name: str | None = None):
        self.limit = int(limit_bytes)
        self.path = ROOT / (name or f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")

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
        """subprocess.run inside the group (see run_process)."""
        return run_process(cmd, preexec_fn=self._enter_group, **kwargs)

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

    def members(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def _remove(self, deadline: float = REMOVE_SECONDS) -> bool:
        """Kill what is left in the group and remove it; False if it is still there after `deadline` s."""
        end = time.monotonic() + deadline
        while True:
            for pid in self.members():
                _kill(pid)
            try:
                self.path.rmdir()
                return True
            except FileNotFoundError:
                return True
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > end:
                    return False
            time.sleep(0.02)  # a killed process leaves its group only once the kernel has torn it down

    def __exit__(self, *exc) -> None:
        if not self._remove():
            print(f"stepstream: could not remove the memory cgroup {self.path} (processes {self.members()} are still "
                  "in it); the next `bench --sweep-ram` removes it once they are gone", file=sys.stderr, flush=True)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:  # gone already
        pass


def run_process(cmd: list[str], *, input=None, timeout: float | None = None, capture_output: bool = False,
                **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run, except that the child never outlives the call: when the call ends by an
    exception (a timeout, Ctrl-C, SIGTERM), the child is killed and waited for before the exception
    goes on. subprocess.run kills it but, on Ctrl-C, returns without waiting, so a memory group
    removed next still holds it and the removal fails."""
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    with subprocess.Popen(cmd, **kwargs) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except BaseException:
            _end(proc)
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _end(proc: subprocess.Popen) -> None:
    """Kill and reap `proc`; a second Ctrl-C while it dies does not leave it unreaped."""
    proc.kill()
    while True:
        try:
            proc.wait()
            return
        except KeyboardInterrupt:
            continue


def remove_stale_groups() -> list[str]:
    """Remove the `stepstream-PID-*` groups whose process PID is gone (killed before its groups'
    `with` blocks ended) and that hold no process; the names of those removed."""
    removed = []
    try:
        entries = list(ROOT.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = re.fullmatch(re.escape(PREFIX) + r"(\d+)-[0-9a-f]+", p.name)
        if m is None or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        try:
            p.rmdir()
            removed.append(p.name)
        except OSError:  # a process is still in it, or another sweep removed it first
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def drop_page_cache(path: str | os.PathLike) -> None:
    """Evict a file's pages from the page cache (POSIX_FADV_DONTNEED), so the next read hits the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
