"""MoE blocks whose shared experts run on the GPU while ktsft computes the
routed experts on the CPU.

    from ktsft.integrations.shared_experts import overlap_shared_experts
    overlap_shared_experts(model)          # apply_lora_experts calls it for you

DeepSeek-V3 and Qwen2-MoE blocks add a dense "shared" MLP to the routed
experts.  transformers runs the two one after the other; these forwards run
the routed experts' call first, deferred (its native forward on ktsft's
worker thread, ktsft/_overlap.py), then the shared experts, then join, and
watch the output so the backward overlaps too.  Each computes what the
transformers forward it replaces computes, with the same modules
(tests/test_shared_overlap.py compares them, values and gradients): the
order of two independent branches is all that changes.  On CPU tensors and
with any other experts implementation the deferral does not happen and the
forward is transformers' own, reordered.

Installed per block as an instance attribute (a functools.partial of a
module-level function, so the model still pickles and deep-copies); only
for the classes named in BLOCKS, whose forwards these are.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import _overlap


def _deepseek_v3(self, hidden_states):
    """DeepseekV3MoE.forward (transformers 5): routed + shared experts."""
    residuals = hidden_states
    orig_shape = hidden_states.shape
    _, topk_weights, topk_indices = self.gate(hidden_states)
    x = hidden_states.view(-1, hidden_states.shape[-1])
    with _overlap.block() as blk:
        routed = self.experts(x, topk_indices, topk_weights).view(*orig_shape)  # a view only
        shared = self.shared_experts(residuals)
    return blk.watch(routed + shared)


def _qwen2_moe(self, hidden_states):
    """Qwen2MoeSparseMoeBlock.forward (transformers 5): routed experts +
    the sigmoid-gated shared expert."""
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    x = hidden_states.view(-1, hidden_dim)
    _, routing_weights, selected_experts = self.gate(x)
    with _overlap.block() as blk:
        routed = self.experts(x, selected_experts, routing_weights)
        shared = F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
    return blk.watch(routed + shared).reshape(batch_size, sequence_length, hidden_dim)


#: block class name -> (its forward with the overlap, the attributes it uses)
BLOCKS = {
    "DeepseekV3MoE": (_deepseek_v3, ("gate", "experts", "shared_experts")),
    "Qwen2MoeSparseMoeBlock": (_qwen2_moe, ("gate", "experts", "shared_expert",
                                            "shared_expert_gate")),
}


def _transformers_major() -> int:
    try:
        import transformers
    except ImportError:
        return 0
    return int(transformers.__version__.split(".")[0])


def overlap_shared_experts(model, enabled: bool = True) -> int:
    """Give every MoE block of `model` with shared experts the overlapped
    forward (``enabled=False``: transformers' own again; either is
    idempotent).  Returns the number of such blocks.  transformers >= 5 only (the 4.x blocks that
    ktsft patches, ``_softmax_topk_block_forward``, stay as they are)."""
    if enabled and _transformers_major() < 5:
        return 0
    n = 0
    for m in model.modules():
        spec = BLOCKS.get(type(m).__name__)
        if spec is None:
            continue
        fn, attrs = spec
        if not all(isinstance(getattr(m, a, None), torch.nn.Module) for a in attrs):
            continue
        current = m.__dict__.get("forward")
        ours = isinstance(current, functools.partial) and current.func is fn
        if enabled and not ours:
            m.forward = functools.partial(fn, m)
        elif not enabled and ours:
            del m.forward
        n += 1
    return n
