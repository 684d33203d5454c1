"""ktsft.optim.CPUAdamW: torch.optim.AdamW whose step over CPU fp32
parameters is one fused, OpenMP-parallel pass per tensor.

    from ktsft.optim import CPUAdamW
    opt = CPUAdamW(model.parameters(), lr=1e-4, weight_decay=0.0, threads=16)

torch's CPU AdamW makes about ten passes over memory per tensor (a kernel
per operation, with temporaries); this reads the parameter, its gradient and
both moments once and writes the parameter and the moments once: 28 bytes
per element, the least AdamW can move.

- The math is torch.optim.AdamW's (decoupled weight decay, bias correction,
  `amsgrad`, `maximize`): torch's operations in torch's order, but for one
  division by a constant done as a multiplication by its reciprocal, so
  results agree with torch to fp32 rounding; they are bitwise identical for
  any thread count and every ISA build.
- The state and `state_dict()` are torch's (`step`, `exp_avg`,
  `exp_avg_sq`, `max_exp_avg_sq`; the same param-group keys): a torch AdamW
  checkpoint resumes here and the other way round (Trainer's
  `optimizer.pt` included).
- Parameters on other devices (the attention LoRA on the GPU) are stepped
  by torch's own AdamW (foreach on CUDA) with the same hyper-parameters and
  state format, so one CPUAdamW serves a whole model; see docs/training.md.
- `threads` (default: ktsft's, OMP_NUM_THREADS or the usable cores) is the
  OpenMP thread count of the fused step; torch's thread setting is never
  touched.
"""
from __future__ import annotations

import math

import torch

from . import _dispatch
from ._threads import MAX_THREADS, default_threads, effective_threads

__all__ = ["CPUAdamW"]


def _native():
    from ._kernels import moe_sft

    return moe_sft


def _flat(t: torch.Tensor):
    return t.detach().view(-1).numpy()


class CPUAdamW(torch.optim.Optimizer):
    """AdamW with a fused native step for CPU float32 parameters.

    Arguments as torch.optim.AdamW (lr, betas, eps, weight_decay, amsgrad,
    maximize), plus `threads` and `isa` (a kernel build, as the layers
    take it; default the one chosen at import).  `foreach` and `fused` are accepted for
    signature compatibility and only steer the non-CPU parameters;
    `capturable` and `differentiable` are refused."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, threads=None, isa=None, foreach=None,
                 capturable=False, differentiable=False, fused=None):
        _check_hyper(lr, betas, eps, weight_decay)
        if capturable or differentiable:
            raise ValueError("CPUAdamW: capturable and differentiable are not supported "
                             "(use torch.optim.AdamW for CUDA graphs or higher-order optimizers)")
        self.threads = threads
        self.isa = _dispatch.resolve_isa(isa)  # a kernel build, as the layers take it
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                        capturable=False, differentiable=False, fused=fused,
                        decoupled_weight_decay=True)
        super().__init__(params, defaults)

    # ---- configuration -------------------------------------------------
    @property
    def threads(self) -> int:
        return self._threads

    @threads.setter
    def threads(self, n) -> None:
        n = min(default_threads(), MAX_THREADS) if n is None else n
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_THREADS:
            raise ValueError(f"CPUAdamW: threads must be an int in [1, {MAX_THREADS}] or None, "
                             f"got {n!r}")
        self._threads = n

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"],
                     where=f"param group {len(self.param_groups) - 1}")
        for i, p in enumerate(group["params"]):
            where = f"param group {len(self.param_groups) - 1}, parameter {i} {tuple(p.shape)}"
            if p.is_sparse:
                raise ValueError(f"CPUAdamW: {where} is sparse; AdamW needs dense parameters")
            if p.device.type == "cpu":
                if p.dtype != torch.float32:
                    raise ValueError(f"CPUAdamW: {where} is {p.dtype} on the CPU; the fused "
                                     "step takes float32 (keep trainable CPU weights fp32)")
                if not p.is_contiguous():
                    raise ValueError(f"CPUAdamW: {where} is not contiguous; the fused step "
                                     "runs over its memory in one pass")

    def __getstate__(self):
        # torch's Optimizer pickles defaults, state and param_groups only
        state = super().__getstate__()
        state["_ktsft"] = {"threads": self._threads, "isa": self.isa}
        return state

    def __setstate__(self, state):
        own = state.pop("_ktsft", {})
        super().__setstate__(state)
        self.threads = own.get("threads")
        self.isa = _dispatch.resolve_isa(own.get("isa"))

    # ---- the step ------------------------------------------------------
    def _state_of(self, p: torch.Tensor, amsgrad: bool) -> dict:
        """p's state, created as torch creates it, or repaired after a
        load_state_dict that gave it another layout."""
        st = self.state[p]
        if not st:
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        if amsgrad and "max_exp_avg_sq" not in st:
            st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg",
                                                                             "exp_avg_sq")
        for k in keys:
            t = st[k]
            if (t.device != p.device or t.dtype != p.dtype or t.shape != p.shape
                    or not t.is_contiguous()):
                if t.numel() != p.numel():
                    raise ValueError(f"CPUAdamW: state {k!r} has {t.numel()} elements for a "
                                     f"parameter of {p.numel()} (a state_dict of another model?)")
                st[k] = t.to(device=p.device, dtype=p.dtype).reshape(p.shape).contiguous()
        if not torch.is_tensor(st["step"]):
            st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)
        return st

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # every gradient is checked before any parameter moves: a bad one
        # leaves the parameters and the state as they were
        work = []
        for gi, group in enumerate(self.param_groups):
            cpu, others = [], []
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if p.device.type != "cpu":
                    others.append(p)
                    continue
                where = f"CPUAdamW: param group {gi}, parameter {i} {tuple(p.shape)}"
                if g.is_sparse:
                    raise ValueError(f"{where} has a sparse gradient")
                if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
                    raise ValueError(f"{where}: its grad is {g.dtype} {tuple(g.shape)} on "
                                     f"{g.device}, not float32 of the parameter's shape on "
                                     "the CPU")
                st = self._state_of(p, bool(group["amsgrad"]))
                cpu.append((p, g if g.is_contiguous() else g.contiguous(), st))
            work.append((group, cpu, others))
        native = _native()
        # before any state changes: a refused thread count leaves the step undone
        threads = effective_threads(self._threads, "CPUAdamW threads") if any(
            cpu for _, cpu, _ in work) else 1
        for group, cpu, others in work:
            lr = float(group["lr"])
            beta1, beta2 = (float(b) for b in group["betas"])
            eps, wd = float(group["eps"]), float(group["weight_decay"])
            amsgrad, maximize = bool(group["amsgrad"]), bool(group["maximize"])
            for p, g, st in cpu:
                st["step"] += 1
                native.adamw_step(
                    _flat(p), _flat(g), _flat(st["exp_avg"]), _flat(st["exp_avg_sq"]),
                    _flat(st["max_exp_avg_sq"]) if amsgrad else None, lr, beta1, beta2, eps,
                    wd, float(st["step"]), maximize, threads, self.isa)
            if others:
                self._step_torch(others, group, amsgrad, maximize, lr, beta1, beta2, eps, wd)
        return loss

    def _step_torch(self, params, group, amsgrad, maximize, lr, beta1, beta2, eps, wd):
        """Parameters on other devices: torch's functional AdamW, the same
        state layout (step on the CPU, as torch keeps it without fused or
        capturable)."""
        sts = [self._state_of(p, amsgrad) for p in params]
        kw = dict(foreach=group.get("foreach"), amsgrad=amsgrad, beta1=beta1, beta2=beta2,
                  lr=lr, weight_decay=wd, eps=eps, maximize=maximize)
        args = ([p for p in params], [p.grad for p in params], [s["exp_avg"] for s in sts],
                [s["exp_avg_sq"] for s in sts],
                [s["max_exp_avg_sq"] for s in sts] if amsgrad else [],
                [s["step"] for s in sts])
        try:
            from torch.optim.adam import adam

            adam(*args, decoupled_weight_decay=True, **kw)
        except TypeError:  # torch without decoupled_weight_decay in adam()
            from torch.optim.adamw import adamw

            adamw(*args, **kw)


def _check_hyper(lr, betas, eps, weight_decay, where="CPUAdamW"):
    """The checks torch.optim.AdamW makes, with the argument named."""
    lr_v = float(lr) if not torch.is_tensor(lr) else float(lr.item())
    if not (lr_v >= 0.0 and math.isfinite(lr_v)):
        raise ValueError(f"{where}: lr must be a finite number >= 0, got {lr!r}")
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"{where}: eps must be a finite number >= 0, got {eps!r}")
    try:
        b1, b2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: betas must be two numbers, got {betas!r}") from None
    for name, b in (("betas[0]", b1), ("betas[1]", b2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{where}: {name} must be in [0, 1), got {b!r}")
    if not (weight_decay >= 0.0 and math.isfinite(weight_decay)):
        raise ValueError(f"{where}: weight_decay must be a finite number >= 0, "
                         f"got {weight_decay!r}")
