"""Timing helpers: best-of-N for machine ceilings, torch's thread count
pinned for a measurement, and a pause between torch and ktsft phases.
(ktsft and the peers time their own forward/backward pairs: see
subject.measure and peers.measure, which report medians.)"""
from __future__ import annotations

import contextlib
import time

import torch


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
