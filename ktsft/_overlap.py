"""Shared experts on the GPU while the CPU computes the routed ones.

A MoE block with shared experts (DeepSeek-V3, Qwen2-MoE) adds a small dense
MLP's output to the routed experts'.  Run one after the other, the GPU idles
while the CPU computes the routed experts, and the CPU idles while the
GPU (and the Python that launches its kernels) computes the shared ones.

Forward.  Inside ``with block() as blk:`` the experts call copies its inputs
to the host, hands the native forward to ktsft's worker thread (the native
call runs without the GIL) and returns a *placeholder* on the device; the
block then runs the shared experts (their Python and their GPU kernels)
while the CPU works.  Leaving the ``with`` joins: it waits for the worker
and queues the host-to-device copy of the result into the placeholder on
the current stream, after the shared experts' kernels and before any kernel
that reads it.  Nothing may read the placeholder inside the ``with``: the
block forwards of ``ktsft.integrations.shared_experts`` only take views of
it there (a view launches no kernel).

Backward.  The shared experts' autograd nodes are created after the routed
experts' node, so autograd runs them first: their kernels are queued before
the routed backward starts.  That backward's device-to-host copy of its
gradient would wait behind them on the stream; ``blk.watch(out)`` records an
event when the gradient of the block's output is ready, and the routed
backward copies on a side stream that waits for that event only, so the CPU
starts while the GPU still runs the shared experts' backward.  Where the
gradient the routed backward gets is not the one watched (a kernel made
it), the copy waits for the whole stream, as without overlap.

One worker thread, made on first use (and again in a forked child): the
native forward of every overlapped call runs there, so OpenMP keeps one
thread team for it.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
import time

_local = threading.local()  # .block: the Block of the running block forward, or None
_worker = {"pool": None}
_lock = threading.Lock()
#: deferral on CPU tensors too (the tests' way to run this machinery without
#: a GPU; on a CPU-only machine it gains nothing: both halves share the cores)
FORCE_CPU = False


def _reset_after_fork() -> None:
    _worker["pool"] = None  # the parent's thread does not exist in the child
    _local.__dict__.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def submit(fn):
    """Run fn() on the worker thread: a concurrent.futures.Future."""
    with _lock:
        pool = _worker["pool"]
        if pool is None:
            pool = _worker["pool"] = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="ktsft-experts")
    return pool.submit(fn)


def current(tensor):
    """The Block the experts call producing from `tensor` may defer into,
    or None (no block forward running, a nested call, or a CPU tensor)."""
    blk = getattr(_local, "block", None)
    if blk is None or blk.joined:
        return None
    if tensor.device.type == "cpu" and not FORCE_CPU:
        return None
    return blk


class Pending:
    """One deferred experts forward: ``out`` is the placeholder handed to
    autograd; ``join()`` runs ``finish`` (wait for the worker, fill ``out``)
    once, then the callbacks with the native handle."""

    __slots__ = ("out", "_finish", "_callbacks", "done", "t_submit")

    def __init__(self, out, finish):
        self.out, self._finish, self._callbacks = out, finish, []
        self.done = False
        self.t_submit = time.perf_counter()

    def then(self, fn) -> None:
        self._callbacks.append(fn)

    def join(self):
        if self.done:
            return
        self.done = True
        try:
            handle = self._finish(self.t_submit)
        finally:
            callbacks, self._callbacks = self._callbacks, []  # break ctx <-> pending cycles
        for fn in callbacks:
            fn(handle)


def joined(ctx) -> None:
    """Before an experts backward: its deferred forward done (a block that
    raised may have left it pending), or RuntimeError if that forward
    failed."""
    p = getattr(ctx, "pending", None)
    if p is None:
        return
    p.join()
    if ctx.pending is not None:  # join ran no callback: the native forward raised
        raise RuntimeError("ktsft: this experts call's forward failed; its backward cannot run")


class Block:
    """The deferred experts calls of one block forward, and the readiness
    of its output's gradient for their backward."""

    __slots__ = ("pending", "joined", "grad", "event", "__weakref__")

    def __init__(self):
        self.pending, self.joined = [], False
        self.grad = self.event = None

    def defer(self, pending: Pending) -> None:
        self.pending.append(pending)

    def join(self) -> None:
        """Fill every placeholder (the first error is raised after all have
        been waited for: the staging buffers must be free again)."""
        self.joined = True
        err = None
        for p in self.pending:
            try:
                p.join()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                err = err or e
        self.pending = []
        if err is not None:
            raise err

    def watch(self, out):
        """Record, in backward, when the gradient of `out` (the block's
        output) is ready; returns `out`."""
        if getattr(out, "requires_grad", False) and out.device.type == "cuda":
            out.register_hook(self._mark)
        return out

    def _mark(self, grad):
        import torch

        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(grad.device))
        self.grad, self.event = grad, ev
        return None

    def ready_event(self, g):
        """The event after which `g` may be read on another stream, or None
        where `g` is not (a view of) the watched gradient.  Used once."""
        grad, ev = self.grad, self.event
        self.grad = self.event = None
        if ev is None or grad is None or g.dtype != grad.dtype or g.device != grad.device:
            return None
        if g.untyped_storage().data_ptr() != grad.untyped_storage().data_ptr():
            return None
        return ev


@contextlib.contextmanager
def block():
    """The span of a block forward in which experts calls may defer; the
    exit joins them (also when the block raised)."""
    outer = getattr(_local, "block", None)
    blk = Block()
    _local.block = blk
    try:
        yield blk
    finally:
        _local.block = outer
        blk.join()


_streams: dict = {}


def copy_stream(device):
    """A side stream of `device` for the gradient copies (one per device)."""
    import torch

    s = _streams.get(device)
    if s is None:
        s = _streams[device] = torch.cuda.Stream(device)
    return s
