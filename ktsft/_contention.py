"""How busy the machine is while something is timed: the CPU other
processes use (Linux /proc), one definition for the CLI and bench/."""
from __future__ import annotations

import os
import time

# other processes using more than this many cores' worth of CPU during a
# timing: the measurement is suspect
CONTENDED = 0.5


def other_cpu_ticks():
    """{pid: user + system CPU ticks so far} of every process but this one,
    or None where there is no procfs."""
    if not os.path.isdir("/proc/self"):
        return None
    me, out = str(os.getpid()), {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        out[pid] = int(fields[11]) + int(fields[12])  # utime, stime
    return out


class OtherLoad:
    """Cores' worth of CPU that other processes used between start() and
    stop(); None where it cannot be measured.  Per process, so one that ends
    in between (whose time vanishes from /proc) is merely missed rather than
    making the sum negative; a process started in between counts in full."""

    def start(self):
        self._ticks, self._t0 = other_cpu_ticks(), time.perf_counter()
        return self

    def stop(self):
        end, wall = other_cpu_ticks(), time.perf_counter() - self._t0
        if self._ticks is None or end is None:
            return None
        used = sum(max(t - self._ticks.get(pid, 0), 0) for pid, t in end.items())
        return used / os.sysconf("SC_CLK_TCK") / max(wall, 1e-9)
