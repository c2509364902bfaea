"""Facts about the machine this process runs on, and the process-wide settings taken from them.

Memory: current and peak RSS, and the memory a model may use now: the tightest of the
host's, the cgroup's and RLIMIT_AS (runtime.base.memory_limit). Threads: the compute thread
count of the libraries that do the arithmetic, and OpenMP's wait policy.

`ru_maxrss` is not usable for a command's own peak: Linux keeps it across execve, so a
process started by a large parent reports the parent's high-water mark. The kernel's
per-address-space high-water mark (VmHWM in /proc/self/status) starts fresh at exec and
can be reset by writing 5 to /proc/self/clear_refs, which lets a phase measure its own peak.

numpy's bundled OpenBLAS (matrix products on float weights) and Numba (the quantized
kernels) each keep their own thread pool. Their sizes are process-wide state, set once when
a model is loaded, like llama.cpp's `n_threads`.

Freed memory: a prefill chunk allocates its temporaries (activations, each expert's hidden
vectors: 88 MB over the large miniature's 128-token prefill) and frees them. glibc gives
blocks over its mmap threshold back to the kernel at once, and trims the heap's top, so the
next chunk faults every page in again: 22,500 page faults and 40-60 ms of kernel time in a
200-ms prefill. keep_freed_memory makes glibc keep freed blocks up to 32 MiB in the heap
(llama.cpp allocates its compute buffers once). The peak RSS is the same; the RSS after a
prefill stays at that peak instead of falling back.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from pathlib import Path

import numpy as np
import psutil

from runtime.base.memory_limit import MemoryLimit, process_limits, tightest

try:
    import resource  # POSIX only: Windows has none
except ImportError:
    resource = None

RESERVE_FRACTION = 0.10  # of total memory, at least RESERVE_MIN, left for the OS and activations
RESERVE_MIN = 1 * 2**30


# ---------------------------------------------------------------- memory

def current_rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if resource is None:
        info = psutil.Process().memory_info()
        return getattr(info, "peak_wset", info.rss)  # Windows keeps the peak working set
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Make the peak equal the current RSS (Linux); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


MEMORY_FILESYSTEMS = ("tmpfs", "ramfs", "hugetlbfs")  # a file there is memory already


def filesystem_type(path, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The type of the file system `path` lives on (the longest mount point above it in
    /proc/self/mountinfo), or None where that cannot be read (not Linux)."""
    try:
        text = Path(mountinfo).read_text()
    except OSError:
        return None
    real = os.path.realpath(path)
    best, kind = -1, None
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, after = left.split(), right.split()
        if len(fields) < 5 or not after:
            continue
        point = fields[4].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) > best:
            best, kind = len(point), after[0]
    return kind


def in_memory_file(path) -> bool:
    """Whether the file's pages are memory already (tmpfs, ramfs): mapping it takes no more."""
    return filesystem_type(path) in MEMORY_FILESYSTEMS


def memory_limits() -> list[MemoryLimit]:
    """Each limit on the memory this process may still take: the host's, its cgroups', RLIMIT_AS."""
    return process_limits(RESERVE_FRACTION, RESERVE_MIN)


def memory_limit() -> MemoryLimit:
    """The limit that binds now: the one leaving the least."""
    return tightest(memory_limits())


def usable_memory() -> int:
    """Bytes a model may take now under the tightest limit (the host's memory less a reserve for
    the OS, the cgroup's limit less its usage, or RLIMIT_AS less the mapped address space)."""
    return memory_limit().free


# ---------------------------------------------------------------- freed memory

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP_BLOCKS = 32 * 2**20  # the largest mmap threshold glibc accepts on 64-bit hosts
KEEP_TOP = 1 << 30  # free heap top kept rather than trimmed


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse (see the module's note): blocks up to
    KEEP_BLOCKS come from the heap, and up to KEEP_TOP of free heap top is kept. Whether it
    took effect (False off glibc, or if mallopt refused)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, KEEP_BLOCKS)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_TOP))


# ---------------------------------------------------------------- threads

def _openblas():
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*"))
    for path in libs:
        lib = ctypes.CDLL(path)
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                setter = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                getter = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                if setter is not None and getter is not None:
                    return setter, getter
    return None


def set_blas_threads(n: int) -> None:
    """OpenBLAS's thread count alone."""
    blas = _openblas()
    if blas is not None:
        blas[0](ctypes.c_int(n))


def threads_for(n: int) -> int:
    """The compute threads Numba runs when asked for n: at most its pool's size."""
    import numba

    return max(1, min(n, numba.config.NUMBA_NUM_THREADS))


def set_threads(n: int) -> int:
    """Ask for n compute threads (on the calling thread: Numba's count is per thread); returns
    the number Numba will use."""
    set_blas_threads(n)
    import numba

    used = threads_for(n)
    numba.set_num_threads(used)
    return used


def idle_cores(seconds: float = 0.2) -> float:
    """Cores of this process's affinity that no process used, over the next `seconds` (this
    process's own use included): 0.0 when every core is busy."""
    try:
        mine = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        mine = None
    per_cpu = psutil.cpu_percent(interval=seconds, percpu=True)
    used = [per_cpu[c] for c in mine if c < len(per_cpu)] if mine else per_cpu
    return sum(100.0 - p for p in used) / 100.0


def choose_wait_policy(threads: int | None) -> None:
    """Pick OpenMP's wait policy unless the user set one.

    The kernels run a few dozen short OpenMP regions per token. When our threads have the
    cores to themselves, libgomp's default (spin briefly, then sleep) is fastest: measured
    here, 150 tok/s decode against 80 with passive waits. When other processes keep the
    cores busy, spinning threads steal each other's time slices and decode collapses (2 tok/s
    against 21 passive), so a busy machine gets passive waits. "Busy" is measured now, over
    0.2 s of CPU time, not from the load average, which still counts a run that just ended.
    libgomp reads the variable once, when Numba first starts its thread pool, after this.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return
    cpus = os.cpu_count() or 1
    busy = psutil.cpu_percent(interval=0.2) / 100.0 * cpus  # cores other processes are using
    if busy + (threads or cpus) > cpus + 0.5:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
