"""ktsft beyond one machine, on torch.distributed (launch with torchrun).

* Data parallel: ``ktsft.torch.LoRAExperts`` and models patched by
  ``apply_lora_experts`` train under ``torch.nn.parallel.
  DistributedDataParallel`` as they are (docs/distributed.md);
  :func:`exclude_from_ddp` keeps DDP off expert-parallel parameters when
  a model mixes the two.
* Expert parallel: :class:`ExpertParallelLoRAExperts` shards one layer's
  routed experts over the ranks of a process group; tokens travel to the
  ranks owning their experts by ``all_to_all_single``.
* Adapters: each rank saves its shard (:func:`save_adapter_shard`),
  :func:`merge_adapter_shards` writes one PEFT adapter from them.
* :func:`run_local` runs a function on N local processes (tests, trials).
"""
from .comm import STATS, RankFailedError
from .data_parallel import exclude_from_ddp
from .expert_parallel import ExpertParallelLoRAExperts
from .local import LocalRunError, run_local
from .partition import ExpertPartition
from .shards import merge_adapter_shards, save_adapter_shard

__all__ = ["STATS", "ExpertParallelLoRAExperts", "ExpertPartition", "LocalRunError",
           "RankFailedError", "exclude_from_ddp", "merge_adapter_shards", "run_local",
           "save_adapter_shard"]
