"""The plain PyTorch eager loop over experts, with autograd: the code users
write today, kept as the baseline for timings (python -m ktsft, bench/).
Imports torch; the rest of ktsft does not need it."""
from __future__ import annotations

import numpy as np
import torch


class EagerLoRAExperts(torch.nn.Module):
    """Routed experts with LoRA on gate/up/down, one Python loop iteration
    per expert.  Base weights frozen (in `dtype`); LoRA fp32 parameters."""

    def __init__(self, gate_proj, up_proj, down_proj, loras, lora_scaling, dtype=torch.bfloat16):
        super().__init__()
        t = lambda a: torch.as_tensor(np.asarray(a, np.float32))  # noqa: E731
        self.register_buffer("w_gate", t(gate_proj).to(dtype))
        self.register_buffer("w_up", t(up_proj).to(dtype))
        self.register_buffer("w_down", t(down_proj).to(dtype))
        names = ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")
        for name, a in zip(names, loras):
            setattr(self, name, torch.nn.Parameter(t(a).clone()))
        self.s = float(lora_scaling)
        self.dtype = dtype

    def _proj(self, x, w, a, b):
        base = x.to(self.dtype) @ w.T
        return base.float() + self.s * ((x.float() @ a.T) @ b.T)

    def forward(self, x, expert_ids, weights):
        out = torch.zeros(x.shape, dtype=torch.float32)
        for e in torch.unique(expert_ids).tolist():
            tok, slot = torch.where(expert_ids == e)
            xe = x[tok]
            g = self._proj(xe, self.w_gate[e], self.gate_a[e], self.gate_b[e])
            u = self._proj(xe, self.w_up[e], self.up_a[e], self.up_b[e])
            h = torch.nn.functional.silu(g) * u
            y = self._proj(h, self.w_down[e], self.down_a[e], self.down_b[e])
            out = out.index_add(0, tok, y * weights[tok, slot, None].float())
        return out
