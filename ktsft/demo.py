"""python -m ktsft demo: a small MoE model learns a new task through the LoRA
of its routed experts alone, on ktsft, in about a minute on 2 cores.

The task: transliteration of real text through a character cipher.  The
text is what Python ships: the base model is first trained (all weights,
plain PyTorch) to write the source code of a few standard-library modules
through cipher A, a fixed random permutation of the characters.  Then only
the LoRA of its routed experts (on ktsft; router, attention, embeddings and
head frozen) is trained to write docstrings of other modules through cipher
B, another permutation that differs from A on every character.  Held out:
the docstrings of modules never seen in training.  The target of every
character is deterministic, so accuracy can reach 1; before the fine-tune
the model writes cipher A, so its cipher-B accuracy is ~0.

With transformers >= 5 and PEFT the model is a small random-init Qwen3-MoE
on the stock Hugging Face path: experts_implementation="ktsft" and PEFT's
LoraConfig(target_parameters=["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"]).  Without them, a stack of MoE layers (PyTorch
router, ktsft experts through ktsft.integrations.transformers.
apply_lora_experts) does the same job.

At the end: held-out loss and accuracy before and after; the ktsft step
against the eager PyTorch experts (and transformers' grouped_mm) on the same
batch, measured interleaved, with the load other processes put on the
machine during the measurement (the speedup is withheld when they took a
noticeable share of the cores); a gradient check of one step of the whole
model against an fp32 eager oracle, with a bar from the bf16 error model
measured on the same step (docs/training.md, "The demo"), and every experts
layer against a float64 oracle.  --out receives summary.json, the curves
(loss.png) and the adapter.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import math
import os
import statistics
import sys
import time
import warnings

import numpy as np

from ._contention import OtherLoad, loadavg, usable_cores, verdict

SIZES = {  # hidden, moe_intermediate, experts, top_k, layers, batch, sequence length
    "tiny": dict(H=64, I=32, E=8, k=2, L=2, B=8, S=32),
    "small": dict(H=256, I=128, E=32, k=4, L=4, B=16, S=64),
    "medium": dict(H=512, I=256, E=64, k=8, L=4, B=16, S=64),
}
SIZE_HELP = {"tiny": "2 layers, 8 experts of I=32 (for tests; ~0.5 GB peak RSS)",
             "small": "4 layers, 32 experts of I=128, top-4 (default; ~0.9 GB)",
             "medium": "4 layers, 64 experts of I=256, top-8 (slower; ~1.5 GB)"}
DEFAULT_STEPS = 200
DEFAULT_PRETRAIN_STEPS = 60

# the text: modules of the standard library (present in every CPython >= 3.8)
CODE_MODULES = ("textwrap", "shlex", "fractions", "heapq", "bisect", "calendar", "difflib",
                "csv", "string", "colorsys", "statistics")
TRAIN_DOC_MODULES = ("inspect", "argparse", "pathlib", "collections", "itertools", "functools",
                     "shutil", "typing", "subprocess", "random", "logging", "unittest",
                     "email.message", "re")
HELDOUT_DOC_MODULES = ("json", "tarfile", "zipfile", "datetime", "threading", "queue")

# characters: 0 = anything else, 1 = newline, 2..96 = printable ASCII (tab -> space);
# BOS = 97 starts every sequence (input only: no loss on it, no cipher image)
V = 97
BOS = V
VOCAB = V + 1

# bf16 error model: round to nearest with an 8-bit significand, unit roundoff
U_BF16 = 2.0 ** -8
# bf16 roundings on the path of a LoRA gradient, per experts layer: forward the
# layer input x and the intermediate h (before the base GEMMs), backward the
# output gradient and the gate/up gradient (before the transposed base GEMMs)
ROUNDINGS_PER_LAYER = 4
# ktsft's bf16 gradient error may be at most this multiple of the worst of
# PERTURBED_TRIALS bf16-sized random perturbations of the fp32 oracle on the
# same step, at the layer's four rounding points (forward input and output,
# backward output and input gradient).  The worst, not the median: the trials'
# errors are heavy-tailed (measured, --steps 20: the worst of 7 is 1.5-26x their
# median), and ktsft's own rounding is one more draw from that distribution
SENSITIVITY_FACTOR = 2.0
PERTURBED_TRIALS = 7
# ... and never above this: on an ill-conditioned step the worst trial reached
# 0.25 (CI, seed 6: a bar of 0.506), and a bar above 0.5 could no longer tell a
# structural error (a dropped slot or a wrong scale, off by O(1)) from rounding.
# ktsft's own error on the steps measured was 1e-3 to 5e-2.
BAR_CAP = 0.5
FP32_BAR = 1e-5


# ---------------------------------------------------------------------------
# the text and the task
# ---------------------------------------------------------------------------
def _module_docs(name):
    mod = importlib.import_module(name)
    out = [inspect.cleandoc(mod.__doc__)] if mod.__doc__ else []
    for key, obj in sorted(vars(mod).items()):
        if key.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        doc = inspect.getdoc(obj)
        if doc:
            out.append(doc)
    return "\n\n".join(out)


def stdlib_corpora():
    """{"code", "train", "heldout": text, "source": where each came from}:
    source code of CODE_MODULES (their docstrings if the sources are not
    installed), docstrings of TRAIN_DOC_MODULES and of HELDOUT_DOC_MODULES."""
    try:
        code = "\n".join(inspect.getsource(importlib.import_module(m)) for m in CODE_MODULES)
        code_src = "source code"
    except (OSError, TypeError):  # no .py files shipped
        code = "\n\n".join(_module_docs(m) for m in CODE_MODULES)
        code_src = "docstrings (no sources installed)"
    with warnings.catch_warnings():  # typing.io and friends warn when their docs are read
        warnings.simplefilter("ignore", DeprecationWarning)
        train = "\n\n".join(_module_docs(m) for m in TRAIN_DOC_MODULES)
        heldout = "\n\n".join(_module_docs(m) for m in HELDOUT_DOC_MODULES)
    for what, text in (("code", code), ("train", train), ("heldout", heldout)):
        if len(text) < 20000:
            raise RuntimeError(f"the standard library's {what} text has only {len(text)} "
                               "characters (docstrings stripped, python -OO?); the demo needs it")
    return {"code": code, "train": train, "heldout": heldout,
            "source": {"code": f"{code_src} of {', '.join(CODE_MODULES)}",
                       "train": f"docstrings of {', '.join(TRAIN_DOC_MODULES)}",
                       "heldout": f"docstrings of {', '.join(HELDOUT_DOC_MODULES)}"}}


def encode(text):
    a = np.frombuffer(text.replace("\t", " ").encode("utf-32-le"), dtype=np.uint32)
    ids = np.zeros(a.shape, np.int64)
    ids[a == 10] = 1
    printable = (a >= 32) & (a < 127)
    ids[printable] = a[printable].astype(np.int64) - 30
    return ids


def _display_char(i):
    i = int(i)
    return chr(i + 30) if i >= 2 else ("|" if i == 1 else "?")


def decode(ids):
    """Characters for display (newline shown as '|', others as '?')."""
    return "".join(_display_char(i) for i in ids)


class CipherTask:
    """Per character, its image under a cipher (a permutation of the V ids);
    cross-entropy on every position.  key_a: the base model's cipher, key_b:
    the fine-tune's, key_b[c] != key_a[c] for every c."""

    metric = "held-out accuracy (cipher B)"

    def __init__(self, corpora, B, S, seed):
        import torch

        self.torch, self.B, self.S = torch, B, S
        self.source = corpora["source"]
        self.text = {k: torch.from_numpy(encode(corpora[k])) for k in ("code", "train", "heldout")}
        g = torch.Generator().manual_seed(seed + 1)
        self.key_a = torch.randperm(V, generator=g)
        order = torch.randperm(V, generator=g)  # one cycle over all ids: a derangement of key_a
        self.key_b = torch.empty_like(self.key_a)
        self.key_b[order] = self.key_a[order.roll(1)]
        assert bool((self.key_b != self.key_a).all())
        self.gen = torch.Generator().manual_seed(seed + 2)
        # held out: windows evenly spread over the held-out text, fixed
        ho = self.text["heldout"]
        n = 32
        starts = torch.linspace(0, len(ho) - S - 1, n).long()
        self.heldout_c = torch.stack([ho[s:s + S - 1] for s in starts.tolist()])

    def windows(self, chars):
        """[n, S - 1] characters -> [n, S] inputs with BOS first."""
        bos = self.torch.full((chars.shape[0], 1), BOS, dtype=chars.dtype)
        return self.torch.cat([bos, chars], dim=1)

    def batch(self, split="train", key=None):
        """(inputs [B, S], cipher images of the characters [B, S - 1])."""
        text = self.text[split]
        key = (self.key_a if split == "code" else self.key_b) if key is None else key
        starts = self.torch.randint(0, len(text) - self.S, (self.B,), generator=self.gen)
        c = self.torch.stack([text[s:s + self.S - 1] for s in starts.tolist()])
        return self.windows(c), key[c]

    def loss(self, model, x, y):
        logits = _logits(model, x)[:, 1:, :V]  # the characters' positions, the characters
        loss = self.torch.nn.functional.cross_entropy(logits.reshape(-1, V).float(), y.reshape(-1))
        acc = (logits.detach().argmax(-1) == y).float().mean().item()
        return loss, acc

    def evaluate(self, model, windows=None):
        """Held-out loss and accuracy under cipher B (the fine-tune's task) and
        cipher A (the base model's) on the held-out windows (all, or the first
        `windows`), from one forward per batch."""
        F = self.torch.nn.functional
        cs = self.heldout_c if windows is None else self.heldout_c[:windows]
        tot = {"loss": 0.0, "accuracy": 0.0, "loss_cipher_a": 0.0, "accuracy_cipher_a": 0.0}
        with self.torch.no_grad():
            for i in range(0, len(cs), self.B):
                c = cs[i:i + self.B]
                logits = _logits(model, self.windows(c))[:, 1:, :V].reshape(-1, V).float()
                for key, sfx in ((self.key_b, ""), (self.key_a, "_cipher_a")):
                    y = key[c].reshape(-1)
                    tot["loss" + sfx] += F.cross_entropy(logits, y, reduction="sum").item()
                    tot["accuracy" + sfx] += (logits.argmax(-1) == y).sum().item()
        n = cs.numel()
        return {k: v / n for k, v in tot.items()}

    def transliterate(self, model, chars):
        """The model's output characters for one held-out window."""
        with self.torch.no_grad():
            return _logits(model, self.windows(chars[None]))[0, 1:, :V].argmax(-1)


def _logits(model, x):
    out = model(input_ids=x)
    return getattr(out, "logits", out)


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
                         vocab_size=VOCAB, norm_topk_prob=True, tie_word_embeddings=False,
                         initializer_range=0.05, pad_token_id=None, bos_token_id=None,
                         eos_token_id=None)
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(cfg).float().train()


def _stack_model(sz, seed):
    """Embedding, a stack of pre-norm MoE layers x += experts(norm(x),
    top-k(softmax(router))) with fused [E, 2I, H] / [E, H, I] experts (the
    layout apply_lora_experts reads; a plain PyTorch loop for pretraining),
    a norm and a head.  No attention: the task is per character."""
    import torch
    import torch.nn.functional as F

    class Experts(torch.nn.Module):
        def __init__(self, E, H, I):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(0.05 * torch.randn(E, 2 * I, H))
            self.down_proj = torch.nn.Parameter(0.05 * torch.randn(E, H, I))
            self.act_fn = torch.nn.SiLU()

        def forward(self, x, ids, w):
            out = torch.zeros_like(x)
            for e in ids.unique().tolist():
                tok, slot = torch.where(ids == e)
                g, u = F.linear(x[tok], self.gate_up_proj[e]).chunk(2, dim=-1)
                y = F.linear(F.silu(g) * u, self.down_proj[e]) * w[tok, slot, None]
                out = out.index_add(0, tok, y.to(out.dtype))
            return out

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

    class TokenMoE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, sz["H"])
            self.layers = torch.nn.ModuleList(Block(sz["E"], sz["k"], sz["H"], sz["I"])
                                              for _ in range(sz["L"]))
            self.norm = torch.nn.RMSNorm(sz["H"])
            self.lm_head = torch.nn.Linear(sz["H"], V, bias=False)

        def forward(self, input_ids):
            x = self.embed(input_ids).reshape(-1, sz["H"])
            for layer in self.layers:
                x = layer(x)
            return self.lm_head(self.norm(x)).reshape(*input_ids.shape, V)

    torch.manual_seed(seed)
    return TokenMoE().train()


def hf_available():
    """(True, None), or (False, why the transformers path cannot run)."""
    try:
        import peft  # noqa: F401
        import transformers
        from transformers.integrations.moe import ExpertsInterface  # noqa: F401
    except ImportError as e:
        return False, f"{e.name or e} is not installed (transformers >= 5 and peft)"
    if not hasattr(transformers, "Qwen3MoeForCausalLM"):
        return False, f"transformers {transformers.__version__} has no Qwen3-MoE"
    return True, None


def _load_text(others, cores):
    la = loadavg()
    parts = [f"{cores} usable cores"]
    if others is not None:
        parts.append(f"other processes used {others:.2f} cores")
    if la is not None:
        parts.append(f"load average {la:.2f}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _progress(total, enabled, desc):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, unit="step", dynamic_ncols=True, mininterval=0.25, desc=desc)
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
                print(f"  {desc} step {self.n}/{total}  {self.post}", flush=True)

        def close(self):
            pass

    return _Plain()


def _cosine(opt, steps):
    """The learning rate from its peak down to 10% along a half cosine."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.1 + 0.45 * (1 + math.cos(math.pi * min(i, steps) / max(steps, 1))))


def _experts_modules(model):
    """The experts modules the MoE blocks call, in layer order (PEFT's outer
    wrapper where PEFT wraps them)."""
    return [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "experts"]


def _lora_grads(model):
    """The LoRA gradients in a fixed order, float64 numpy (zeros where a
    parameter got none): PEFT parameters by name, or ktsft's stacked /
    the eager twin's per-expert LoRA of the stack model."""
    import torch

    from .integrations.transformers import EagerHFLoRAExperts
    from .torch import PARAM_NAMES, LoRAExperts

    mods = [m for m in model.modules() if isinstance(m, (LoRAExperts, EagerHFLoRAExperts))]
    out = []
    if mods:
        for m in mods:
            for n in PARAM_NAMES:
                ps = [getattr(m, n)] if isinstance(m, LoRAExperts) else list(getattr(m, n))
                gs = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ps]
                g = gs[0] if isinstance(m, LoRAExperts) else torch.stack(gs)
                out.append((f"{n}", g.detach().double().numpy()))
        return out
    for n, p in sorted(model.named_parameters()):
        if p.requires_grad:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            out.append((n, g.detach().double().numpy()))
    return out


def _plot(path, curve, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = np.arange(1, len(curve["train_loss"]) + 1)
    ax1.plot(steps, curve["train_loss"], lw=1, color="C0", label="training loss (cipher B)")
    ax1.plot(curve["eval_steps"], curve["heldout_loss"], "o-", ms=3, color="C1",
             label="held-out loss (cipher B)")
    ax1.set_yscale("log")
    ax1.set_xlabel("fine-tuning step")
    ax1.set_ylabel("cross-entropy")
    ax1.legend(fontsize=8)
    ax2.plot(curve["eval_steps"], curve["heldout_acc"], "o-", ms=3, color="C2",
             label="held-out accuracy, cipher B (the new task)")
    ax2.plot(curve["eval_steps"], curve["heldout_acc_a"], "o-", ms=3, color="C7",
             label="held-out accuracy, cipher A (the base task)")
    ax2.set_ylim(-0.02, 1.02)
    ax2.set_xlabel("fine-tuning step (0: before)")
    ax2.set_ylabel("accuracy")
    ax2.legend(fontsize=8, loc="center right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# the demo, in steps (the notebook calls the same steps)
# ---------------------------------------------------------------------------
class Demo:
    """The demo's state and steps: ``Demo(...)`` builds the text, the task
    and the base model; then ``pretrain()``, ``attach_lora()``,
    ``evaluate("before")``, ``finetune()``, ``evaluate("after")``,
    ``time_steps()``, ``check_gradients()``, ``save()``.  ``run()`` does
    them all and prints the report."""

    def __init__(self, model_size="small", dtype="bf16", threads=None, rank=16, alpha=32.0,
                 seed=0, use_transformers=None, progress=True, verbose=True, t_start=None):
        import torch

        from .wrapper import default_threads

        if model_size not in SIZES:
            raise ValueError(f"model_size must be one of {sorted(SIZES)}, got {model_size!r}")
        if dtype not in ("bf16", "fp32"):
            raise ValueError(f"dtype must be 'bf16' or 'fp32', got {dtype!r}")
        # transformers deprecates a name PEFT still calls: harmless, and not ours
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        self.torch = torch
        self.model_size, self.sz, self.dtype = model_size, SIZES[model_size], dtype
        self.threads = int(threads or default_threads())
        self.rank, self.alpha, self.seed = int(rank), float(alpha), int(seed)
        self.progress, self.say = progress, (print if verbose else (lambda *a, **k: None))
        self.fallback_reason = None
        self.loadavg_at_start = loadavg()  # before the demo adds to it
        self._t_start = time.perf_counter() if t_start is None else t_start
        self._gauge = OtherLoad().start()  # what else ran during the whole demo
        if use_transformers is None:
            use_transformers, self.fallback_reason = hf_available()
        self.hf = bool(use_transformers)
        torch.set_num_threads(self.threads)  # the same cores for PyTorch and ktsft
        self.task = CipherTask(stdlib_corpora(), self.sz["B"], self.sz["S"], self.seed)
        self.base = _hf_model(self.sz, self.seed) if self.hf else _stack_model(self.sz, self.seed)
        self.model = None
        self.results = {}

    @property
    def name(self):
        return ("Qwen3-MoE (transformers), experts_implementation='ktsft' + PEFT target_parameters"
                if self.hf else "stack of MoE layers, ktsft apply_lora_experts (no transformers)")

    # ---- 1. the base model: all weights, plain PyTorch, cipher A on source code
    def pretrain(self, steps=DEFAULT_PRETRAIN_STEPS, lr=5e-3):
        torch = self.torch
        impl = None
        if self.hf:
            impl = "grouped_mm"
            try:
                self.base.set_experts_implementation(impl)
            except Exception:  # noqa: BLE001 - older transformers: the eager loop
                impl = "eager"
                self.base.set_experts_implementation(impl)
        opt = torch.optim.AdamW(self.base.parameters(), lr=lr, weight_decay=0.0)
        sched = _cosine(opt, steps)
        bar = _progress(steps, self.progress, "base model")
        t0 = time.perf_counter()
        losses = []
        for _ in range(steps):
            x, y = self.task.batch("code")
            try:
                loss, acc = self.task.loss(self.base, x, y)
                loss.backward()
            except Exception:  # noqa: BLE001
                if impl != "grouped_mm":
                    raise
                impl = "eager"  # grouped_mm not usable here: the eager loop
                self.base.set_experts_implementation(impl)
                opt.zero_grad(set_to_none=True)
                loss, acc = self.task.loss(self.base, x, y)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            losses.append(loss.item())
            bar.set_postfix_str(f"loss {losses[-1]:.3f}  accuracy {acc:.2f}")
            bar.update(1)
        bar.close()
        secs = time.perf_counter() - t0
        ev = self.task.evaluate(self.base)
        a_loss, a_acc = ev["loss_cipher_a"], ev["accuracy_cipher_a"]
        self.results["pretrain"] = dict(
            steps=steps, lr=lr, seconds=secs, experts_implementation=impl, losses=losses,
            heldout_loss_cipher_a=a_loss, heldout_accuracy_cipher_a=a_acc,
            text=self.task.source["code"], characters=len(self.task.text["code"]))
        return self.results["pretrain"]

    # ---- 2. LoRA on the routed experts, on ktsft; everything else frozen
    def attach_lora(self):
        torch = self.torch
        self.base.eval()  # no dropout anywhere; the modes do not differ otherwise
        if self.hf:
            from peft import LoraConfig, get_peft_model

            import ktsft.integrations.transformers as kti

            base = self.base
            base.set_experts_implementation("ktsft")
            kti.configure(base, dtype=self.dtype, threads=self.threads)
            torch.manual_seed(self.seed + 4)
            self.model = get_peft_model(base, LoraConfig(
                r=self.rank, lora_alpha=self.alpha, lora_dropout=0.0,
                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
        else:
            from .integrations.transformers import apply_lora_experts

            self._eager_src = copy.deepcopy(self.base)  # apply_lora_experts releases the originals
            torch.manual_seed(self.seed + 4)
            self.model = apply_lora_experts(self.base, r=self.rank, alpha=self.alpha,
                                            dtype=self.dtype, threads=self.threads)
        self.base = None
        self.model.train()
        m = self.model
        n_lora = sum(p.numel() for p in m.parameters() if p.requires_grad)
        n_frozen = sum(p.numel() for p in m.parameters() if not p.requires_grad)
        if not self.hf:
            from .torch import LoRAExperts

            n_frozen += sum(3 * x.num_experts * x.hidden_size * x.intermediate_size
                            for x in m.modules() if isinstance(x, LoRAExperts))
        self.results["parameters"] = dict(trainable_lora=n_lora, frozen=n_frozen)
        return m

    def _eager_twin(self, compute):
        """A copy of the fine-tuned model with eager PyTorch experts: compute
        "fp32" (expert weights upcast from their storage values: the oracle)
        or "bf16" (bf16 weights, bf16 expert compute: the stock bf16 path)."""
        torch = self.torch
        if self.hf:
            import ktsft.integrations.transformers as kti

            twin = copy.deepcopy(self.model)
            twin.base_model.model.set_experts_implementation("eager")
            if compute == "fp32":
                kti.configure(twin, dtype="fp32")
            else:
                for ex in _experts_modules(twin):
                    ex.to(torch.bfloat16)
                    ex.register_forward_pre_hook(
                        lambda mod, a: (a[0].to(torch.bfloat16), a[1], a[2].to(torch.bfloat16)))
                    ex.register_forward_hook(lambda mod, a, o: o.float())
            return twin
        from .integrations.transformers import (EagerHFLoRAExperts, apply_lora_experts,
                                                load_lora_state_dict, lora_state_dict)

        twin = apply_lora_experts(copy.deepcopy(self._eager_src), r=self.rank, alpha=self.alpha,
                                  dtype=self.dtype, backend="eager")
        load_lora_state_dict(twin, lora_state_dict(self.model))
        if compute == "fp32":
            for m in twin.modules():
                if isinstance(m, EagerHFLoRAExperts):
                    for n in ("w_gate", "w_up", "w_down"):
                        setattr(m, n, getattr(m, n).float())
                    m.act_dtype = torch.float32
        twin.train()
        return twin

    # ---- 3. held-out loss and accuracy
    def evaluate(self, label):
        m = self.model if self.model is not None else self.base
        r = self.task.evaluate(m)
        r.update(characters=int(self.task.heldout_c.numel()),
                 sample_output=decode(self.task.transliterate(m, self.task.heldout_c[0]).tolist()))
        self.results.setdefault("heldout", {})[label] = r
        if label == "after":
            self.results["seconds_until_trained"] = time.perf_counter() - self._t_start
        return r

    # ---- 4. the fine-tune
    def finetune(self, steps=DEFAULT_STEPS, lr=5e-3, eval_every=None):
        torch = self.torch
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = _cosine(opt, steps)
        eval_every = eval_every or max(1, steps // 12)
        curve = dict(train_loss=[], train_acc=[], step_seconds=[], eval_steps=[0],
                     heldout_loss=[], heldout_acc=[], heldout_acc_a=[])
        before = self.results.get("heldout", {}).get("before")
        if before is None:
            before = self.evaluate("before")
        curve["heldout_loss"].append(before["loss"])
        curve["heldout_acc"].append(before["accuracy"])
        curve["heldout_acc_a"].append(before["accuracy_cipher_a"])
        tokens = self.sz["B"] * self.sz["S"]
        bar = _progress(steps, self.progress, "expert LoRA")
        ema = None
        t0 = time.perf_counter()
        for step in range(1, steps + 1):
            x, y = self.task.batch("train")
            ts = time.perf_counter()
            loss, acc = self.task.loss(self.model, x, y)
            loss.backward()
            opt.step()  # in place: the kernels read the parameters, no copy
            opt.zero_grad(set_to_none=True)
            sched.step()
            dt = time.perf_counter() - ts
            ema = dt if ema is None else 0.9 * ema + 0.1 * dt
            curve["train_loss"].append(loss.item())
            curve["train_acc"].append(acc)
            curve["step_seconds"].append(dt)
            if step % eval_every == 0 or step == steps:
                ev = self.task.evaluate(self.model)
                curve["eval_steps"].append(step)
                curve["heldout_loss"].append(ev["loss"])
                curve["heldout_acc"].append(ev["accuracy"])
                curve["heldout_acc_a"].append(ev["accuracy_cipher_a"])
            bar.set_postfix_str(f"loss {curve['train_loss'][-1]:.3f}  held-out accuracy "
                                f"{curve['heldout_acc'][-1]:.2f}  {tokens / ema:,.0f} tok/s")
            bar.update(1)
        bar.close()
        self.results["finetune"] = dict(steps=steps, lr=lr, seconds=time.perf_counter() - t0,
                                        tokens_per_step=tokens, text=self.task.source["train"],
                                        characters=len(self.task.text["train"]), curve=curve)
        return self.results["finetune"]

    # ---- 5. ktsft against the eager experts: same batch, interleaved
    def time_steps(self, rounds=6):
        """Forward + backward of one batch (the optimizer step is the same
        for every variant), in rounds ktsft, eager, [grouped_mm], ktsft, ...
        after one warm-up each; medians, and the load measured meanwhile."""
        torch = self.torch
        variants = {"ktsft": self.model, "eager": self._eager_twin(self.dtype)}
        if self.hf:
            gm = self._eager_twin(self.dtype)
            gm.base_model.model.set_experts_implementation("grouped_mm")
            variants["grouped_mm"] = gm
        x, y = self.task.batch("train")

        def step(m):
            t0 = time.perf_counter()
            loss, _ = self.task.loss(m, x, y)
            loss.backward()
            m.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        for name, m in list(variants.items()):  # warm-up (and drop what does not run here)
            try:
                step(m)
            except Exception as e:  # noqa: BLE001
                if name == "ktsft":
                    raise
                self.say(f"  ({name} experts do not run here: {type(e).__name__}; skipped)")
                del variants[name]
        gauge = OtherLoad().start()
        times = {n: [] for n in variants}
        for _ in range(rounds):
            for n, m in variants.items():
                times[n].append(step(m))
        others, cores = gauge.stop(), usable_cores()
        reasons = verdict(others, self.loadavg_at_start, cores, times)
        load = {"other_processes_cores": others, "cores": cores, "threads": self.threads,
                "loadavg_at_start": self.loadavg_at_start, "loadavg_after": loadavg(),
                "busy": bool(reasons), "note": "; ".join(reasons) or "quiet",
                "text": _load_text(others, cores)}
        med = {n: statistics.median(t) for n, t in times.items()}
        res = {"rounds": rounds, "tokens": int(x.numel()), "threads": self.threads,
               "ms": {n: round(v * 1e3, 2) for n, v in med.items()},
               "ms_all": {n: [round(v * 1e3, 2) for v in t] for n, t in times.items()},
               "load": load, "speedup": {}, "speedup_withheld": None}
        for n in variants:
            if n == "ktsft":
                continue
            ratio = statistics.median(b / a for a, b in zip(times["ktsft"], times[n]))
            if load["busy"]:
                res.setdefault("ratio_measured_under_load", {})[n] = round(ratio, 2)
            else:
                res["speedup"][n] = round(ratio, 2)
        if load["busy"]:
            res["speedup"] = None
            res["speedup_withheld"] = (f"machine busy during the timing: {load['note']}; "
                                       "the times swing with the load, rerun when it is quiet")
        del variants
        self.results["timing"] = res
        return res

    # ---- 6. gradients of one step against eager oracles
    def check_gradients(self, batch=None):
        """One forward + backward of the whole model on one batch, three ways:
        ktsft, the fp32 eager oracle (same storage-rounded weights and LoRA)
        and, for bf16, eager bf16 PyTorch.  Each eager twin's experts get the
        top-k ids the ktsft model chose (bf16 rounding may flip a near-tie of
        a router).

        The bf16 bar comes from the bf16 error model, measured on this step:
        the gradient's sensitivity is the median error of the fp32 oracle
        with every experts layer's input and output multiplied by
        1 + U_BF16 * xi (xi uniform in [-1, 1]: one bf16 rounding each),
        and so are the gradients flowing into its output and out of its input
        (ROUNDINGS_PER_LAYER roundings per layer, as ktsft's), over
        PERTURBED_TRIALS trials (the median is reported as the sensitivity).
        ktsft may be off by at most SENSITIVITY_FACTOR times the worst trial,
        and never needs to beat the first-order floor ROUNDINGS_PER_LAYER *
        layers * U_BF16.  A short
        run's gradients are larger and less cancelled than a long run's, so a
        fixed bar fails there while this one scales with the step.  fp32:
        FP32_BAR.  Then every experts layer alone against a float64 oracle on
        the inputs it saw (bar ROUNDINGS_PER_LAYER * U_BF16, or FP32_BAR)."""
        torch = self.torch
        x, y = self.task.batch("train") if batch is None else batch
        kt_mods = _experts_modules(self.model)
        seen = {}
        hooks = [m.register_forward_hook(
            lambda mod, a, o, i=i: seen.setdefault(i, tuple(t.detach() for t in a)) and None)
            for i, m in enumerate(kt_mods)]
        self.model.zero_grad(set_to_none=True)
        try:
            lk, _ = self.task.loss(self.model, x, y)
            lk.backward()
        finally:
            for h in hooks:
                h.remove()
        g_k = _lora_grads(self.model)
        self.model.zero_grad(set_to_none=True)

        def replay(twin):
            twin.zero_grad(set_to_none=True)  # each replay's own gradients, not a sum
            mods = _experts_modules(twin)
            hs = [m.register_forward_pre_hook(lambda mod, a, i=i: (a[0], seen[i][1], a[2]))
                  for i, m in enumerate(mods)]
            # run after the twin's own pre-hooks (the bf16 casts): prepend=False is the default
            try:
                loss, _ = self.task.loss(twin, x, y)
                loss.backward()
            finally:
                for h in hs:
                    h.remove()
            return loss.item(), _lora_grads(twin)

        twin32 = self._eager_twin("fp32")
        l32, g_32 = replay(twin32)
        flat = lambda g: np.concatenate([a.ravel() for _, a in g])  # noqa: E731
        err_k = _rel(flat(g_k), flat(g_32))
        per_tensor = {n: _rel(a, b) for (n, a), (_, b) in zip(g_k, g_32)}
        L = len(kt_mods)
        res = {"loss_rel_err": _rel(lk.item(), l32), "grad_rel_err": err_k,
               "grad_rel_err_worst_tensor": max(per_tensor.values()), "tensors": len(g_k),
               "layers": L}
        if self.dtype == "bf16":
            # the sensitivity of this gradient to bf16-sized errors where ktsft rounds:
            # the oracle again with every experts layer's input and output, and the
            # gradients of both, multiplied by 1 + U_BF16 * xi, xi uniform in [-1, 1]
            # (independent per element and trial)
            trials = []
            for t in range(PERTURBED_TRIALS):
                gen = torch.Generator().manual_seed(1000 * self.seed + t)

                def noise(v, gen=gen):
                    xi = torch.rand(v.shape, generator=gen, dtype=torch.float32) * 2 - 1
                    return v * (1 + U_BF16 * xi).to(v.dtype)

                def pre(mod, a):
                    x = noise(a[0])
                    if x.requires_grad:  # dx, as it leaves the layer
                        x.register_hook(noise)
                    return (x,) + tuple(a[1:])

                def post(mod, a, o):
                    if o.requires_grad:  # dO, before it enters the layer
                        o.register_hook(noise)
                    return noise(o)

                mods = _experts_modules(twin32)
                hs = [m.register_forward_pre_hook(pre) for m in mods]
                hs += [m.register_forward_hook(post) for m in mods]
                try:
                    trials.append(_rel(flat(replay(twin32)[1]), flat(g_32)))
                finally:
                    for h in hs:
                        h.remove()
            l16, g_16 = replay(self._eager_twin("bf16"))
            err_e = _rel(flat(g_16), flat(g_32))
            floor = ROUNDINGS_PER_LAYER * L * U_BF16
            sens = statistics.median(trials)
            res.update(eager_bf16_grad_rel_err=err_e, eager_bf16_loss_rel_err=_rel(l16, l32),
                       perturbed_grad_rel_err=trials, sensitivity=sens,
                       bar_floor=floor,
                       bar=min(max(SENSITIVITY_FACTOR * max(trials), floor), BAR_CAP))
        else:
            res["bar"] = FP32_BAR
        res["ok"] = err_k <= res["bar"]
        eager32 = None
        if not self.hf:  # the base weights ktsft holds, layer by layer, for the reference
            from .integrations.transformers import EagerHFLoRAExperts

            eager32 = [m for m in self._eager_twin("fp32").modules()
                       if isinstance(m, EagerHFLoRAExperts)]
        res["layers_vs_float64"] = [self._check_layer(m, seen[i], eager32 and eager32[i])
                                    for i, m in enumerate(kt_mods)]
        worst = max(res["layers_vs_float64"], key=lambda r: r["max"])
        res["layer_max_rel_err"], res["layer_bar"] = worst["max"], worst["bar"]
        res["layers_ok"] = all(r["ok"] for r in res["layers_vs_float64"])
        res["ok_all"] = res["ok"] and res["layers_ok"]
        self.results["grad_check"] = res
        return res

    def _check_layer(self, module, inputs, eager_module=None):
        """One experts layer of the ktsft model against float64 on the inputs
        it saw (output, input and routing-weight gradients, the LoRA
        gradients); eager_module: the same layer of the fp32 eager twin (the
        stack model).  bf16 bar: ROUNDINGS_PER_LAYER * U_BF16 (each bf16
        rounding on a path contributes at most U_BF16, to first order); fp32:
        FP32_BAR."""
        torch = self.torch
        hidden, ids, w = inputs
        dO = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(self.seed + 5))
        bar = FP32_BAR if self.dtype == "fp32" else ROUNDINGS_PER_LAYER * U_BF16
        if not self.hf:
            errs = _check_layer_vs_reference(module, eager_module, (hidden, ids, w), dO, torch)
            return {"oracle": "ktsft.reference (float64)", "errors": errs,
                    "max": max(errs.values()), "bar": bar, "ok": max(errs.values()) <= bar}

        def run(mod, dt):
            xi = hidden.detach().to(dt).requires_grad_()
            wi = w.detach().to(dt).requires_grad_()
            mod.zero_grad(set_to_none=True)
            out = mod(xi, ids, wi)
            out.backward(dO.to(dt))
            g = {"out": out.detach(), "grad_input": xi.grad, "grad_routing_weights": wi.grad}
            g.update({"grad_" + n: p.grad for n, p in sorted(mod.named_parameters())
                      if p.requires_grad})
            mod.zero_grad(set_to_none=True)
            return g

        got = run(module, torch.float32)
        oracle = copy.deepcopy(module).double()
        for m in oracle.modules():
            if hasattr(m, "config") and hasattr(m, "gate_up_proj"):
                m.config._experts_implementation = "eager"
        want = run(oracle, torch.float64)
        errs = {k.replace(".default.weight", ""): _rel(got[k].double().numpy(),
                                                       want[k].numpy()) for k in want}
        return {"oracle": "transformers eager experts + PEFT in float64", "errors": errs,
                "max": max(errs.values()), "bar": bar, "ok": max(errs.values()) <= bar}

    # ---- 7. outputs
    def save(self, out):
        os.makedirs(out, exist_ok=True)
        paths = {}
        if self.hf:
            adir = os.path.join(out, "peft_adapter")
            self.model.save_pretrained(adir)  # PEFT's own adapter: loads without ktsft
            paths["peft_adapter"] = adir
        else:
            from .integrations.transformers import save_lora_experts

            paths["adapter"] = save_lora_experts(
                self.model, os.path.join(out, "adapter.safetensors"),
                metadata={"model_size": self.model_size, "dtype": self.dtype,
                          "task": "cipher transliteration (ktsft demo)"})
        ft = self.results.get("finetune")
        if ft:
            paths["loss_png"] = _plot(
                os.path.join(out, "loss.png"), ft["curve"],
                f"ktsft demo: expert LoRA learns cipher B ({self.model_size}, {self.dtype}, "
                f"{'transformers + PEFT' if self.hf else 'no transformers'})")
        self.results["outputs"] = paths
        return paths

    def finish(self, out):
        """Writes the adapter, loss.png and summary.json into `out`; returns
        the summary (the run time and the load during the whole run in it)."""
        paths = self.save(out)
        others, cores = self._gauge.stop(), usable_cores()
        reasons = verdict(others, None, cores, {})
        s = self.summary()
        x0 = self.task.heldout_c[0]
        s.update(steps=self.results.get("finetune", {}).get("steps"),
                 pretrain_steps=self.results.get("pretrain", {}).get("steps"),
                 run_seconds=time.perf_counter() - self._t_start,
                 run_load={"other_processes_cores": others, "cores": cores,
                           "busy": bool(reasons), "note": "; ".join(reasons) or "quiet",
                           "text": _load_text(others, cores)},
                 sample={"text": decode(x0.tolist()), "cipher_b": decode(self.task.key_b[x0].tolist())})
        spath = os.path.join(out, "summary.json")
        with open(spath, "w") as f:
            json.dump(s, f, indent=1)
        paths["summary"] = spath
        return s

    def summary(self):
        h = self.results.get("heldout", {})
        return dict(
            task="cipher transliteration of standard-library text: per character its image "
                 "under cipher B; the base model was trained on cipher A",
            metric=CipherTask.metric,
            heldout_accuracy_before=h.get("before", {}).get("accuracy"),
            heldout_accuracy_after=h.get("after", {}).get("accuracy"),
            heldout_loss_before=h.get("before", {}).get("loss"),
            heldout_loss_after=h.get("after", {}).get("loss"),
            model=self.name, transformers=self.hf, fallback_reason=self.fallback_reason,
            model_size=self.model_size, size=self.sz, vocabulary=V, dtype=self.dtype,
            threads=self.threads, seed=self.seed, rank=self.rank, alpha=self.alpha,
            text=self.task.source, **self.results)


def _check_layer_vs_reference(module, eager_module, inputs, dO, torch):
    """One LoRAExperts layer against ktsft.reference (float64) on the inputs
    it saw; the base weights are those ktsft holds (bf16-rounded in bf16
    mode), read from the eager twin."""
    from . import reference

    x, ids, w = (t.detach() for t in inputs)
    x = x.float().requires_grad_()
    w = w.float().requires_grad_()
    for p in module.lora_parameters():
        p.grad = None
    out = module(x, ids, w)
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


# ---------------------------------------------------------------------------
# the whole run
# ---------------------------------------------------------------------------
def run(model_size="small", steps=DEFAULT_STEPS, pretrain_steps=DEFAULT_PRETRAIN_STEPS,
        threads=None, dtype="bf16", out="ktsft-demo-out", rank=16, alpha=32.0, lr=5e-3,
        pretrain_lr=5e-3, seed=0, timing_rounds=6, use_transformers=None, progress=True,
        verbose=True, t_start=None):
    """Runs the demo; returns the summary dict (also written to out/summary.json).
    PyTorch's thread count is set to `threads` for the run (ktsft and PyTorch
    on the same cores: a fair timing) and restored afterwards."""
    import torch

    prev_threads = torch.get_num_threads()
    try:
        d = Demo(model_size, dtype=dtype, threads=threads, rank=rank, alpha=alpha, seed=seed,
                 use_transformers=use_transformers, progress=progress, verbose=verbose,
                 t_start=t_start)
        say, sz, task = d.say, d.sz, d.task
        say(f"ktsft demo: {d.name}")
        if d.fallback_reason and use_transformers is None:
            say(f"  (no transformers path: {d.fallback_reason})")
        say(f"  model {model_size}: {sz['L']} MoE layers, H={sz['H']}, {sz['E']} experts of "
            f"I={sz['I']}, top-{sz['k']}; {V} characters; {d.threads} threads")
        say(f"  1. base model, all weights in PyTorch: cipher A on {task.source['code']} "
            f"({len(task.text['code']):,} characters), {pretrain_steps} steps")
        pre = d.pretrain(pretrain_steps, pretrain_lr)
        say(f"     {pre['seconds']:.1f} s; held-out cipher-A accuracy "
            f"{pre['heldout_accuracy_cipher_a']:.3f}")
        d.attach_lora()
        p = d.results["parameters"]
        say(f"  2. LoRA r={rank} on the routed experts, on ktsft ({dtype} expert weights): "
            f"{p['trainable_lora'] / 1e6:.2f} M trainable, {p['frozen'] / 1e6:.2f} M frozen")
        d.evaluate("before")
        say(f"  3. fine-tune the expert LoRA: cipher B on {task.source['train']} "
            f"({len(task.text['train']):,} characters), {steps} steps x "
            f"{sz['B'] * sz['S']} characters, AdamW lr {lr}")
        d.finetune(steps, lr)
        d.evaluate("after")
        d.time_steps(timing_rounds)
        d.check_gradients()
        s = d.finish(out)
        if verbose:
            report(s)
        return s
    finally:
        torch.set_num_threads(prev_threads)


_LABELS = {"ktsft": "ktsft", "eager": "eager PyTorch experts",
           "grouped_mm": "transformers grouped_mm"}


def report(s, say=print):
    """The demo's closing report, from its summary (run() or Demo.finish())."""
    b, a = s["heldout"]["before"], s["heldout"]["after"]
    ft, tm, gc, load = s["finetune"], s["timing"], s["grad_check"], s["run_load"]
    say(f"\nheld-out ({s['text']['heldout']}; {b['characters']:,} characters):")
    say(f"  cipher-B accuracy {b['accuracy']:.3f} -> {a['accuracy']:.3f}, loss "
        f"{b['loss']:.3f} -> {a['loss']:.3f}  (the base task, cipher A: accuracy "
        f"{b['accuracy_cipher_a']:.3f} -> {a['accuracy_cipher_a']:.3f})")
    say(f"  text      {s['sample']['text']}")
    say(f"  cipher B  {s['sample']['cipher_b']}")
    say(f"  before    {b['sample_output']}")
    say(f"  after     {a['sample_output']}")
    say(f"fine-tune: {ft['steps']} steps in {ft['seconds']:.1f} s; whole run "
        f"{s['run_seconds']:.1f} s (machine during the run: {load['text']}"
        + (f"; BUSY: {load['note']}" if load["busy"] else "") + ")")
    say(f"step time, forward + backward of the same {tm['tokens']} characters, "
        f"{tm['rounds']} interleaved rounds, {tm['threads']} threads:")
    for n, ms in tm["ms"].items():
        extra = ""
        if n != "ktsft" and tm["speedup"]:
            extra = f"  -> ktsft {tm['speedup'][n]:.1f}x faster"
        say(f"  {_LABELS[n]:24s} {ms:8.1f} ms{extra}")
    say(f"  machine during the timing: {tm['load']['text']}"
        + (f"\n  speedup withheld: {tm['speedup_withheld']}" if tm["speedup_withheld"]
           else " (quiet)"))
    if s["dtype"] == "bf16":
        say(f"gradient check, one step of the whole model vs the fp32 eager oracle (same "
            f"weights, LoRA and routing), {gc['tensors']} LoRA gradients: ktsft bf16 "
            f"{gc['grad_rel_err']:.1e} (eager bf16 PyTorch {gc['eager_bf16_grad_rel_err']:.1e}); "
            f"bf16 sensitivity of this step {gc['sensitivity']:.1e} (median of "
            f"{len(gc['perturbed_grad_rel_err'])} bf16-sized perturbations, worst "
            f"{max(gc['perturbed_grad_rel_err']):.1e}); bar max({SENSITIVITY_FACTOR:g} x "
            f"worst, {ROUNDINGS_PER_LAYER} x "
            f"{gc['layers']} layers x 2^-8) = {gc['bar']:.1e}: {'ok' if gc['ok'] else 'FAIL'}")
    else:
        say(f"gradient check vs the fp32 eager oracle: {gc['grad_rel_err']:.1e}, bar "
            f"{gc['bar']:g}: {'ok' if gc['ok'] else 'FAIL'}")
    say(f"gradient check, each of the {gc['layers']} experts layers alone vs "
        f"{gc['layers_vs_float64'][0]['oracle']}: max rel. error {gc['layer_max_rel_err']:.1e}, "
        f"bar {gc['layer_bar']:.1e}: {'ok' if gc['layers_ok'] else 'FAIL'}")
    paths = s["outputs"]
    say("wrote " + ", ".join(str(v) for v in paths.values() if v)
        + ("" if paths.get("loss_png") else " (no matplotlib: no plot)"))


NO_TORCH = """python -m ktsft demo needs PyTorch, which is not installed here.
Install the CPU build (no CUDA download):
    pip install torch --index-url https://download.pytorch.org/whl/cpu
and, for the Hugging Face model (optional; without them the demo uses a stack of MoE layers):
    pip install "transformers>=5" peft
Optional: tqdm (progress bars), matplotlib (loss.png)."""


def main(argv=None):
    t_start = time.perf_counter()
    ap = argparse.ArgumentParser(
        prog="python -m ktsft demo", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-size", choices=sorted(SIZES), default="small",
                    help="; ".join(f"{k}: {v}" for k, v in SIZE_HELP.items()))
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                    help=f"fine-tuning steps of the expert LoRA (default {DEFAULT_STEPS})")
    ap.add_argument("--pretrain-steps", type=int, default=DEFAULT_PRETRAIN_STEPS,
                    help=f"steps of the base model on cipher A (default {DEFAULT_PRETRAIN_STEPS})")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for ktsft and PyTorch (default: the usable cores)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                    help="storage of the frozen expert weights during the fine-tune (LoRA is "
                         "fp32 either way; default bf16)")
    ap.add_argument("--out", default="ktsft-demo-out",
                    help="output directory: summary.json, loss.png, the adapter "
                         "(default ./ktsft-demo-out)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    ap.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (default 32)")
    ap.add_argument("--lr", type=float, default=5e-3,
                    help="AdamW learning rate of the fine-tune (default 5e-3)")
    ap.add_argument("--pretrain-lr", type=float, default=5e-3,
                    help="AdamW learning rate of the base model (default 5e-3)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the model, the ciphers and the batches (default 0)")
    ap.add_argument("--timing-rounds", type=int, default=6,
                    help="interleaved rounds of the ktsft-vs-eager timing (default 6)")
    ap.add_argument("--no-transformers", action="store_true",
                    help="use the stack-of-MoE-layers model even if transformers is installed")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    try:
        import torch  # noqa: F401
    except ImportError:
        print(NO_TORCH, file=sys.stderr)
        raise SystemExit(2)
    s = run(model_size=args.model_size, steps=args.steps, pretrain_steps=args.pretrain_steps,
            threads=args.threads, dtype=args.dtype, out=args.out, rank=args.rank,
            alpha=args.alpha, lr=args.lr, pretrain_lr=args.pretrain_lr, seed=args.seed,
            timing_rounds=args.timing_rounds,
            use_transformers=False if args.no_transformers else None,
            progress=not args.no_progress, t_start=t_start)
    if not s["grad_check"]["ok_all"]:
        raise SystemExit("gradient check FAILED")


if __name__ == "__main__":
    main()
