"""How busy the cores were with *other* processes while we measured.

The benchmark machine may be shared.  Every ktsft call runs a series of
OpenMP parallel regions; when other runnable threads compete for the same
cores, each region's barrier can wait a whole scheduler tick, so a shared
machine makes times swing by orders of magnitude.  We record the CPU time
other processes used during each measurement (from /proc), and can wait for
a quiet moment before measuring."""
from __future__ import annotations

import time

from ktsft._contention import CONTENDED, OtherLoad  # noqa: F401 (CONTENDED: bench.report)


class Gauge(OtherLoad):
    """ktsft._contention.OtherLoad, reading 0.0 where it cannot measure
    (no procfs): bench records a number per measurement."""

    def stop(self) -> float:
        used = super().stop()
        return 0.0 if used is None else used


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
