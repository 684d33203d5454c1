"""Data parallelism next to expert parallelism: DDP for the replicated
parameters (attention, router, dense LoRA ...) while expert-parallel LoRA
stays per rank.

Plain data parallelism needs nothing from ktsft: ``DistributedDataParallel(
model)`` works on ``LoRAExperts`` and on models patched by
``apply_lora_experts`` (docs/distributed.md).  A model that also holds
``ExpertParallelLoRAExperts`` must keep DDP away from their parameters:
each rank owns different experts, so DDP's broadcast at construction and
its gradient averaging would both be wrong.
"""
from __future__ import annotations

from torch.nn.parallel import DistributedDataParallel

from .expert_parallel import ExpertParallelLoRAExperts


def exclude_from_ddp(model, average_grads: bool = True) -> list:
    """Mark the parameters of every ExpertParallelLoRAExperts in `model` as
    ignored by DDP (call before wrapping `model`); returns their names.

    DDP averages the replicated gradients over ranks, i.e. it trains on the
    mean of the ranks' losses, while an expert-parallel owner receives the
    *sum* of every rank's contributions.  With ``average_grads`` a gradient
    hook divides the expert-parallel gradients by the world size, so both
    kinds follow the same loss.  Give the expert-parallel modules their own
    process group (``group=torch.distributed.new_group()``) so that their
    all_to_all and DDP's all_reduce never share a queue."""
    ep_params = {}
    for m in model.modules():
        if isinstance(m, ExpertParallelLoRAExperts):
            for p in m.parameters():
                ep_params[id(p)] = (p, m.world_size)
    names = [n for n, p in model.named_parameters() if id(p) in ep_params]
    prior = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, sorted(set(prior) | set(names)))
    if average_grads:
        for p, world in ep_params.values():
            if not getattr(p, "_ktsft_ddp_averaged", False):  # once, however often called
                p.register_hook(lambda g, w=world: g / w)
                p._ktsft_ddp_averaged = True
    return names
