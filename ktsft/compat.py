"""kt-kernel's SFT wrapper interface, kept for code written against it.

``BaseSFTMoEWrapper`` is the abstract interface kt-kernel's training
wrapper has (ktsft.SFTMoEWrapper implements it): the constructor's
``num_gpu_experts`` (only 0: every routed expert on the CPU) and
``threadpool_count`` (NUMA pools: the layer's ``cpuinfer_threads`` split
into that many pools, each pinned to its node's CPUs and owning a range of
experts whose weights it places there; ktsft/_numa.py), the abstract training entry points, and the inference entry points
of an inference wrapper, which raise: training needs the synchronous,
cached ``forward_sft`` and its ``backward``.  Nothing here holds state.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from . import validation as V


def check_compat_args(num_gpu_experts, threadpool_count) -> tuple[int, int]:
    """The two kt-kernel constructor arguments ktsft accepts, validated."""
    V.check_int(num_gpu_experts, "num_gpu_experts", minimum=0)
    if num_gpu_experts != 0:
        raise NotImplementedError(
            f"num_gpu_experts={num_gpu_experts}: only 0 is supported (all routed experts on the CPU)")
    return 0, V.check_int(threadpool_count, "threadpool_count")


class BaseSFTMoEWrapper(ABC):
    """The interface of one MoE layer's routed experts on the CPU for LoRA
    fine-tuning (kt-kernel's ``BaseSFTMoEWrapper``); ktsft.SFTMoEWrapper is
    the implementation."""

    @abstractmethod
    def load_weights(self, physical_to_logical_map_cpu=None, *, gate_proj=None, up_proj=None,
                     down_proj=None) -> None: ...

    @abstractmethod
    def init_lora_weights(self, gate_lora_a, gate_lora_b, up_lora_a, up_lora_b, down_lora_a,
                          down_lora_b) -> None: ...

    @abstractmethod
    def forward_sft(self, hidden_states, expert_ids, weights, save_for_backward=True): ...

    @abstractmethod
    def backward(self, grad_output): ...

    @abstractmethod
    def update_lora_weights(self) -> None: ...

    def forward(self, *args, **kwargs):
        raise RuntimeError("forward() is the inference entry point; in SFT mode use forward_sft()")

    def submit_forward(self, *args, **kwargs):
        raise RuntimeError("submit_forward() is not available in SFT mode: forward_sft() is synchronous")

    def sync_forward(self, *args, **kwargs):
        raise RuntimeError("sync_forward() is not available in SFT mode: forward_sft() is synchronous")

    def select_deferred_experts(self, *args, **kwargs):
        raise RuntimeError("select_deferred_experts() is not available in SFT mode: "
                           "every routed expert is needed for exact gradients")
