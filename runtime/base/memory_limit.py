"""How much more memory this process may take, and which limit says so.

Three limits can bind, and the smallest decides:

- the host's available memory (psutil), less a reserve for the OS;
- the memory cgroup the process runs in (Docker, systemd slices, Kubernetes, SLURM):
  its limit less what the group already uses, at every level from the process's own
  group up to the mount point, since a parent's limit covers its children's usage.
  cgroup v1 reads memory.limit_in_bytes and memory.usage_in_bytes, v2 memory.max and
  memory.current. The group's inactive file pages (memory.stat) are left out of its
  usage, as the kubelet's "working set" does: they are page cache the kernel reclaims
  first, often a file someone copied in, not memory anyone holds;
- RLIMIT_AS, less the address space already mapped.

psutil alone reports the host, so under a cap it would say that a model fits, the kernel
would then evict its mapped pages over and over, and decoding would crawl.

Every reader takes the filesystem root as an argument, so tests run them on fake trees.
A file that is missing or unreadable means "no limit there", never an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1
# Address space a process takes beyond its resident memory, which RLIMIT_AS counts too: glibc
# reserves 64 MiB per thread that allocates (compute, reader and BLAS threads), each thread's
# stack, the BLAS library's buffers and the JIT's code sections. Without it a budget that left
# the address space to the RSS made OpenBLAS's thread start spin on failing mmaps, or LLVM abort
# ("Unable to allocate section memory"), under `ulimit -v`.
AS_RESERVE = 1 * 2**30


@dataclass(frozen=True)
class MemoryLimit:
    kind: str  # "available memory", "cgroup v1", "cgroup v2", "RLIMIT_AS", or "--ram" (a machine `plan` is told of)
    free: int  # bytes this process may still take under this limit
    limit: int  # the limit itself (for available memory: the host's total)
    used: int  # what already counts against it
    where: str = ""  # the cgroup's path in its hierarchy
    reserve: int = 0  # kept back from `free` already, for the OS and the runtime's own memory

    def text(self) -> str:
        if self.kind.startswith("cgroup"):
            return f"{self.kind} limit {self.where}: {size_text(self.limit)}, {size_text(self.used)} used"
        if self.kind == "RLIMIT_AS":
            return (f"RLIMIT_AS {size_text(self.limit)}, {size_text(self.used)} of address space mapped, "
                    f"{size_text(self.reserve)} kept for threads and libraries")
        if self.kind == "--ram":
            return (f"machine of --ram {size_text(self.limit)}, less {size_text(self.reserve)} kept for the OS and the "
                    "runtime (10% of it, at least 1 GiB)")
        free = size_text(self.limit - self.used)
        return (f"available memory {free} of {size_text(self.limit)}, less {size_text(self.reserve)} kept for the OS "
                f"and the runtime")


def size_text(n: int) -> str:
    """A size for people: GiB from 10 GiB, MiB with a decimal below 10 MiB."""
    if n >= 10 * 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.1f} MiB" if abs(n) < 10 * 2**20 else f"{n / 2**20:.0f} MiB"


def tightest(limits: list[MemoryLimit]) -> MemoryLimit:
    return min(limits, key=lambda lim: lim.free)


# ---------------------------------------------------------------- /proc parsing

def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/<pid>/cgroup -> {"v1": path of the memory controller's group, "v2": unified path}."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier, controllers, path = parts
        if hier == "0" and controllers == "":
            out["v2"] = path
        elif "memory" in controllers.split(","):
            out["v1"] = path
    return out


@dataclass(frozen=True)
class Mount:
    root: str  # the path, inside the hierarchy, of the directory mounted here
    point: str
    version: str  # "v1" (a hierarchy with the memory controller) or "v2"


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1 : i + 4]) == 3 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup mounts in /proc/<pid>/mountinfo: v1 hierarchies with the memory controller, and v2."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        fstype, options = tail[0], tail[2].split(",")
        if fstype == "cgroup2":
            mounts.append(Mount(_unescape(fields[3]), _unescape(fields[4]), "v2"))
        elif fstype == "cgroup" and "memory" in options:
            mounts.append(Mount(_unescape(fields[3]), _unescape(fields[4]), "v1"))
    return mounts


def group_dirs(group: str, mount: Mount, root: Path) -> list[tuple[Path, str]]:
    """The directories of `group` and of each ancestor visible under the mount, own group first,
    each with its path in the hierarchy. A group outside the mounted subtree (a cgroup namespace
    shows "/" for the namespace's root) is read at the mount point alone."""
    base = root / mount.point.lstrip("/")
    mroot = mount.root.rstrip("/")
    inside = group == (mroot or "/") or group.startswith(mroot + "/")
    rel = [p for p in group[len(mroot):].split("/") if p] if inside else []
    return [(base.joinpath(*rel[:n]), "/".join([mroot, *rel[:n]]) or "/") for n in range(len(rel), -1, -1)]


# ---------------------------------------------------------------- reading the groups

def _read_int(path: Path) -> int | None:
    """An integer file; None when missing, unreadable, or "max" (v2's no-limit)."""
    try:
        text = path.read_text().split()
    except OSError:
        return None
    if not text or text[0] == "max":
        return None
    try:
        return int(text[0])
    except ValueError:
        return None


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
    except (OSError, ValueError):
        pass
    return 0


_FILES = {"v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
          "v2": ("memory.max", "memory.current", "inactive_file")}


def cgroup_limits(proc_self: Path, root: Path) -> list[MemoryLimit]:
    """Every memory limit set on this process's cgroups, v1 and v2, at every visible level."""
    try:
        groups = parse_proc_cgroup((proc_self / "cgroup").read_text())
        mounts = parse_mountinfo((proc_self / "mountinfo").read_text())
    except OSError:
        return []
    out = []
    for mount in mounts:
        if mount.version not in groups:
            continue
        limit_file, usage_file, inactive_key = _FILES[mount.version]
        for d, where in group_dirs(groups[mount.version], mount, root):
            limit, usage = _read_int(d / limit_file), _read_int(d / usage_file)
            if limit is None or usage is None or limit >= UNLIMITED:
                continue
            used = max(0, usage - _stat(d / "memory.stat", inactive_key))
            out.append(MemoryLimit(f"cgroup {mount.version}", max(0, limit - used), limit, used, where))
    return out


def rlimit_as(proc_self: Path) -> list[MemoryLimit]:
    """RLIMIT_AS less the address space mapped now (VmSize); none where unlimited or unknown."""
    try:
        import resource  # not on Windows
    except ImportError:
        return []
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft < 0:
        return []
    used = _vm_size(proc_self)
    return [MemoryLimit("RLIMIT_AS", max(0, soft - used - AS_RESERVE), soft, used, reserve=AS_RESERVE)]


def _vm_size(proc_self: Path) -> int:
    try:
        for line in (proc_self / "status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    import psutil

    return psutil.Process().memory_info().vms


def host_available(reserve_fraction: float, reserve_min: int) -> MemoryLimit:
    import psutil

    vm = psutil.virtual_memory()
    reserve = max(reserve_min, int(vm.total * reserve_fraction))
    return MemoryLimit("available memory", max(0, vm.available - reserve), vm.total, vm.total - vm.available,
                       reserve=reserve)


def process_limits(reserve_fraction: float, reserve_min: int, proc_self: str | os.PathLike = "/proc/self",
                   root: str | os.PathLike = "/") -> list[MemoryLimit]:
    proc_self, root = Path(proc_self), Path(root)
    return [host_available(reserve_fraction, reserve_min), *cgroup_limits(proc_self, root), *rlimit_as(proc_self)]
