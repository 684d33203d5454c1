"""Run a function on N local processes joined by a torch.distributed group
(gloo over a FileStore in a temporary directory: no ports to pick): for
tests, benchmarks and trying a multi-machine setup on one machine."""
from __future__ import annotations

import os
import queue as _queue
import shutil
import tempfile
import time
import traceback
from datetime import timedelta


class LocalRunError(RuntimeError):
    """One or more ranks raised, died or timed out; ``.errors`` maps rank
    to its traceback text and ``.results`` holds the ranks that returned."""

    def __init__(self, errors: dict, results: dict):
        self.errors, self.results = errors, results
        lines = [f"--- rank {r} ---\n{t}" for r, t in sorted(errors.items())]
        super().__init__(f"{len(errors)} rank(s) failed:\n" + "\n".join(lines))


def _child(rank, world, fn, args, store, backend, collective_timeout, q):
    import torch.distributed as dist

    try:
        dist.init_process_group(backend, init_method=f"file://{store}", rank=rank,
                                world_size=world,
                                timeout=timedelta(seconds=collective_timeout))
        try:
            q.put((rank, True, fn(rank, world, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:
        q.put((rank, False, traceback.format_exc()))


def run_local(fn, world_size: int, args=(), *, timeout: float = 120.0, backend: str = "gloo",
              collective_timeout: float = 60.0) -> list:
    """fn(rank, world_size, *args) on world_size spawned processes; returns
    their results in rank order.  Raises LocalRunError if any rank raised,
    died without a result, or was still running after `timeout` seconds
    (it is then killed).  `collective_timeout` is the process group's: a
    collective whose peers never arrive fails after it."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # fork after OpenMP ran would hang the children's kernels
    tmp = tempfile.mkdtemp(prefix="ktsft-dist-")
    q = ctx.Queue()
    procs = [ctx.Process(target=_child, daemon=True,
                         args=(r, world_size, fn, tuple(args), os.path.join(tmp, "store"),
                               backend, collective_timeout, q))
             for r in range(world_size)]
    results, errors = {}, {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < world_size:
            try:
                rank, ok, val = q.get(timeout=0.2)
                (results if ok else errors)[rank] = val
                continue
            except _queue.Empty:
                pass
            for r, p in enumerate(procs):  # died without reporting (segfault, kill)
                if r not in results and r not in errors and p.exitcode not in (None, 0):
                    try:  # its message may still be in flight
                        rank, ok, val = q.get(timeout=1.0)
                        (results if ok else errors)[rank] = val
                    except _queue.Empty:
                        errors[r] = f"exited with code {p.exitcode} without a result"
            if time.monotonic() > deadline:
                for r in range(world_size):
                    if r not in results and r not in errors:
                        errors[r] = f"still running after {timeout:g} s: killed"
                break
    finally:
        for p in procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(tmp, ignore_errors=True)
    if errors:
        raise LocalRunError(errors, results)
    return [results[r] for r in range(world_size)]
