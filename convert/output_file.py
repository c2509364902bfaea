"""The converter's output file: written under a temporary name, published by an atomic rename.

A conversion writes `.NAME.PID.part` next to the output and gives it the final name only when
it is complete and synced, so an interrupted conversion (Ctrl-C, SIGTERM, SIGKILL, power loss)
never leaves a partial file under the final name. Without `force` the publish is a hard link,
which fails rather than replaces when the output appeared meanwhile. A `.part` left by a process
killed with SIGKILL is removed by the next conversion to the same output, once that process is
gone, unless that conversion continues it (--resume, convert.resume).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from runtime.base.errors import StepstreamError


def part_name(out: Path, pid: int | None = None) -> Path:
    """Where the conversion by process `pid` (this one by default) writes before the rename."""
    return out.with_name(f".{out.name}.{os.getpid() if pid is None else pid}.part")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


_SUFFIXES = (".part", ".part.json", ".part.json.tmp")  # the data, its progress record, a record being replaced


def _dead(out: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if os.name != "posix":  # os.kill(pid, 0) is a liveness probe only on POSIX; on Windows it terminates
        return []
    prefix = f".{out.name}."
    try:
        candidates = sorted(out.parent.iterdir())
    except OSError:
        return []
    found = []
    for p in candidates:
        for suffix in suffixes:
            pid = p.name[len(prefix):-len(suffix)] if p.name.startswith(prefix) and p.name.endswith(suffix) else ""
            if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                found.append(p)
                break
    return found


def live_conversion(out: Path) -> int | None:
    """The PID of another process writing `out` now (its `.part` exists and it is alive), or None."""
    if os.name != "posix":
        return None
    prefix, suffix = f".{out.name}.", ".part"
    try:
        names = [p.name for p in out.parent.iterdir()]
    except OSError:
        return None
    for name in names:
        pid = name[len(prefix):-len(suffix)] if name.startswith(prefix) and name.endswith(suffix) else ""
        if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)) and _holds(int(pid), out.parent / name):
            return int(pid)
    return None


def _holds(pid: int, part: Path) -> bool:
    """Whether process `pid` has `part` open (Linux's /proc; elsewhere, or when /proc cannot be
    read, being alive counts): a PID reused by another program after a killed conversion does not."""
    fds = Path(f"/proc/{pid}/fd")
    try:
        links = [os.readlink(fd) for fd in fds.iterdir()]
    except OSError:
        return not fds.parent.is_dir() or not Path("/proc/self/fd").is_dir()
    want = os.path.realpath(part)
    return any(link == want for link in links)


def dead_parts(out: Path) -> list[Path]:
    """`.part` files of earlier conversions to `out` whose process is gone (killed with SIGKILL,
    or interrupted while keeping its work for --resume)."""
    return _dead(out, (".part",))


def remove_stale_parts(out: Path) -> None:
    """Remove the `.part` files, and progress records, of dead conversions to `out`."""
    for p in _dead(out, _SUFFIXES):
        p.unlink(missing_ok=True)


_SPECIAL = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
            (stat.S_ISSOCK, "a socket"))


def check_output(out: Path, force: bool, hf_dir: Path | None = None, what: str = "output") -> None:
    """Refuse an output that is a directory, that exists (unless `force`), or that is one of the
    checkpoint's own files (even with `force`: it is read while the output is written, and
    replacing it loses the checkpoint). A previous .gguf in the checkpoint's directory may be
    replaced with `force`. A device, FIFO or socket is refused even with `force`: the output is
    published by a rename, which would put a regular file in its place (as root, /dev/null)."""
    if out.is_dir():
        raise StepstreamError(f"{out}: is a directory; give the {what} file path")
    try:
        mode = os.stat(out).st_mode
    except OSError:
        mode = None
    kind = next((name for test, name in _SPECIAL if mode is not None and test(mode)), None)
    if kind is not None:
        raise StepstreamError(f"{out}: is {kind}; the {what} must be a regular file (it is written under a temporary "
                              f"name and renamed into place, which would replace {kind}), even with --force")
    if hf_dir is not None:
        source = input_file(out, hf_dir)
        if source is not None:
            raise StepstreamError(f"{out}: is the checkpoint's own {source.name}; the {what} must go to another "
                                  f"file (not replaced, even with --force)")
    if os.path.lexists(out) and not force:
        raise StepstreamError(f"{out}: already exists; it is replaced only with --force")
    if what == "output":
        pid = live_conversion(out)
        if pid is not None:
            raise StepstreamError(f"{out}: another conversion (process {pid}) is writing it now; wait for it to "
                                  f"finish, or stop it first")


def input_file(path: Path, hf_dir: Path) -> Path | None:
    """The checkpoint file (any file of `hf_dir` but a .gguf, through symlinks and hard links)
    that `path` is, or None."""
    if not os.path.lexists(path):
        return None
    try:
        entries = list(hf_dir.iterdir())
    except OSError:
        return None
    for p in entries:
        if p.name.endswith(".gguf"):
            continue
        try:
            if p.is_file() and os.path.samefile(p, path):
                return p
        except OSError:
            continue
    return None


def open_part(out: Path):
    try:
        return open(part_name(out), "wb")
    except OSError as e:
        raise StepstreamError(f"{out}: cannot write the output ({e.strerror})") from None


def publish(tmp: Path, out: Path, force: bool) -> None:
    """Give the finished file its final name: atomically, and without replacing a file unless forced."""
    if force:
        os.replace(tmp, out)
    else:
        try:
            os.link(tmp, out)  # fails, rather than replaces, if `out` appeared meanwhile
        except FileExistsError:
            raise StepstreamError(f"{out}: appeared while converting; not overwritten (use --force)") from None
        except OSError:  # no hard links on this file system
            if os.path.lexists(out):
                raise StepstreamError(f"{out}: appeared while converting; not overwritten (use --force)") from None
            os.replace(tmp, out)
        tmp.unlink(missing_ok=True)
    try:  # the rename itself survives a crash of the machine
        fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
