"""The collectives expert parallelism uses, on torch.distributed only:
all_to_all_single with variable split sizes, and agreeing on failure so
that a rank that raises makes every rank raise instead of leaving the
others blocked in the next collective.  Optional counters (``STATS``)
record time and bytes for benchmarks."""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist


class RankFailedError(RuntimeError):
    """Another rank of the process group raised; the message names it and
    carries its error."""


class CommStats:
    """Wall time spent inside collectives (waiting for slower peers
    included), payload bytes sent to other ranks, and time in the owner's
    local expert compute, when ``enabled``."""

    def __init__(self):
        self.enabled = False
        self.reset()

    def reset(self):
        self.seconds = 0.0
        self.calls = 0
        self.bytes_sent = 0  # to other ranks; a rank's block to itself is a local copy
        self.local_seconds = 0.0

    def add(self, seconds, nbytes):
        self.seconds += seconds
        self.calls += 1
        self.bytes_sent += nbytes


STATS = CommStats()


def _prefix_sum(counts):
    out, s = [], 0
    for c in counts:
        out.append(s)
        s += c
    return out


def all_to_all(x: torch.Tensor, send_counts, recv_counts, group) -> torch.Tensor:
    """Rows x[send block j] go to rank j; returns the rows every rank sent
    here, in rank order.  send_counts / recv_counts: rows per rank (lists of
    ints, any may be 0)."""
    x = x.contiguous()
    out = torch.empty((sum(recv_counts), *x.shape[1:]), dtype=x.dtype)
    if not STATS.enabled:
        dist.all_to_all_single(out, x, list(recv_counts), list(send_counts), group=group)
        return out
    t0 = time.perf_counter()
    dist.all_to_all_single(out, x, list(recv_counts), list(send_counts), group=group)
    me = dist.get_rank(group)
    row = math.prod(x.shape[1:]) * x.element_size()
    STATS.add(time.perf_counter() - t0, (sum(send_counts) - send_counts[me]) * row)
    return out


def _describe(err) -> str | None:
    return None if err is None else f"{type(err).__name__}: {err}"


def raise_together(err, failed, group, where: str):
    """Every rank calls this once `failed` (the ranks that raised) is known
    to all: the failing ranks re-raise their own error, the others a
    RankFailedError quoting it."""
    msgs = [None] * dist.get_world_size(group)
    dist.all_gather_object(msgs, _describe(err), group=group)
    if err is not None:
        raise err
    detail = "; ".join(f"rank {r}: {msgs[r]}" for r in failed)
    raise RankFailedError(f"{where}: {len(failed)} rank(s) failed ({detail})")


def check_all(err, group, where: str) -> None:
    """Collective: returns on every rank when no rank passed an error,
    raises on every rank otherwise (see raise_together)."""
    world = dist.get_world_size(group)
    flags = torch.zeros(world, dtype=torch.int32)
    if err is not None:
        flags[dist.get_rank(group)] = 1
    t0 = time.perf_counter()
    dist.all_reduce(flags, group=group)
    if STATS.enabled:
        STATS.add(time.perf_counter() - t0, 0)
    failed = [r for r in range(world) if flags[r]]
    if failed:
        raise_together(err, failed, group, where)


def exchange_counts(send: torch.Tensor, err, group, where: str) -> torch.Tensor:
    """all_to_all of per-destination counts (int64 [world, C]) with an
    error flag appended: a rank whose input was bad still joins, and every
    rank learns of it here, before any payload moves.  Returns the counts
    received from each rank, [world, C]."""
    world = dist.get_world_size(group)
    flag = torch.full((world, 1), 0 if err is None else 1, dtype=torch.int64)
    msg = torch.cat([send.to(torch.int64), flag], dim=1)
    got = all_to_all(msg, [1] * world, [1] * world, group)
    failed = [r for r in range(world) if got[r, -1]]
    if failed:
        raise_together(err, failed, group, where)
    return got[:, :-1]


def agree(settings: dict, build, group, where: str):
    """Collective: every rank passes the settings it builds a layer with
    and `build`, a callable that builds it (raising on arguments or memory
    this rank refuses).  Returns build()'s result on every rank when no
    rank's build raised and all settings are equal; else raises on every
    rank (the refusing rank its own error, the others a RankFailedError
    quoting it; unequal settings: ValueError naming each setting and every
    rank's value)."""
    err = result = None
    try:
        result = build()
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        err = e
    world = dist.get_world_size(group)
    mine = {k: repr(v) for k, v in settings.items()}
    got = [None] * world
    dist.all_gather_object(got, (err is not None, mine), group=group)
    failed = [r for r in range(world) if got[r][0]]
    if failed:
        raise_together(err, failed, group, where)
    differ = [k for k in mine if len({g[1].get(k) for g in got}) > 1]
    if differ:
        detail = "; ".join(f"{k}: " + ", ".join(f"rank {r} {got[r][1].get(k)}"
                                              for r in range(world)) for k in differ)
        raise ValueError(f"{where}: the ranks were built with different settings ({detail}); "
                         "every rank must build the layer with the same sizes")
    return result
