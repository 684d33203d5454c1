"""The plain PyTorch eager loop over experts, with autograd: the code users
write today (transformers Qwen3-MoE style, PEFT-style fp32 LoRA), kept as
the baseline for timings in ``python -m ktsft`` and bench/.
Imports torch; the rest of ktsft does not need it."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def lora_linear(x_act, x32, W, A, B, s):
    """base(x) in the base dtype, promoted to fp32, plus s * B A x in fp32."""
    return F.linear(x_act, W).float() + s * F.linear(F.linear(x32, A), B)


def eager_moe_forward(x, expert_ids, weights, W_gate, W_up, W_down, lora, s, act_dtype):
    """out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x_t), one loop step per expert
    with tokens.  `lora` holds six per-expert lists (A_gate, B_gate, A_up,
    B_up, A_down, B_down), each indexable by expert; separate leaves per
    expert, as an nn.ModuleList of experts has (indexing one stacked leaf
    would make autograd build a full-size gradient for every expert)."""
    Ag, Bg, Au, Bu, Ad, Bd = lora
    E = W_gate.shape[0]
    out = torch.zeros(x.shape, dtype=torch.float32)
    mask = F.one_hot(expert_ids, E).permute(2, 1, 0)  # [E, k, T]
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
    for e in hit:
        slot, tok = torch.where(mask[e])
        xe = x[tok].float()
        xa = xe.to(act_dtype)
        g = lora_linear(xa, xe, W_gate[e], Ag[e], Bg[e], s)
        u = lora_linear(xa, xe, W_up[e], Au[e], Bu[e], s)
        h = F.silu(g) * u
        y = lora_linear(h.to(act_dtype), h, W_down[e], Ad[e], Bd[e], s)
        out.index_add_(0, tok, y * weights[tok, slot, None].float())
    return out


class EagerLoRAExperts(torch.nn.Module):
    """Routed experts with LoRA on gate/up/down; frozen base weights in
    `dtype`, fp32 LoRA parameters held per expert."""

    def __init__(self, gate_proj, up_proj, down_proj, loras, lora_scaling, dtype=torch.bfloat16):
        super().__init__()
        t = lambda a: torch.as_tensor(np.asarray(a, np.float32))  # noqa: E731
        self.register_buffer("w_gate", t(gate_proj).to(dtype))
        self.register_buffer("w_up", t(up_proj).to(dtype))
        self.register_buffer("w_down", t(down_proj).to(dtype))
        self.lora = torch.nn.ModuleList(
            torch.nn.ParameterList(torch.nn.Parameter(t(m).clone()) for m in a) for a in loras)
        self.s = float(lora_scaling)
        self.dtype = dtype

    def forward(self, x, expert_ids, weights):
        return eager_moe_forward(x, expert_ids, weights, self.w_gate, self.w_up, self.w_down,
                                 [list(p) for p in self.lora], self.s, self.dtype)
