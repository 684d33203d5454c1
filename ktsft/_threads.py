"""The thread count a native call really runs on: the one door every OpenMP
region ktsft enters goes through (the layer's kernels and conversions,
CPUAdamW).

Two facts of GNU OpenMP shape it:

- A child forked after its parent ran a parallel region hangs in its next
  one: such a child runs on one thread, with a warning (multiprocessing's
  'spawn' start method gives parallel workers).
- It exits the process ("Thread creation failed") when it cannot create a
  team's threads, e.g. under an address-space limit (``ulimit -v``) or a
  process limit.  Before a region would grow the calling thread's team, the
  missing threads are created and joined here first (same stack size as
  libgomp's); when that fails, a RuntimeError names the thread setting
  before any native work ran.

The team: a region of n > 1 threads leaves n - 1 workers with the calling
thread; a later region of fewer (> 1) releases the rest; a serial one keeps
them.  So the probe runs only when a call asks for more threads than the
calling thread's last parallel region had: once per thread and setting in a
training loop.
"""
from __future__ import annotations

import os
import re
import threading
import warnings

from ._kernels.moe_sft import probe_threads

MAX_THREADS = 4096   # libgomp cannot create (and crashes on) absurd thread counts

_fork = {"parent_ran_parallel": False, "child": False, "warned": False}
_team = threading.local()  # .size: the team libgomp keeps for this thread


def _stack_bytes(env=os.environ) -> int:
    """The stack libgomp gives its threads: OMP_STACKSIZE / GOMP_STACKSIZE
    (a number, unit B, K (default), M or G), else 0 (the pthread default)."""
    for name in ("OMP_STACKSIZE", "GOMP_STACKSIZE"):
        m = re.fullmatch(r"\s*(\d+)\s*([bBkKmMgG]?)\s*", env.get(name, ""))
        if m:
            unit = {"b": 1, "": 1024, "k": 1024, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
            return int(m.group(1)) * unit
    return 0


_STACK = _stack_bytes()  # libgomp reads it once, when it is loaded


def default_threads() -> int:
    """OMP_NUM_THREADS when set, else the cores this process may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def effective_threads(requested: int, name: str = "cpuinfer_threads") -> int:
    """The OpenMP thread count a call uses for `requested` (the setting
    called `name`); raises RuntimeError, before any native work, when the
    threads cannot be created."""
    if _fork["child"] and _fork["parent_ran_parallel"]:
        if requested > 1 and not _fork["warned"]:
            warnings.warn("ktsft: this process was forked after OpenMP ran in its parent; "
                          "kernels run on 1 thread here (use the 'spawn' start method for "
                          "parallel workers)", RuntimeWarning, stacklevel=3)
            _fork["warned"] = True
        return 1
    if requested > 1:
        have = getattr(_team, "size", 1)
        if requested > have:
            err = probe_threads(requested - have, _STACK)
            if err:
                raise RuntimeError(
                    f"{name}={requested}: the OpenMP runtime cannot create "
                    f"{requested - have} more threads ({os.strerror(err)}); the process's "
                    "address-space or thread limit (ulimit -v / -u, a container's pids limit) "
                    f"is too low for that many. Lower {name}, or raise the limit")
        _team.size = requested
        _fork["parent_ran_parallel"] = True
    return requested


def _after_fork_in_child() -> None:
    global _team
    _fork["child"] = True
    _team = threading.local()  # the child has no OpenMP workers


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
