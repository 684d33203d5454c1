"""Who sends what to whom in one expert-parallel step.

A token is sent once to each rank that owns at least one of its k experts
(a "row"), not once per expert: the owner expands the row into its
(token, expert) pairs locally.  With DeepSeek-style group-limited routing
this cuts the bytes on the wire by the number of experts a token picks on
the same rank.  Alongside the rows, each pair travels as three int32:
its row within the block, the owner's local expert id and the routing
weight's float32 bits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _exclusive_cumsum(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0) - counts


@dataclass
class SendPlan:
    """The sender's side.  Rows and pairs are ordered by destination rank."""
    send_tok: torch.Tensor     # int64 [R]: token of each row sent
    send_rows: list            # rows per destination rank
    pair_order: torch.Tensor   # int64 [P]: flat (t * k + j) index of each pair sent
    send_pairs: list           # pairs per destination rank
    meta: torch.Tensor         # int32 [P, 3]: row in block, local expert id, weight bits


def plan_send(ids: torch.Tensor, weights: torch.Tensor, owner: torch.Tensor,
              offsets: torch.Tensor, world: int) -> SendPlan:
    """ids [T, k] int64 global expert ids, weights [T, k]; owner [E] rank of
    each expert; offsets [world] first expert of each rank."""
    T, k = ids.shape
    flat = ids.reshape(-1)
    dest = owner[flat]
    tok = torch.arange(T).repeat_interleave(k)
    # one key per (destination, token); sorted, so rows come grouped by destination
    keys, row_of_pair = torch.unique(dest * max(T, 1) + tok, sorted=True, return_inverse=True)
    row_dest = keys // max(T, 1)
    send_tok = keys % max(T, 1)
    rows = torch.bincount(row_dest, minlength=world)
    pair_order = torch.argsort(row_of_pair, stable=True)
    pdest = dest[pair_order]
    pairs = torch.bincount(dest, minlength=world)
    row_in_block = row_of_pair[pair_order] - _exclusive_cumsum(rows)[pdest]
    local_id = flat[pair_order] - offsets[pdest]
    w_bits = weights.reshape(-1)[pair_order].to(torch.float32).contiguous().view(torch.int32)
    meta = torch.stack([row_in_block.to(torch.int32), local_id.to(torch.int32), w_bits], dim=1)
    return SendPlan(send_tok, rows.tolist(), pair_order, pairs.tolist(), meta)


@dataclass
class RecvPlan:
    """The owner's side: received rows, expanded to (row, local expert, weight) pairs."""
    recv_rows: list            # rows from each source rank
    recv_pairs: list           # pairs from each source rank
    row: torch.Tensor          # int64 [P]: received row of each pair
    local_id: torch.Tensor     # int64 [P]
    weight: torch.Tensor       # float32 [P]


def plan_recv(meta: torch.Tensor, recv_rows: list, recv_pairs: list) -> RecvPlan:
    world = len(recv_rows)
    src = torch.repeat_interleave(torch.arange(world), torch.tensor(recv_pairs, dtype=torch.int64))
    start = _exclusive_cumsum(torch.tensor(recv_rows, dtype=torch.int64))
    row = meta[:, 0].to(torch.int64) + start[src]
    weight = meta[:, 2].contiguous().view(torch.float32)
    return RecvPlan(recv_rows, recv_pairs, row, meta[:, 1].to(torch.int64), weight)
