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


def eager_moe_forward(x, expert_ids, weights, W_gate, W_up, W_down, lora, s, act_dtype,
                      dropout=None):
    """out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x_t), one loop step per expert
    with tokens.  `lora` holds six per-expert lists (A_gate, B_gate, A_up,
    B_up, A_down, B_down), each indexable by expert; separate leaves per
    expert, as an nn.ModuleList of experts has (indexing one stacked leaf
    would make autograd build a full-size gradient for every expert).

    dropout: LoRA dropout on the LoRA inputs (gate, up: x; down: h), as
    PEFT's lora_dropout: None/0 for none, a probability p (fresh
    torch.nn.functional.dropout masks, one per projection), or the
    multipliers (m_gate [T, k, H], m_up [T, k, H], m_down [T, k, I]) of a
    given mask, e.g. ktsft.reference.dropout_masks (the masks ktsft draws)."""
    Ag, Bg, Au, Bu, Ad, Bd = lora
    E = W_gate.shape[0]
    out = torch.zeros(x.shape, dtype=torch.float32)
    mask = F.one_hot(expert_ids, E).permute(2, 1, 0)  # [E, k, T]
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
    if isinstance(dropout, (tuple, list)):
        masks = [torch.as_tensor(m, dtype=torch.float32) for m in dropout]
        drop = lambda v, i, tok, slot: v * masks[i][tok, slot]  # noqa: E731
    elif dropout:
        p = float(dropout)
        drop = lambda v, i, tok, slot: F.dropout(v, p, training=True)  # noqa: E731
    else:
        drop = lambda v, i, tok, slot: v  # noqa: E731
    for e in hit:
        slot, tok = torch.where(mask[e])
        xe = x[tok].float()
        xa = xe.to(act_dtype)
        g = lora_linear(xa, drop(xe, 0, tok, slot), W_gate[e], Ag[e], Bg[e], s)
        u = lora_linear(xa, drop(xe, 1, tok, slot), W_up[e], Au[e], Bu[e], s)
        h = F.silu(g) * u
        y = lora_linear(h.to(act_dtype), drop(h, 2, tok, slot), W_down[e], Ad[e], Bd[e], s)
        out.index_add_(0, tok, y * weights[tok, slot, None].float())
    return out


class EagerLoRAExperts(torch.nn.Module):
    """Routed experts with LoRA on gate/up/down; frozen base weights in
    `dtype`, fp32 LoRA parameters held per expert."""

    def __init__(self, gate_proj, up_proj, down_proj, loras, lora_scaling, dtype=torch.bfloat16,
                 lora_dropout=0.0):
        super().__init__()
        t = lambda a: torch.as_tensor(np.asarray(a, np.float32))  # noqa: E731
        self.register_buffer("w_gate", t(gate_proj).to(dtype))
        self.register_buffer("w_up", t(up_proj).to(dtype))
        self.register_buffer("w_down", t(down_proj).to(dtype))
        self.lora = torch.nn.ModuleList(
            torch.nn.ParameterList(torch.nn.Parameter(t(m).clone()) for m in a) for a in loras)
        self.s = float(lora_scaling)
        self.dtype = dtype
        self.lora_dropout = float(lora_dropout)

    def forward(self, x, expert_ids, weights, dropout_masks=None):
        """dropout_masks: the LoRA-dropout multipliers to apply (training or
        not); else torch dropout of lora_dropout in training mode."""
        drop = dropout_masks if dropout_masks is not None else (
            self.lora_dropout if self.training else None)
        return eager_moe_forward(x, expert_ids, weights, self.w_gate, self.w_up, self.w_down,
                                 [list(p) for p in self.lora], self.s, self.dtype, drop)
