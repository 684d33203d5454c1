"""Where a training step's time goes on the ktsft side: a profiler that the
experts' forward and backward report to while it is active.

    from ktsft.profile import StepProfile
    with StepProfile() as prof:
        loss = model(**batch).loss
        loss.backward()
    print(prof.seconds)   # {"kernel_fwd": ..., "kernel_bwd": ..., "gpu_wait": ..., ...}

Categories (seconds, summed over every experts layer of the block):

- ``kernel_fwd`` / ``kernel_bwd``: inside the native forward_sft / backward;
- ``gpu_wait``: waiting for GPU work queued before the experts call (the
  attention and router of the layer: the GPU's own compute, not a transfer);
  only measured here, where a synchronisation is added to split it off;
- ``d2h`` / ``h2d``: the copies through the staging buffers and their
  synchronisation;
- ``staging``: other host work of the experts call (LoRA staging of the
  PEFT path, gradient bookkeeping);
- ``join_wait``: a block forward with shared experts waiting for its routed
  experts' native forward, which ran on the worker thread (ktsft/_overlap.py);
- ``overlap``: the part of those native forwards during which the block's
  own thread did other work (the shared experts' Python and GPU launches):
  time counted in ``kernel_fwd`` that the step did not wait for.  Not
  additive: the step's wall time is the sum of the others minus this one.

Off (no profiler active) the hooks cost one global read per call.  One
profiler at a time per process; the worker thread reports into it too.
"""
from __future__ import annotations

import threading
import time

_ACTIVE = None

CATEGORIES = ("kernel_fwd", "kernel_bwd", "gpu_wait", "d2h", "h2d", "staging", "join_wait",
              "overlap")


def active():
    """The running StepProfile, or None."""
    return _ACTIVE


class StepProfile:
    def __init__(self):
        self.seconds = {k: 0.0 for k in CATEGORIES}
        self.calls = {k: 0 for k in CATEGORIES}
        self._lock = threading.Lock()  # the worker thread adds too

    def add(self, key: str, seconds: float) -> None:
        with self._lock:
            self.seconds[key] += seconds
            self.calls[key] += 1

    def timer(self, key: str):
        return _Timer(self, key)

    def __enter__(self):
        global _ACTIVE
        if _ACTIVE is not None:
            raise RuntimeError("a StepProfile is already active")
        _ACTIVE = self
        return self

    def __exit__(self, *exc):
        global _ACTIVE
        _ACTIVE = None
        return False


class _Timer:
    __slots__ = ("prof", "key", "t0")

    def __init__(self, prof, key):
        self.prof, self.key = prof, key

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.prof.add(self.key, time.perf_counter() - self.t0)
        return False


class _Null:
    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


NULL = _Null()


def timer(key: str):
    """A context that adds its duration to `key` of the active profiler
    (a no-op without one)."""
    p = _ACTIVE
    return NULL if p is None else _Timer(p, key)
