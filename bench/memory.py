"""Resident-memory accounting: process RSS and its high-water mark, with the
mark reset before each measurement."""
from __future__ import annotations

import ctypes
import gc

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def pin_malloc() -> None:
    """Make freed large blocks go back to the OS at once.

    glibc raises its mmap threshold (up to 32 MB) each time a large block is
    freed, after which big allocations come from the heap and freed memory
    stays resident; a later measurement would then reuse that memory and
    read too low.  Setting the thresholds explicitly turns that off."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 20)


def _status(key: str) -> int:
    """A /proc/self/status field in bytes (0 where there is no procfs)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss() -> int:
    return _status("VmRSS")


def peak_rss() -> int:
    return _status("VmHWM")


def reset_peak() -> int:
    """Collect garbage, hand free heap back, reset VmHWM to the current RSS
    (Linux: write 5 to clear_refs); returns that RSS in bytes."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return rss()
