"""Which rank owns which routed experts: contiguous ranges, possibly uneven."""
from __future__ import annotations

from .. import validation as V


class ExpertPartition:
    """Experts [0, E) split into contiguous ranges, rank i owning
    [offsets[i], offsets[i + 1]).  ``counts`` lists the experts per rank
    (each >= 1, summing to E); default: as even as possible, the first
    E % world ranks holding one more.  Contiguous ranges keep a rank's
    experts one slice of every stacked checkpoint tensor and adapter."""

    def __init__(self, num_experts: int, world_size: int, counts=None):
        self.num_experts = V.check_int(num_experts, "num_experts")
        self.world_size = V.check_int(world_size, "world_size")
        if counts is None:
            if self.world_size > self.num_experts:
                raise ValueError(f"world_size={self.world_size} ranks but num_experts="
                                 f"{self.num_experts}: every rank must own at least one expert")
            q, rem = divmod(self.num_experts, self.world_size)
            counts = [q + (i < rem) for i in range(self.world_size)]
        else:
            try:
                counts = [int(c) for c in counts]
            except (TypeError, ValueError):
                raise TypeError(f"expert_counts must be a sequence of ints, got {counts!r}") from None
            if len(counts) != self.world_size:
                raise ValueError(f"expert_counts has {len(counts)} entries, the process group has "
                                 f"{self.world_size} ranks")
            if min(counts) < 1:
                raise ValueError(f"expert_counts={counts}: every rank must own at least one expert")
            if sum(counts) != self.num_experts:
                raise ValueError(f"expert_counts={counts} sums to {sum(counts)}, num_experts is "
                                 f"{self.num_experts}")
        self.counts = tuple(counts)
        offs = [0]
        for c in self.counts:
            offs.append(offs[-1] + c)
        self.offsets = tuple(offs)

    def range_of(self, rank: int) -> tuple[int, int]:
        """[lo, hi) of the experts `rank` owns."""
        return self.offsets[rank], self.offsets[rank + 1]

    def owner_table(self):
        """torch int64 [E]: owner rank of each expert."""
        import torch

        return torch.repeat_interleave(torch.arange(self.world_size),
                                       torch.tensor(self.counts))

    def __repr__(self) -> str:
        return f"ExpertPartition(num_experts={self.num_experts}, counts={list(self.counts)})"
