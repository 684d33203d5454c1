"""python -m ktsft demo: fine-tune the routed experts' LoRA of a small MoE model.

With transformers installed: a small random-init Qwen3-MoE model learns a new
bigram map (the token after t is always perm[t], a fixed random permutation)
by training only the LoRA of its routed experts, which run on ktsft; router,
attention, embeddings and head stay frozen PyTorch.  Without transformers: a
stack of MoE layers (PyTorch router, ktsft experts) learns to imitate a
teacher stack whose experts carry a random LoRA.

At the end it prints the ktsft step time against the same model on the
PyTorch eager loop over experts (timed in this run), checks one step's
gradients against the eager PyTorch model and one layer against the float64
ktsft.reference, and writes a loss-curve PNG, the trained adapter
(adapter.safetensors, ktsft's stacked layout; with transformers also
peft_adapter/, PEFT's fused-expert format) and summary.json into --out.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time

import numpy as np

SIZES = {  # hidden, moe_intermediate, experts, top_k, layers, vocab, batch, seq
    "tiny": dict(H=64, I=32, E=8, k=2, L=2, V=128, B=4, S=16),
    "small": dict(H=256, I=128, E=32, k=4, L=4, V=512, B=8, S=64),
    "medium": dict(H=512, I=256, E=64, k=8, L=4, V=1024, B=8, S=64),
}


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------
def _hf_model(sz, seed):
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(hidden_size=sz["H"], intermediate_size=2 * sz["H"],
                         moe_intermediate_size=sz["I"], num_experts=sz["E"],
                         num_experts_per_tok=sz["k"], num_hidden_layers=sz["L"],
                         num_attention_heads=4, num_key_value_heads=2, head_dim=sz["H"] // 4,
                         vocab_size=sz["V"], norm_topk_prob=True, tie_word_embeddings=False,
                         initializer_range=0.05, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(cfg).float().train()


def _stack_model(sz, seed):
    """A stack of pre-norm MoE layers x += experts(norm(x), top-k(softmax(router)))
    with fused [E, 2I, H] / [E, H, I] experts, the layout apply_lora_experts reads."""
    import torch

    class Experts(torch.nn.Module):
        def __init__(self, E, H, I):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.randn(E, 2 * I, H) / math.sqrt(H))
            self.down_proj = torch.nn.Parameter(torch.randn(E, H, I) / math.sqrt(I))
            self.act_fn = torch.nn.SiLU()

    class Block(torch.nn.Module):
        def __init__(self, E, k, H, I):
            super().__init__()
            self.norm = torch.nn.RMSNorm(H)
            self.gate = torch.nn.Linear(H, E, bias=False)
            self.top_k = k
            self.experts = Experts(E, H, I)

        def forward(self, x):
            h = self.norm(x)
            p = torch.softmax(self.gate(h), dim=-1, dtype=torch.float32)
            w, ids = torch.topk(p, self.top_k, dim=-1)
            return x + self.experts(h, ids, w / w.sum(-1, keepdim=True))

    torch.manual_seed(seed)
    return torch.nn.Sequential(*[Block(sz["E"], sz["k"], sz["H"], sz["I"])
                                 for _ in range(sz["L"])])


class BigramTask:
    """Next token = perm[token] for random token sequences; cross-entropy."""

    name = "bigram permutation (Qwen3-MoE, transformers)"
    lr = 1e-2

    def __init__(self, sz, seed):
        import torch

        self.torch, self.V, self.B, self.S = torch, sz["V"], sz["B"], sz["S"]
        self.perm = torch.randperm(self.V, generator=torch.Generator().manual_seed(seed + 1))
        self.gen = torch.Generator().manual_seed(seed + 2)

    def batch(self):
        x = self.torch.randint(0, self.V, (self.B, self.S), generator=self.gen)
        return x, self.perm[x]

    def loss(self, model, batch):
        x, y = batch
        logits = model(input_ids=x).logits
        loss = self.torch.nn.functional.cross_entropy(logits.reshape(-1, self.V), y.reshape(-1))
        acc = (logits.detach().argmax(-1) == y).float().mean().item()
        return loss, acc

    metric = "next-token accuracy"


class TeacherTask:
    """Random inputs; match a teacher stack (same base, random expert LoRA)."""

    name = "imitate a teacher (stack of MoE layers, no transformers)"
    metric = "gap to teacher closed"
    lr = 3e-3

    def __init__(self, sz, seed, teacher):
        import torch

        self.torch, self.teacher = torch, teacher
        self.T, self.H = sz["B"] * sz["S"], sz["H"]
        self.gen = torch.Generator().manual_seed(seed + 2)
        self.loss0 = None

    def batch(self):
        x = self.torch.randn(self.T, self.H, generator=self.gen)
        with self.torch.no_grad():
            y = self.teacher(x)
        return x, y

    def loss(self, model, batch):
        x, y = batch
        d = y - x  # what the layers add: the part the LoRA can change
        loss = (model(x) - y).square().mean() / d.square().mean()
        if self.loss0 is None:
            self.loss0 = loss.item()
        return loss, 1.0 - loss.item() / self.loss0


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _fill_missing_grads(model, torch):
    """Eager per-expert LoRA leaves of experts that got no token have no
    .grad; give them zeros so AdamW treats them as ktsft's stacked ones."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def _progress(total, enabled):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, unit="step", dynamic_ncols=True, mininterval=0.25)
        except ImportError:
            pass

    class _Plain:  # a line every 10% without tqdm
        def __init__(self):
            self.n, self.post = 0, ""

        def set_postfix_str(self, s):
            self.post = s

        def update(self, k=1):
            self.n += k
            if enabled and (self.n % max(1, total // 10) == 0 or self.n == total):
                print(f"  step {self.n}/{total}  {self.post}", flush=True)

        def close(self):
            pass

    return _Plain()


def _check_layer_vs_reference(module, eager_module, inputs, torch):
    """One experts layer of the trained model against ktsft.reference
    (float64), on the inputs it saw in a real forward.  The base weights are
    the ones ktsft holds (bf16-rounded in bf16 mode), read from the eager twin."""
    from . import reference

    x, ids, w = (t.detach() for t in inputs)
    x = x.float().requires_grad_()
    w = w.float().requires_grad_()
    for p in module.lora_parameters():
        p.grad = None
    out = module(x, ids, w)
    dO = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    out.backward(dO)
    base = [getattr(eager_module, n).float().numpy() for n in ("w_gate", "w_up", "w_down")]
    lora = [p.detach().numpy() for p in module.lora_parameters()]
    ref_out, ctx = reference.forward(x.detach().numpy(), ids.numpy(), w.detach().numpy(), *base,
                                     *lora, module.scaling)
    ref_dx, ref_g = reference.backward(dO.numpy(), ctx)
    errs = {"out": _rel(out.detach().numpy(), ref_out), "grad_input": _rel(x.grad.numpy(), ref_dx)}
    if "grad_routing_weights" in ref_g:
        errs["grad_routing_weights"] = _rel(w.grad.numpy(), ref_g["grad_routing_weights"])
    for n, p in zip(("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a",
                     "down_lora_b"), module.lora_parameters()):
        errs["grad_" + n] = _rel(p.grad.numpy(), ref_g["grad_" + n])
    for p in module.lora_parameters():
        p.grad = None
    return errs


def gradient_check(model, twin, loss_of):
    """One step of `model` (ktsft experts) against `twin` (the same model with
    backend="eager" experts and the same LoRA): relative errors of the loss
    and of every LoRA gradient (the largest over tensors).

    grad_rel_err is over all LoRA gradients together (|g - ref| / |ref| of
    the concatenation); grad_rel_err_max_tensor the worst single tensor.
    The twin is switched to fp32 compute on its (storage-rounded) weights, and
    each of its expert layers is handed the top-k ids the ktsft model chose:
    bf16 rounding may flip a near-tie of a router, which would compare
    different expert choices rather than the kernels.  ``loss_of(m)`` returns
    the scalar loss of one fixed batch.  Leaves both models' grads zeroed."""
    import torch

    from .integrations.transformers import EagerHFLoRAExperts
    from .torch import PARAM_NAMES, LoRAExperts

    kt_mods = [m for m in model.modules() if isinstance(m, LoRAExperts)]
    eg_mods = [m for m in twin.modules() if isinstance(m, EagerHFLoRAExperts)]
    for m in eg_mods:
        for n in ("w_gate", "w_up", "w_down"):
            setattr(m, n, getattr(m, n).float())
        m.act_dtype = torch.float32
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, i=i: seen.setdefault(i, a) and None)
             for i, m in enumerate(kt_mods)]
    model.zero_grad(set_to_none=True)
    twin.zero_grad(set_to_none=True)
    try:
        lk = loss_of(model)
        lk.backward()
    finally:
        for h in hooks:
            h.remove()
    hooks = [m.register_forward_pre_hook(lambda mod, a, i=i: (a[0], seen[i][1], a[2]))
             for i, m in enumerate(eg_mods)]
    try:
        le = loss_of(twin)
        le.backward()
    finally:
        for h in hooks:
            h.remove()
    errs, got, want = [], [], []
    for mk, me in zip(kt_mods, eg_mods):
        for n in PARAM_NAMES:
            ref = torch.stack([q.grad if q.grad is not None else torch.zeros_like(q)
                               for q in getattr(me, n)]).numpy().ravel()
            g = getattr(mk, n).grad.numpy().ravel()
            errs.append(_rel(g, ref))
            got.append(g)
            want.append(ref)
    model.zero_grad(set_to_none=True)
    twin.zero_grad(set_to_none=True)
    return {"grad_rel_err": _rel(np.concatenate(got), np.concatenate(want)),
            "grad_rel_err_max_tensor": max(errs), "loss_rel_err": _rel(lk.item(), le.item()),
            "tensors": len(errs), "layer0_inputs": seen[0]}


def _plot(path, losses, metric_steps, metrics, metric_name, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=1, color="C0", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="C0")
    ax2 = ax.twinx()
    ax2.plot(metric_steps, metrics, color="C1", lw=1, label=metric_name)
    ax2.set_ylabel(metric_name, color="C1")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# the demo
# ---------------------------------------------------------------------------
def run(model_size="small", steps=300, threads=None, dtype="bf16", out="ktsft-demo-out",
        rank=16, alpha=32.0, lr=None, seed=0, eager_steps=8, use_transformers=None,
        progress=True, verbose=True):
    """Runs the demo; returns the summary dict (also written to out/summary.json)."""
    import torch

    from .integrations.transformers import (EagerHFLoRAExperts, apply_lora_experts,
                                            load_lora_state_dict, lora_state_dict,
                                            save_lora_experts)
    from .torch import LoRAExperts
    from .wrapper import default_threads

    say = print if verbose else (lambda *a, **k: None)
    sz = SIZES[model_size]
    threads = int(threads or default_threads())
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # the same cores for PyTorch and ktsft
    if use_transformers is None:
        try:
            import transformers  # noqa: F401

            use_transformers = True
        except ImportError:
            use_transformers = False
    os.makedirs(out, exist_ok=True)
    try:
        if use_transformers:
            base = _hf_model(sz, seed)
            task = BigramTask(sz, seed)
        else:
            base = _stack_model(sz, seed)
            # the teacher: the same base with a random LoRA on its experts
            teacher = apply_lora_experts(copy.deepcopy(base), r=rank, alpha=alpha, dtype=dtype,
                                         threads=threads)
            gen = torch.Generator().manual_seed(seed + 3)
            load_lora_state_dict(teacher, {
                k: (v if k.endswith("_a") else 0.05 * torch.randn(v.shape, generator=gen))
                for k, v in lora_state_dict(teacher).items()})
            task = TeacherTask(sz, seed, teacher)
        twin = copy.deepcopy(base)
        model = apply_lora_experts(base, r=rank, alpha=alpha, dtype=dtype, threads=threads)
        apply_lora_experts(twin, r=rank, alpha=alpha, dtype=dtype, backend="eager")
        if not use_transformers:  # start from the teacher's A (B = 0): a well-posed task
            load_lora_state_dict(model, {k: v.clone() if k.endswith("_a") else torch.zeros_like(v)
                                         for k, v in lora_state_dict(teacher).items()})
        lr = float(lr or task.lr)
        n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        n_base = sum(3 * m.num_experts * m.hidden_size * m.intermediate_size
                     for m in model.modules() if isinstance(m, LoRAExperts))
        tokens = sz["B"] * sz["S"]
        say(f"ktsft demo: {task.name}")
        say(f"  model {model_size}: {sz['L']} MoE layers, H={sz['H']}, E={sz['E']} experts "
            f"(I={sz['I']}, top-{sz['k']}), expert weights {n_base / 1e6:.1f} M in ktsft ({dtype}), "
            f"other frozen {n_frozen / 1e6:.2f} M, LoRA r={rank}: {n_lora / 1e6:.2f} M trainable")
        say(f"  {steps} steps x {tokens} tokens, AdamW lr {lr}, {threads} threads")

        # ---- training on ktsft
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        losses, step_times, metric_steps, metrics = [], [], [], []
        ema = None  # smoothed step time for the tokens/s display
        bar = _progress(steps, progress)
        t_start = time.perf_counter()
        for step in range(1, steps + 1):
            batch = task.batch()
            t0 = time.perf_counter()
            loss, metric = task.loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            step_times.append(dt)
            ema = dt if ema is None else 0.9 * ema + 0.1 * dt
            losses.append(loss.item())
            if step == 1 or step % 10 == 0 or step == steps:
                metric_steps.append(step)
                metrics.append(metric)
            bar.set_postfix_str(f"loss {losses[-1]:.3f}  {task.metric} {metric:.2f}  "
                                f"{tokens / ema:,.0f} tok/s")
            bar.update(1)
        bar.close()
        train_s = time.perf_counter() - t_start
        warm = step_times[min(3, len(step_times) - 1):]
        t_ktsft = statistics.median(warm)

        # ---- eager PyTorch: the same model, same step, timed in this run
        load_lora_state_dict(twin, lora_state_dict(model))
        eager_params = [p for p in twin.parameters() if p.requires_grad]
        eopt = torch.optim.AdamW(eager_params, lr=lr, weight_decay=0.0)
        e_times = []
        saved = {k: v.clone() for k, v in lora_state_dict(twin).items()}
        for _ in range(max(1, eager_steps)):
            batch = task.batch()
            t0 = time.perf_counter()
            loss, _ = task.loss(twin, batch)
            loss.backward()
            _fill_missing_grads(twin, torch)
            eopt.step()
            eopt.zero_grad(set_to_none=True)
            e_times.append(time.perf_counter() - t0)
        t_eager = statistics.median(e_times[1:] if len(e_times) > 2 else e_times)
        load_lora_state_dict(twin, saved)
        # ---- gradients of one step: ktsft vs eager PyTorch, and one layer vs reference
        batch = task.batch()
        check = gradient_check(model, twin, lambda m: task.loss(m, batch)[0])
        grad_err, loss_err = check["grad_rel_err"], check["loss_rel_err"]
        first = next(m for m in model.modules() if isinstance(m, LoRAExperts))
        eager_first = next(m for m in twin.modules() if isinstance(m, EagerHFLoRAExperts))
        layer_errs = _check_layer_vs_reference(first, eager_first, check["layer0_inputs"], torch)
        bar_model = 1e-5 if dtype == "fp32" else 5e-2
        bar_layer = 1e-5 if dtype == "fp32" else 1e-2
        ok = grad_err <= bar_model and max(layer_errs.values()) <= bar_layer

        # ---- outputs
        adapter = save_lora_experts(model, os.path.join(out, "adapter.safetensors"),
                                    metadata={"model_size": model_size, "dtype": dtype,
                                              "task": task.name, "steps": steps})
        peft_dir = None
        if use_transformers:  # PEFT's fused-expert (target_parameters) layout
            from .adapters import export_peft_fused, model_layers

            layers, r_, alpha_, rs_ = model_layers(model)
            peft_dir = os.path.join(out, "peft_adapter")
            export_peft_fused(peft_dir, layers, r_, alpha_, use_rslora=rs_)
        png = _plot(os.path.join(out, "loss.png"), losses, metric_steps, metrics, task.metric,
                    f"ktsft expert-LoRA fine-tuning: {model_size} {dtype}, {tokens} tokens/step")
        summary = dict(
            task=task.name, model_size=model_size, dtype=dtype, threads=threads, steps=steps,
            tokens_per_step=tokens, rank=rank, alpha=alpha, lr=lr, train_seconds=train_s,
            loss_first=losses[0], loss_last=losses[-1], losses=losses,
            metric=task.metric, metric_first=metrics[0], metric_last=metrics[-1],
            step_ms_ktsft=t_ktsft * 1e3, step_ms_eager=t_eager * 1e3,
            speedup=t_eager / t_ktsft, grad_rel_err_vs_eager=grad_err,
            grad_rel_err_vs_eager_worst_tensor=check["grad_rel_err_max_tensor"],
            loss_rel_err_vs_eager=loss_err, layer_rel_err_vs_reference=layer_errs,
            grad_check_ok=ok, adapter=adapter, peft_adapter=peft_dir, loss_png=png, transformers=use_transformers)
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)

        say(f"\ntrained {steps} steps in {train_s:.1f} s: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
            f"{task.metric} {metrics[0]:.2f} -> {metrics[-1]:.2f}")
        say(f"step time (forward + backward + AdamW, {tokens} tokens, {threads} threads, same run):")
        say(f"  ktsft          {t_ktsft * 1e3:8.1f} ms  ({tokens / t_ktsft:,.0f} tokens/s)")
        say(f"  eager PyTorch  {t_eager * 1e3:8.1f} ms  ({tokens / t_eager:,.0f} tokens/s)  "
            f"-> ktsft {t_eager / t_ktsft:.1f}x faster")
        say(f"gradient check, one step of the whole model vs eager PyTorch (fp32 compute, same "
            f"weights and routing): rel. error of the {check['tensors']} LoRA gradients "
            f"{grad_err:.1e} (worst tensor {check['grad_rel_err_max_tensor']:.1e}, loss "
            f"{loss_err:.1e}), bar {bar_model:g}: {'ok' if grad_err <= bar_model else 'FAIL'}")
        say(f"gradient check, layer 0 vs float64 ktsft.reference: max rel. error "
            f"{max(layer_errs.values()):.1e} ({', '.join(f'{k} {v:.0e}' for k, v in layer_errs.items())}), "
            f"bar {bar_layer:g}: {'ok' if max(layer_errs.values()) <= bar_layer else 'FAIL'}")
        say(f"wrote {adapter}" + (f", {peft_dir}/ (PEFT)" if peft_dir else "")
            + (f", {png}" if png else " (no matplotlib: no plot)")
            + f", {os.path.join(out, 'summary.json')}")
        return summary
    finally:
        torch.set_num_threads(prev_threads)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m ktsft demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-size", choices=sorted(SIZES), default="small")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for ktsft and PyTorch (default: the usable cores)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                    help="storage of the frozen expert weights (LoRA is fp32 either way)")
    ap.add_argument("--out", default="ktsft-demo-out", help="output directory")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lr", type=float, default=None,
                    help="AdamW learning rate (default: 1e-2 bigram task, 3e-3 teacher task)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eager-steps", type=int, default=8,
                    help="steps timed on the eager PyTorch twin")
    ap.add_argument("--no-transformers", action="store_true",
                    help="use the stack-of-MoE-layers model even if transformers is installed")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    s = run(model_size=args.model_size, steps=args.steps, threads=args.threads, dtype=args.dtype,
            out=args.out, rank=args.rank, alpha=args.alpha, lr=args.lr, seed=args.seed,
            eager_steps=args.eager_steps,
            use_transformers=False if args.no_transformers else None,
            progress=not args.no_progress)
    if not s["grad_check_ok"]:
        raise SystemExit("gradient check FAILED")


if __name__ == "__main__":
    main()
