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


# the interleaved rounds of one variant (or the ratios of two) spreading by
# more than this fraction: the machine changed under the timing
SPREAD_BAR = 0.5


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def loadavg():
    """The 1-minute load average, or None where there is none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def verdict(others, loadavg_at_start, cores, rounds, reference="ktsft") -> list:
    """Reasons a timing's ratios are not to be trusted (empty: quiet enough).

    others: cores' worth of CPU other processes used during the timing
    (OtherLoad); loadavg_at_start: the 1-minute load average when the run
    began, before it added to it; rounds: {variant: [seconds per round]}
    measured interleaved, `reference` among them (the ratios are taken
    against it round by round)."""
    reasons = []
    if others is not None and others > CONTENDED:
        reasons.append(f"other processes used {others:.1f} of {cores} cores during the timing")
    if loadavg_at_start is not None and loadavg_at_start > cores:
        reasons.append(f"load average {loadavg_at_start:.1f} at the start > {cores} usable cores")
    ref = rounds.get(reference, ())
    for name, ts in rounds.items():
        if name == reference or len(ts) < 2 or len(ref) < 2:
            continue
        ratios = [b / a for a, b in zip(ref, ts)]
        spread = max(ratios) / min(ratios) - 1
        if spread > SPREAD_BAR:
            reasons.append(f"the {len(ratios)} interleaved {name}/{reference} ratios disagree "
                           f"by {spread:.0%} ({min(ratios):.1f}x-{max(ratios):.1f}x)")
    for name, ts in rounds.items():
        if len(ts) >= 2 and max(ts) / min(ts) - 1 > SPREAD_BAR:
            reasons.append(f"{name} times spread {max(ts) / min(ts) - 1:.0%} "
                           f"({1e3 * min(ts):.0f}-{1e3 * max(ts):.0f} ms)")
    return reasons
