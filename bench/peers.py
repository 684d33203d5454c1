"""The PyTorch implementations a user would write today, sharing the
benchmark's weight memory (no copies):

* eager: the transformers-style loop over experts (one_hot mask,
  torch.where to gather each expert's tokens, index_add_ to scatter back),
  experts as nn.Linear-layout weights with PEFT-style LoRA, autograd backward.
* grouped_mm: tokens sorted by expert and each projection done as one
  torch._grouped_mm over all experts (transformers' "grouped_mm" experts
  implementation), also with LoRA and autograd.

Both follow ktsft's dtype contract: base weights in the run's dtype, LoRA
kept in fp32 (as PEFT does by default: autocast_adapter_dtype=True) with its
input cast to fp32, results accumulated in fp32."""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from ktsft.eager import eager_moe_forward

from .contention import Gauge
from .timing import torch_threads

LORA_NAMES = ("grad_gate_lora_a", "grad_gate_lora_b", "grad_up_lora_a", "grad_up_lora_b",
              "grad_down_lora_a", "grad_down_lora_b")


def _torch_view(a: np.ndarray):
    """A torch tensor sharing a (float32 or ml_dtypes bf16) array's memory."""
    if a.dtype == np.float32:
        return torch.from_numpy(a)
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)


class TorchLayer:
    """Torch views of the base weights (frozen) and LoRA (trainable), both
    stacked [E, ...] (for grouped_mm) and per expert (separate leaves, like
    an nn.ModuleList of experts; indexing one stacked leaf per expert would
    make autograd build a full-size gradient per expert)."""

    def __init__(self, base: dict, lora: tuple, scaling: float):
        self.act = torch.bfloat16 if base["gate_proj"].dtype != np.float32 else torch.float32
        self.s = scaling
        self.W = [_torch_view(base[n]) for n in ("gate_proj", "up_proj", "down_proj")]
        self.E = self.W[0].shape[0]
        self.lora_np = lora
        self.lora_stacked = [_torch_view(a).requires_grad_() for a in lora]
        self.lora_experts = [[_torch_view(a)[e].requires_grad_() for e in range(self.E)]
                             for a in lora]

    def zero_grad(self) -> None:
        for p in self.lora_stacked:
            p.grad = None
        for ps in self.lora_experts:
            for p in ps:
                p.grad = None


class EagerPeer:
    """Loop over the experts that got tokens, transformers Qwen3-MoE style."""

    name = "eager"

    def __init__(self, layer: TorchLayer):
        self.L = layer
        self.params = layer.lora_experts

    def forward(self, x, ids, w):
        L = self.L
        return eager_moe_forward(x, ids, w, *L.W, self.params, L.s, L.act)

    def lora_grads(self) -> dict:
        """The six LoRA gradients stacked [E, ...] (zeros for idle experts)."""
        out = {}
        for name, ps, a in zip(LORA_NAMES, self.params, self.L.lora_np):
            g = np.zeros(a.shape, np.float32)
            for e, p in enumerate(ps):
                if p.grad is not None:
                    g[e] = p.grad.numpy()
            out[name] = g
        return out


class GroupedMMPeer:
    """All experts' projections as torch._grouped_mm over expert-sorted rows."""

    name = "grouped_mm"

    def __init__(self, layer: TorchLayer):
        self.L = layer
        self.params = layer.lora_stacked

    def forward(self, x, ids, w):
        L = self.L
        gm = torch._grouped_mm
        Wg, Wu, Wd = L.W
        Ag, Bg, Au, Bu, Ad, Bd = self.params
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok = order // k
        offs = torch.cumsum(torch.bincount(flat, minlength=L.E), 0, dtype=torch.int32)

        def proj(xa, x32, W, A, B):
            base = gm(xa, W.transpose(-2, -1), offs=offs).float()
            lora = gm(gm(x32, A.transpose(-2, -1), offs=offs), B.transpose(-2, -1), offs=offs)
            return base + L.s * lora

        xs = x[tok]
        xa = xs.to(L.act)
        h = F.silu(proj(xa, xs, Wg, Ag, Bg)) * proj(xa, xs, Wu, Au, Bu)
        y = proj(h.to(L.act), h, Wd, Ad, Bd)
        return torch.zeros_like(x).index_add(0, tok, y * w.reshape(-1)[order, None])

    def lora_grads(self) -> dict:
        return {n: p.grad.numpy().copy() for n, p in zip(LORA_NAMES, self.params)}


def grouped_mm_status() -> str | None:
    """None when torch._grouped_mm runs forward and backward on the CPU here,
    else why not."""
    try:
        if not hasattr(torch, "_grouped_mm"):
            return f"torch {torch.__version__} has no torch._grouped_mm"
        x = torch.randn(6, 16, requires_grad=True)
        W = torch.randn(2, 8, 16, requires_grad=True)
        y = torch._grouped_mm(x, W.transpose(-2, -1), offs=torch.tensor([2, 6], dtype=torch.int32))
        # a contiguous upstream gradient: torch 2.13's CPU backward rejects
        # the stride-0 one that y.sum().backward() would pass
        y.backward(torch.ones_like(y))
        return None
    except Exception as exc:  # any failure means "not usable here"
        return f"{type(exc).__name__}: {exc}"[:160]


def measure(peer, x: np.ndarray, ids: np.ndarray, w: np.ndarray, gout: np.ndarray,
            threads: int, repeats: int) -> dict:
    """Median forward and backward seconds of `peer` over `repeats` steps
    after one warm-up step, torch on `threads` threads; plus the last step's
    outputs and gradients (for the accuracy check)."""
    xt = torch.from_numpy(x.copy()).requires_grad_()
    wt = torch.from_numpy(w.copy()).requires_grad_()
    it, gt = torch.from_numpy(ids), torch.from_numpy(gout)
    fwd_t, bwd_t = [], []
    gauge = Gauge().start()
    with torch_threads(threads):
        for i in range(repeats + 1):  # step 0 is the warm-up
            peer.L.zero_grad()
            xt.grad = wt.grad = None
            t0 = time.perf_counter()
            out = peer.forward(xt, it, wt)
            t1 = time.perf_counter()
            out.backward(gt)
            t2 = time.perf_counter()
            if i:
                fwd_t.append(t1 - t0)
                bwd_t.append(t2 - t1)
    res = {"fwd_s": float(np.median(fwd_t)), "bwd_s": float(np.median(bwd_t)),
           "other_load": gauge.stop(),
           "out": out.detach().numpy().copy(), "grad_x": xt.grad.numpy().copy(),
           "grad_routing_weights": wt.grad.numpy().copy()}
    res.update(peer.lora_grads())
    return res
