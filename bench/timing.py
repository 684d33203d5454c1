"""How things are timed: a warm-up, then the median of repeats; and torch's
thread count pinned to the run's for the duration of a measurement."""
from __future__ import annotations

import contextlib
import statistics
import time


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of fn() over `repeats` calls after `warmup` calls.
    The median, not the best, because the cores may be shared."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def best_time(fn, repeats: int, warmup: int = 1) -> float:
    """Best wall seconds: for machine ceilings, where the best run is the
    closest estimate of what the hardware can do."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@contextlib.contextmanager
def torch_threads(n: int):
    """torch.set_num_threads(n) inside the block, the old value restored."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def settle(seconds: float = 0.05) -> None:
    """Pause between torch and ktsft phases: idle OpenMP workers of the
    previous phase spin for a while before they sleep, and on a 2-core
    machine that spinning would steal time from the next measurement."""
    time.sleep(seconds)
