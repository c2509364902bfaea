"""Resident-memory figures of this process: current and peak RSS.

`ru_maxrss` is not usable for a command's own peak: Linux keeps it across execve, so a
process started by a large parent reports the parent's high-water mark. The kernel's
per-address-space high-water mark (VmHWM in /proc/self/status) starts fresh at exec and
can be reset by writing 5 to /proc/self/clear_refs, which lets a phase measure its own peak.
"""

from __future__ import annotations

import resource
import sys

import psutil


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
