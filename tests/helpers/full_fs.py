"""A real file system that is full: a small tmpfs, mounted for the test and filled to the last
block, so that writes fail with ENOSPC as on a full disk (empty files and directories can still
be made). Needs root; the test is skipped where mounting is not permitted."""

from __future__ import annotations

import errno
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def full_tmpfs(mnt: Path, size: str = "64k", leave: int = 0):
    """`mnt` (made here) as a full tmpfs of `size`; with `leave` > 0, that many bytes' worth of
    blocks stay free (a write that needs more fails), else none. Unmounted at the end."""
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("mounting a tmpfs is not permitted here (needs root)")
    try:
        with open(mnt / "fill", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC
            if leave:
                f.truncate(max(0, f.tell() - leave))
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False, capture_output=True, timeout=30)
