"""How busy the cores were with *other* processes while we measured.

The benchmark machine may be shared.  Every ktsft call runs a series of
OpenMP parallel regions; when other runnable threads compete for the same
cores, each region's barrier can wait a whole scheduler tick, so a shared
machine makes times swing by orders of magnitude.  We record the CPU time
other processes used during each measurement (from /proc), and can wait for
a quiet moment before measuring."""
from __future__ import annotations

import os
import time

_TICK = os.sysconf("SC_CLK_TCK")
# other processes using more than this many cores: the measurement is suspect
CONTENDED = 0.5


def _others() -> dict:
    """{pid: user + system CPU ticks so far} of every process but this one."""
    me = str(os.getpid())
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile, or no procfs
            continue
        out[pid] = int(fields[11]) + int(fields[12])  # utime, stime
    return out


class Gauge:
    """Cores' worth of CPU that other processes used between start() and
    stop().  Per process, so one that ends in between (whose time vanishes
    from /proc) is merely missed rather than making the sum negative; a
    process started in between counts in full."""

    def start(self) -> "Gauge":
        self._ticks, self._wall = _others(), time.perf_counter()
        return self

    def stop(self) -> float:
        end, wall = _others(), time.perf_counter() - self._wall
        used = sum(max(t - self._ticks.get(pid, 0), 0) for pid, t in end.items())
        return used / _TICK / max(wall, 1e-9)


def wait_for_quiet(max_wait: float, threshold: float = 0.2, window: float = 0.25) -> float:
    """Sleep in `window`-second steps until other processes use less than
    `threshold` cores, for at most `max_wait` seconds; returns the seconds
    waited.  Waiting does not make the machine ours: it only avoids starting
    a measurement in the middle of someone else's."""
    waited = 0.0
    while waited < max_wait:
        g = Gauge().start()
        time.sleep(window)
        if g.stop() < threshold:
            break
        waited += window
    return waited
