"""NUMA pools for ``threadpool_count > 1``: which CPUs each of a layer's
thread pools runs on, which experts each owns, and where their weights'
pages are (docs/dispatch.md, "NUMA pools").

- The topology: the NUMA nodes of /sys/devices/system/node and the CPUs of
  each this process may run on.  ``KTSFT_NUMA_NODES`` overrides it with a
  model, CPU lists separated by ';' (e.g. ``0-7;8-15`` is two nodes of 8):
  to try a multi-socket layout on a one-node machine, or where /sys does not
  show the nodes.
- The pools (``pool_cpus``): threadpool_count groups of those CPUs along
  node boundaries, one node each when the counts are equal.
- The experts (``slot_pools``): contiguous ranges of physical slots, the
  same size within one; a pool's threads run its experts' tasks first and
  then help the others, so the work of a step stays balanced.
- The weights: storage ktsft fills (a checkpoint, a conversion, a
  quantization) is first touched by the loading thread pinned to the
  slot's pool, so Linux puts its pages on that pool's node; arrays used in
  place are the caller's and are migrated with move_pages(2), best effort
  (``place``).  ``page_nodes`` says where a buffer's pages are.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import re

import numpy as np

SYS_NODE = "/sys/devices/system/node"
ENV = "KTSFT_NUMA_NODES"
CPU_SETSIZE = 1024          # glibc's cpu_set_t: the native pinning's limit
_SYS_MOVE_PAGES = {"x86_64": 279, "aarch64": 239}.get(os.uname().machine)
_MPOL_MF_MOVE = 1 << 1


def parse_cpulist(text: str, what: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11] (the kernel's cpulist format)."""
    cpus = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"{what}: {text!r} is not a CPU list such as '0-7,16-23'")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        cpus.update(range(lo, hi + 1))
    return sorted(cpus)


def _allowed() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def system_nodes(root: str = SYS_NODE) -> dict[int, list[int]]:
    """{node: its CPUs} as the kernel lists them (empty where /sys has none)."""
    return {n: list(cpus) for n, cpus in _read_nodes(root)}


@functools.lru_cache(maxsize=None)
def _read_nodes(root: str) -> tuple:
    """/sys read once per process (every layer's Pools asks)."""
    nodes = {}
    try:
        names = os.listdir(root)
    except OSError:
        return nodes
    for name in names:
        m = re.fullmatch(r"node(\d+)", name)
        if m is None:
            continue
        try:
            with open(os.path.join(root, name, "cpulist")) as f:
                nodes[int(m.group(1))] = parse_cpulist(f.read(), os.path.join(root, name))
        except OSError:
            continue
    return tuple((n, tuple(cpus)) for n, cpus in sorted(nodes.items()))


def topology(env=os.environ, root: str = SYS_NODE, allowed=None) -> list[list[int]]:
    """The nodes' CPUs this process may run on, one list per node with any
    (KTSFT_NUMA_NODES when set; one node of every allowed CPU when /sys
    shows none)."""
    allowed = _allowed() if allowed is None else set(allowed)
    model = env.get(ENV, "").strip()
    if model:
        nodes = [parse_cpulist(t, ENV) for t in model.split(";") if t.strip()]
        if not nodes:
            raise ValueError(f"{ENV}={model!r}: no node (CPU lists separated by ';')")
        seen = set()
        for cpus in nodes:
            if seen & set(cpus):
                raise ValueError(f"{ENV}={model!r}: CPU {min(seen & set(cpus))} is in two nodes")
            seen |= set(cpus)
    else:
        nodes = list(system_nodes(root).values())
    nodes = [[c for c in cpus if c in allowed] for cpus in nodes]
    nodes = [cpus for cpus in nodes if cpus]
    return nodes or [sorted(allowed)]


def pool_cpus(count: int, nodes: list[list[int]]) -> list[list[int]]:
    """The CPUs of each of `count` pools: whole nodes grouped when count
    divides the nodes, each node cut in count / nodes parts when the nodes
    divide count, else the CPUs (in node order) cut in count near-equal
    runs; with more pools than CPUs, pools share CPUs."""
    n = len(nodes)
    if count % n == 0:
        return [part for cpus in nodes for part in _cut(cpus, count // n)]
    if n % count == 0:
        per = n // count
        return [sorted(c for cpus in nodes[q * per:(q + 1) * per] for c in cpus)
                for q in range(count)]
    return _cut([c for cpus in nodes for c in cpus], count)


def _cut(cpus: list[int], parts: int) -> list[list[int]]:
    """cpus in `parts` near-equal runs, each of at least one CPU (shared
    when there are fewer CPUs than parts)."""
    C = len(cpus)
    return [cpus[C * j // parts: max(C * (j + 1) // parts, C * j // parts + 1)]
            for j in range(parts)]


def slot_pools(num_experts: int, count: int) -> np.ndarray:
    """The pool of each physical slot: slot s belongs to s * count // E."""
    return (np.arange(num_experts, dtype=np.int64) * count // num_experts).astype(np.int32)


class Pools:
    """One layer's pools: their CPUs, their slots, and the node each places
    its weights on."""

    def __init__(self, count: int, num_experts: int, env=os.environ):
        if count > num_experts:
            raise ValueError(f"threadpool_count={count}: more pools than num_experts="
                             f"{num_experts} (a pool owns whole experts)")
        self.count = count
        self.cpus = pool_cpus(count, topology(env)) if count > 1 else [sorted(_allowed())]
        big = [c for cpus in self.cpus for c in cpus if c >= CPU_SETSIZE]
        if big:
            raise ValueError(f"threadpool_count={count}: CPU {big[0]} is beyond the "
                             f"{CPU_SETSIZE} CPUs a pool can pin to")
        self.slot_pool = slot_pools(num_experts, count)
        node_of = {c: node for node, cpus in system_nodes().items() for c in cpus}
        # where a pool's pages go: the real node of its first CPU (-1: unknown),
        # first touched from the pool's CPUs on that node
        self.node = [node_of.get(cpus[0], -1) for cpus in self.cpus]
        self.touch_cpus = [[c for c in cpus if node_of.get(c, -1) == node_of.get(cpus[0], -1)]
                           for cpus in self.cpus]

    def slots(self, q: int) -> tuple[int, int]:
        """Pool q's physical slots [lo, hi) (contiguous by slot_pools)."""
        s = np.flatnonzero(self.slot_pool == q)
        return int(s[0]), int(s[-1]) + 1

    def native_args(self):
        """(slot_pool, cpus, cpu_offs) for MoEKernel.set_pools."""
        flat = np.array([c for cpus in self.cpus for c in cpus], np.int32)
        offs = np.cumsum([0] + [len(c) for c in self.cpus]).astype(np.int32)
        return self.slot_pool, flat, offs

    @contextlib.contextmanager
    def touching(self, slot: int):
        """The calling thread pinned to slot's pool's CPUs of its first node
        while it first touches that slot's weights, then as it was."""
        if self.count <= 1:
            yield
            return
        with pinned(self.touch_cpus[int(self.slot_pool[slot])]):
            yield

    def place(self, arrays) -> int:
        """Move the pages of in-place weight arrays ([E, ...] each) to their
        slots' pools' nodes; returns the pages that could not be moved (0
        when every page is where it should be)."""
        if self.count <= 1:
            return 0
        failed = 0
        for a in arrays:
            for q in range(self.count):
                if self.node[q] < 0:
                    continue
                lo, hi = self.slots(q)
                got = move_pages(a[lo:hi], self.node[q])
                failed += -1 if got is None else int(np.count_nonzero(got != self.node[q]))
        return failed


@contextlib.contextmanager
def pinned(cpus):
    """The calling thread (only it) on `cpus`, then back where it was."""
    try:
        old = os.sched_getaffinity(0)
    except AttributeError:
        yield
        return
    try:
        os.sched_setaffinity(0, cpus)
    except OSError:  # the CPUs left our cpuset: unpinned, same results
        yield
        return
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def _pages(a: np.ndarray):
    """(first page, end, page size) of the bytes a buffer spans."""
    page = os.sysconf("SC_PAGE_SIZE")
    if a.size == 0:
        return 0, 0, page
    lo = a.__array_interface__["data"][0]
    lo += sum((n - 1) * s for n, s in zip(a.shape, a.strides) if s < 0)
    hi = lo + sum((n - 1) * abs(s) for n, s in zip(a.shape, a.strides)) + a.itemsize
    return lo // page * page, hi, page


_CHUNK = 1 << 16  # pages per move_pages call: bounded address lists


@functools.lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _move_pages(span, nodes) -> np.ndarray | None:
    """move_pages(2) over the pages of span = (first page, end, page size),
    _CHUNK at a time; nodes None: only ask where they are."""
    if _SYS_MOVE_PAGES is None:
        return None
    lo, hi, page = span
    libc = _libc()
    out = []
    for start in range(lo, hi, _CHUNK * page):
        pages = np.arange(start, min(hi, start + _CHUNK * page), page, dtype=np.uint64)
        status = np.full(pages.size, -1, np.int32)
        nd = None if nodes is None else np.full(pages.size, nodes, np.int32)
        rc = libc.syscall(ctypes.c_long(_SYS_MOVE_PAGES), ctypes.c_int(0),
                          ctypes.c_ulong(pages.size), pages.ctypes.data_as(ctypes.c_void_p),
                          None if nd is None else nd.ctypes.data_as(ctypes.c_void_p),
                          status.ctypes.data_as(ctypes.c_void_p),
                          ctypes.c_int(0 if nodes is None else _MPOL_MF_MOVE))
        if rc < 0:
            return None
        out.append(status)
    return np.concatenate(out) if out else np.zeros(0, np.int32)


def page_nodes(a) -> np.ndarray | None:
    """The NUMA node of each page of `a` (a negative errno where a page is
    not in memory yet); None where the kernel does not say (no move_pages,
    e.g. seccomp)."""
    return _move_pages(_pages(np.asarray(a)), None)


def move_pages(a, node: int) -> np.ndarray | None:
    """Move `a`'s pages to `node` (in place: same addresses, no copy kept);
    the node of each page after (a negative errno where one did not move),
    or None where move_pages is not available."""
    return _move_pages(_pages(np.asarray(a)), node)
