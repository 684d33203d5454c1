"""Hugging Face transformers MoE models with ktsft routed experts.

    from ktsft.integrations.transformers import apply_lora_experts
    model = AutoModelForCausalLM.from_pretrained(..., dtype=torch.bfloat16)
    apply_lora_experts(model, r=16, alpha=32, dtype="bf16")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

Every routed-expert module of the model is replaced by an ``HFLoRAExperts``
(a ``ktsft.torch.LoRAExperts``) holding that layer's frozen expert weights in
ktsft and six LoRA ``nn.Parameter``s.  The router, attention, shared experts
and everything else stay PyTorch: the MoE block still computes its top-k ids
and weights exactly as before and hands them to the experts.

Layouts understood:

- transformers >= 5: a fused experts module (``Qwen3MoeExperts``,
  ``Qwen2MoeExperts``, ``OlmoeExperts``, ``MixtralExperts``,
  ``DeepseekV3Experts``, ...) with parameters ``gate_up_proj`` [E, 2I, H]
  (gate rows first; interleaved or transposed variants are read too) and
  ``down_proj`` [E, H, I], called as ``experts(hidden, top_k_index,
  top_k_weights)``.  The module is swapped; the block's forward is untouched.
- transformers 4.x: an ``nn.ModuleList`` of per-expert MLPs
  (``gate_proj``/``up_proj``/``down_proj``, or Mixtral's ``w1``/``w3``/``w2``)
  looped over by the block.  The block's forward is replaced by the same
  router math (softmax, top-k, ``norm_topk_prob``; Mixtral always normalises;
  Qwen2-MoE's sigmoid-gated shared expert) followed by one ktsft call; for
  DeepSeek-V3 only its ``moe(hidden, topk_indices, topk_weights)`` method is
  replaced and its own router is kept.

Needs torch; transformers itself is not imported here (duck typing), so any
model built on these layouts works.
"""
from __future__ import annotations

import functools
import math
import os
import re
from collections import OrderedDict

import torch
import torch.nn.functional as F

from ..eager import eager_moe_forward
from ..torch import PARAM_NAMES, LoRAExperts, _check_call
from .hf_experts import is_silu, mask_sentinel
from .shared_experts import overlap_shared_experts

__all__ = ["HFLoRAExperts", "EagerHFLoRAExperts", "apply_lora_experts", "find_expert_modules",
           "lora_state_dict", "load_lora_state_dict", "load_lora_experts", "save_lora_experts",
           "export_adapter", "configure", "ktsft_experts_forward"]

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class HFLoRAExperts(LoRAExperts):
    """``LoRAExperts`` with the call signature of a transformers experts
    module: ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights
    [T, k]) -> [T, H]`` in the dtype of hidden_states.

    The module ignores ``model.to(device / dtype)``: its base weights live in
    ktsft (CPU memory) and the kernels read the float32 LoRA parameters in
    place, so they stay float32 on the CPU.  Inputs on another device are
    copied to the host and the result is returned on their device.

    ``state_dict()`` holds the frozen base weights too, under the keys of
    the experts module this one replaced (``checkpoint_layout``), besides
    the six LoRA parameters: transformers-5 fused experts ``gate_up_proj``
    [E, 2I, H] (gate rows first) and ``down_proj`` [E, H, I]; a 4.x
    ModuleList ``{e}.gate_proj.weight``, ... (``w1``/``w3``/``w2`` under
    Mixtral's ``block_sparse_moe``).  So ``model.save_pretrained(dir)``
    writes a checkpoint that a stock model loads with its own experts (the
    LoRA keys are reported as unused and ignored); ``gate_up_proj`` is
    assembled from ktsft's gate and up arrays on each call (a transient
    copy), ``down_proj`` and the per-expert weights are views.
    ``load_state_dict`` reads base keys, when present, into fresh storage
    (they are optional: a state dict without them leaves the base as is).
    int8/int4 storage (not exact) writes no base keys.

    Copies (``copy.deepcopy``, pickle, ``torch.save``): see LoRAExperts."""

    #: the checkpoint layout of the replaced experts module, a dict:
    #: ``{"kind": "fused", "transposed": bool, "concatenated": bool}`` or
    #: ``{"kind": "modulelist", "names": (gate, up, down)}``.
    #: apply_lora_experts sets it from the module it replaces (its
    #: is_transposed / is_concatenated, or the per-expert MLPs' names).
    #: None (a module built directly): fused (transformers >= 5, gate rows
    #: first, not transposed) or, under transformers 4.x, a ModuleList with
    #: gate_proj/up_proj/down_proj (w1/w3/w2 under ``block_sparse_moe``).
    checkpoint_layout = None

    def forward(self, hidden_states, top_k_index, top_k_weights):
        _check_call(hidden_states, top_k_index, top_k_weights, self.hidden_size, self.top_k,
                    self.num_experts, ("hidden_states", "top_k_index", "top_k_weights"),
                    sentinel=True)
        top_k_index, top_k_weights = mask_sentinel(top_k_index, top_k_weights, self.num_experts)
        return super().forward(hidden_states, top_k_index, top_k_weights)

    def _apply(self, fn, recurse=True):  # keep the LoRA parameters fp32 on the CPU
        return self

    # ---- the base weights in state_dict ------------------------------------
    @staticmethod
    def _transformers_major() -> int:
        try:
            from importlib.metadata import version

            return int(version("transformers").split(".")[0])
        except Exception:  # noqa: BLE001 - not installed: a duck-typed fused model
            return 5

    def _layout(self, prefix):
        lay = self.checkpoint_layout
        if lay is not None:
            return dict(lay)
        if self._transformers_major() < 5:
            names = ("w1", "w3", "w2") if "block_sparse_moe" in prefix else _MLP_NAMES[0]
            return {"kind": "modulelist", "names": names}
        return {"kind": "fused", "transposed": False, "concatenated": True}

    def _checkpoint_keys(self, prefix):
        lay = self._layout(prefix)
        if lay["kind"] == "fused":
            return [f"{prefix}gate_up_proj", f"{prefix}down_proj"]
        return [f"{prefix}{e}.{n}.weight" for e in range(self.num_experts) for n in lay["names"]]

    def _logical_base(self):
        """(gate, up, down) as torch tensors in logical expert order: views of
        ktsft's arrays where the slot map is the identity; None for int8/int4
        or before load_weights."""
        import numpy as np

        base = self.wrapper._base
        if base is None or self.wrapper.dtype not in _DTYPES:
            return None
        arrays, slot, _ = base
        bf16 = self.wrapper.dtype == "bf16"
        out = [torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if bf16 else
               torch.from_numpy(a) for a in arrays]
        if not np.array_equal(slot, np.arange(len(slot))):
            idx = torch.from_numpy(np.asarray(slot, np.int64))
            out = [t.index_select(0, idx) for t in out]
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        base = self._logical_base()
        if base is None:
            return
        gate, up, down = base
        lay = self._layout(prefix)
        if lay["kind"] == "fused":
            if lay.get("concatenated", True):
                gu = torch.cat([gate, up], dim=1)
            else:  # interleaved rows: gate0, up0, gate1, up1, ...
                gu = torch.stack([gate, up], dim=2).flatten(1, 2)
            if lay.get("transposed", False):  # [E, H, 2I], [E, I, H]
                gu, down = gu.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
            destination[f"{prefix}gate_up_proj"] = gu
            destination[f"{prefix}down_proj"] = down
        else:
            g, u, d = lay["names"]
            for e in range(self.num_experts):
                destination[f"{prefix}{e}.{g}.weight"] = gate[e]
                destination[f"{prefix}{e}.{u}.weight"] = up[e]
                destination[f"{prefix}{e}.{d}.weight"] = down[e]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        keys = self._checkpoint_keys(prefix)
        found = [k for k in keys if k in state_dict]
        if found:
            if len(found) < len(keys):
                miss = [k for k in keys if k not in state_dict]
                error_msgs.append(f"{prefix[:-1]}: base weights incomplete, missing {miss[:3]}"
                                  + (f" and {len(miss) - 3} more" if len(miss) > 3 else ""))
            else:
                try:
                    self._load_base({k[len(prefix):]: state_dict[k] for k in keys}, prefix)
                except (ValueError, TypeError, NotImplementedError) as e:
                    error_msgs.append(f"{prefix[:-1]}: {e}")
            for k in found:
                del state_dict[k]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @torch.no_grad()
    def _load_base(self, t, prefix):
        if self.wrapper.dtype not in _DTYPES:
            raise NotImplementedError(f"base weights cannot be loaded into {self.wrapper.dtype} "
                                      "storage from a state dict")
        store = _DTYPES[self.wrapper.dtype]
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        lay = self._layout(prefix)
        if lay["kind"] == "fused":
            gu, dn = torch.as_tensor(t["gate_up_proj"]), torch.as_tensor(t["down_proj"])
            if lay.get("transposed", False):
                gu, dn = gu.transpose(1, 2), dn.transpose(1, 2)
            if tuple(gu.shape) != (E, 2 * I, H) or tuple(dn.shape) != (E, H, I):
                raise ValueError(f"gate_up_proj {tuple(gu.shape)} / down_proj {tuple(dn.shape)}, "
                                 f"expected {(E, 2 * I, H)} / {(E, H, I)} (transposed: "
                                 f"{bool(lay.get('transposed', False))})")
            if lay.get("concatenated", True):
                g_src, u_src = gu[:, :I], gu[:, I:]
            else:
                g_src, u_src = gu[:, 0::2], gu[:, 1::2]
        else:
            g, u, d = lay["names"]
            g_src = torch.stack([torch.as_tensor(t[f"{e}.{g}.weight"]) for e in range(E)])
            u_src = torch.stack([torch.as_tensor(t[f"{e}.{u}.weight"]) for e in range(E)])
            dn = torch.stack([torch.as_tensor(t[f"{e}.{d}.weight"]) for e in range(E)])
            if tuple(g_src.shape) != (E, I, H) or tuple(dn.shape) != (E, H, I):
                raise ValueError(f"per-expert weights {tuple(g_src.shape[1:])} / "
                                 f"{tuple(dn.shape[1:])}, expected {(I, H)} / {(H, I)}")
        fresh = []  # own storage: the old arrays may be shared with copies of this module
        for src, shape in ((g_src, (E, I, H)), (u_src, (E, I, H)), (dn, (E, H, I))):
            dst = torch.empty(shape, dtype=store)
            dst.copy_(src)
            fresh.append(dst)
        self.load_weights(*fresh)


class EagerHFLoRAExperts(torch.nn.Module):
    """The same LoRA experts in plain PyTorch (``ktsft.eager``): a loop over
    the experts with tokens, base weights as buffers in the storage dtype,
    fp32 LoRA held per expert (``gate_lora_a.<e>``, ... as a ModuleList of
    experts would).  The baseline for timings and the oracle for tests."""

    def __init__(self, gate_proj, up_proj, down_proj, r=16, alpha=32.0, dtype="bf16",
                 use_rslora=False, lora_dropout=0.0):
        super().__init__()
        from ..validation import check_dropout

        self.lora_dropout = check_dropout(lora_dropout, "lora_dropout")
        E, I, H = gate_proj.shape
        self.num_experts, self.hidden_size, self.intermediate_size = E, H, I
        self.r, self.alpha, self.use_rslora = int(r), float(alpha), bool(use_rslora)
        self.act_dtype = _DTYPES[dtype]
        for n, w in (("w_gate", gate_proj), ("w_up", up_proj), ("w_down", down_proj)):
            self.register_buffer(n, w.detach().to(self.act_dtype).contiguous())
        shapes = {"gate_lora_a": (r, H), "gate_lora_b": (I, r), "up_lora_a": (r, H),
                  "up_lora_b": (I, r), "down_lora_a": (r, I), "down_lora_b": (H, r)}
        for n in PARAM_NAMES:
            setattr(self, n, torch.nn.ParameterList(
                torch.nn.Parameter(torch.zeros(shapes[n])) for _ in range(E)))
        with torch.no_grad():  # PEFT init, same draws and order as LoRAExperts
            for n in PARAM_NAMES:
                if n.endswith("_a"):
                    for p in getattr(self, n):
                        torch.nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        top_k_index, top_k_weights = mask_sentinel(top_k_index, top_k_weights, self.num_experts)
        lora = [list(getattr(self, n)) for n in PARAM_NAMES]
        out = eager_moe_forward(hidden_states, top_k_index, top_k_weights, self.w_gate, self.w_up,
                                self.w_down, lora, self.scaling, self.act_dtype,
                                self.lora_dropout if self.training else None)
        return out.to(hidden_states.dtype)


# ---------------------------------------------------------------------------
# finding the experts and reading their weights
# ---------------------------------------------------------------------------
_MLP_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def _silu_or_unset(act) -> bool:
    """is_silu, except that a module without an act_fn attribute (None) is
    taken as SwiGLU: the model's own code decides its activation."""
    return act is None or is_silu(act)


def _fused_kind(m):
    gu, dn = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    return (isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3
            and dn.dim() == 3)


def _mlp_names(mlp):
    for names in _MLP_NAMES:
        if all(isinstance(getattr(mlp, n, None), torch.nn.Linear) for n in names):
            return names
    return None


def _legacy_kind(m):
    return (isinstance(m, torch.nn.ModuleList) and len(m) > 0
            and all(_mlp_names(e) is not None for e in m))


def find_expert_modules(model):
    """[(qualified name, parent block, attribute name, experts module,
    layout)] for every routed-experts module; layout is "fused" or
    "modulelist".  Shared experts (a single MLP, not a set) are not matched."""
    found = []
    for name, block in model.named_modules():
        ex = getattr(block, "experts", None)
        if ex is None or not isinstance(ex, torch.nn.Module):
            continue
        qual = f"{name}.experts" if name else "experts"
        if isinstance(ex, (LoRAExperts, EagerHFLoRAExperts)):
            raise RuntimeError(f"{qual} is already replaced (apply_lora_experts ran twice?)")
        if _fused_kind(ex):
            found.append((qual, block, "experts", ex, "fused"))
        elif _legacy_kind(ex):
            found.append((qual, block, "experts", ex, "modulelist"))
    return found


def _layer_index(qual, fallback):
    m = re.search(r"layers\.(\d+)\.", qual)
    return int(m.group(1)) if m else fallback


def _fused_weights(ex, store):
    """gate [E, I, H], up [E, I, H], down [E, H, I] in `store` dtype, C-contiguous.
    down_proj is returned as is (no copy) when it already is that; the
    gate/up halves of gate_up_proj are strided views, so they get one copy."""
    if getattr(ex, "has_bias", False) or any(
            isinstance(getattr(ex, n, None), torch.Tensor) for n in ("gate_up_proj_bias",
                                                                      "down_proj_bias")):
        raise NotImplementedError(f"{type(ex).__name__}: experts with biases are not supported")
    if getattr(ex, "has_gate", True) is False:
        raise NotImplementedError(f"{type(ex).__name__}: experts without a gate projection "
                                  "are not supported (ktsft computes down(silu(gate x) * up x))")
    if not _silu_or_unset(getattr(ex, "act_fn", None)):
        raise NotImplementedError(f"{type(ex).__name__}: activation {getattr(ex, 'act_fn')!r} "
                                  "is not SiLU")
    gu, dn = ex.gate_up_proj.detach(), ex.down_proj.detach()
    if getattr(ex, "is_transposed", False):  # [E, H, 2I], [E, I, H]
        gu, dn = gu.transpose(1, 2), dn.transpose(1, 2)
    E, I2, H = gu.shape
    if I2 % 2 or dn.shape != (E, H, I2 // 2):
        raise ValueError(f"{type(ex).__name__}: gate_up_proj {tuple(gu.shape)} and down_proj "
                         f"{tuple(dn.shape)} are not [E, 2I, H] and [E, H, I]")
    I = I2 // 2
    if getattr(ex, "is_concatenated", True):
        g_src, u_src = gu[:, :I], gu[:, I:]
    else:  # interleaved rows: gate0, up0, gate1, up1, ...
        g_src, u_src = gu[:, 0::2], gu[:, 1::2]
    gate = torch.empty((E, I, H), dtype=store)
    gate.copy_(g_src)
    up = torch.empty((E, I, H), dtype=store)
    up.copy_(u_src)
    down = dn if (dn.dtype == store and dn.is_contiguous() and dn.device.type == "cpu") else \
        dn.to(device="cpu", dtype=store).contiguous()
    return gate, up, down


def _modulelist_weights(ex, store):
    names = _mlp_names(ex[0])
    for e in ex:
        if any(getattr(e, n).bias is not None for n in names):
            raise NotImplementedError("experts with biases are not supported")
        if not _silu_or_unset(getattr(e, "act_fn", None)):
            raise NotImplementedError(f"expert activation {e.act_fn!r} is not SiLU")
    E = len(ex)
    I, H = getattr(ex[0], names[0]).weight.shape
    gate = torch.empty((E, I, H), dtype=store)
    up = torch.empty((E, I, H), dtype=store)
    down = torch.empty((E, H, I), dtype=store)
    for e, mlp in enumerate(ex):
        for dst, n in zip((gate, up, down), names):
            dst[e].copy_(getattr(mlp, n).weight.detach())
    return gate, up, down


def _checkpoint_layout(ex, layout):
    """HFLoRAExperts.checkpoint_layout of the replaced experts module `ex`."""
    if layout == "fused":
        return {"kind": "fused", "transposed": bool(getattr(ex, "is_transposed", False)),
                "concatenated": bool(getattr(ex, "is_concatenated", True))}
    return {"kind": "modulelist", "names": tuple(_mlp_names(ex[0]))}


def _release(module):
    """Free the storage of every parameter of the replaced experts module,
    even where an optimizer or a user still references the Parameter
    objects (ktsft keeps its own reference to memory it uses in place)."""
    for p in list(module.parameters()):
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        p.requires_grad_(False)


# ---------------------------------------------------------------------------
# transformers 4.x blocks: the router in PyTorch, one experts call
# ---------------------------------------------------------------------------
def _softmax_topk_block_forward(self, hidden_states):
    """Qwen2-MoE / Qwen3-MoE / OLMoE / Mixtral sparse block of transformers
    4.x, with the loop over experts replaced by one call of self.experts."""
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    jitter = getattr(self, "jitter_noise", 0) or 0
    if self.training and jitter > 0:
        hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
            1.0 - jitter, 1.0 + jitter)
    x = hidden_states.view(-1, hidden_dim)
    router_logits = self.gate(x)
    routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
    if self._ktsft_norm_topk_prob:
        routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
    routing_weights = routing_weights.to(x.dtype)
    out = self.experts(x, selected_experts, routing_weights)
    shared = getattr(self, "shared_expert", None)
    if shared is not None:  # Qwen2-MoE: sigmoid-gated shared expert
        s = shared(x)
        gate = getattr(self, "shared_expert_gate", None)
        out = out + (torch.sigmoid(gate(x)) * s if gate is not None else s)
    return out.reshape(batch_size, sequence_length, hidden_dim), router_logits


def _deepseek_moe(self, hidden_states, topk_indices, topk_weights):
    return self.experts(hidden_states, topk_indices, topk_weights).type(hidden_states.dtype)


def _patch_legacy_block(block, qual):
    """Replace the block's forward (or DeepSeek-V3's moe) by an instance
    attribute: functools.partial of a module-level function with the block,
    so the patched model still pickles (a bound method does not unpickle:
    pickle restores it by name, and the class has no such method)."""
    if callable(getattr(block, "moe", None)):  # DeepSeek-V3 (4.x): keep its router
        block.moe = functools.partial(_deepseek_moe, block)
        return
    if not (isinstance(getattr(block, "gate", None), torch.nn.Linear) and hasattr(block, "top_k")):
        raise NotImplementedError(
            f"{qual}: a ModuleList of experts in a {type(block).__name__} whose router is not a "
            "softmax top-k over an nn.Linear gate; replace its forward yourself and call the "
            "experts as experts(hidden [T, H], topk_ids [T, k], topk_weights [T, k])")
    norm = getattr(block, "norm_topk_prob", None)
    if norm is None:
        if "Mixtral" not in type(block).__name__:
            raise NotImplementedError(f"{qual}: {type(block).__name__} has no norm_topk_prob")
        norm = True  # Mixtral always renormalises its top-k
    block._ktsft_norm_topk_prob = bool(norm)
    block.forward = functools.partial(_softmax_topk_block_forward, block)


# ---------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------
def apply_lora_experts(model, r=16, alpha=32.0, dtype="bf16", use_rslora=False, threads=None,
                       freeze_other=True, recompute=False, *, backend="ktsft", lora_dropout=0.0,
                       **lora_kwargs):
    """Replace every routed-experts module of `model` by ktsft LoRA experts.

    r, alpha, use_rslora: LoRA rank and scaling (alpha / r, or alpha /
    sqrt(r)); PEFT init (A Kaiming-uniform, B zero), so the patched model
    computes what the original does.  dtype: "bf16" stores the base weights
    in bf16 (fp32 accumulation, fp32 LoRA), "fp32" keeps them fp32.
    threads: OpenMP threads of each layer (default: the usable cores).
    freeze_other: requires_grad=False on every parameter but the LoRA ones.
    recompute: cache only the inputs and recompute in backward.
    lora_dropout: PEFT's LoRA dropout probability on the LoRA inputs, active
    in training mode (masks seeded from torch's default generator).
    backend="eager" builds the plain PyTorch loop (``EagerHFLoRAExperts``)
    instead: the baseline for timings and tests.  Other keyword arguments go
    to ``LoRAExperts`` (max_cache_depth, chunked_prefill_size, isa).

    The expert weights move into ktsft: fp32 tensors in fp32 mode (and bf16
    in bf16 mode) are used in place where contiguous, otherwise converted
    once; the replaced parameters' storage is then released, so one copy of
    the base weights remains.  Blocks with shared experts (DeepSeek-V3,
    Qwen2-MoE) get the forward that runs them on the GPU while the CPU
    computes the routed experts (``overlap_shared_experts``).  Returns the
    model (modified in place).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'bf16' or 'fp32', got {dtype!r}")
    if backend not in ("ktsft", "eager"):
        raise ValueError(f"backend must be 'ktsft' or 'eager', got {backend!r}")
    found = find_expert_modules(model)
    if not found:
        raise ValueError(f"{type(model).__name__}: no routed-experts module found (expected a "
                         "fused experts module with gate_up_proj/down_proj, or a ModuleList of "
                         "gate_proj/up_proj/down_proj or w1/w3/w2 MLPs, as `.experts` of a block)")
    store = _DTYPES[dtype]
    for i, (qual, block, attr, ex, layout) in enumerate(found):
        gate, up, down = (_fused_weights if layout == "fused" else _modulelist_weights)(ex, store)
        top_k = getattr(block, "top_k", None) or getattr(getattr(block, "gate", None), "top_k",
                                                         None)
        if top_k is None:
            cfg = getattr(model, "config", None)
            top_k = getattr(cfg, "num_experts_per_tok", None)
        if top_k is None:
            raise ValueError(f"{qual}: cannot find top_k (block.top_k, block.gate.top_k or "
                             "config.num_experts_per_tok)")
        E, I, H = gate.shape
        if backend == "ktsft":
            new = HFLoRAExperts(E, int(top_k), H, I, r=r, alpha=alpha, dtype=dtype,
                                use_rslora=use_rslora, threads=threads, recompute=recompute,
                                layer_idx=_layer_index(qual, i), lora_dropout=lora_dropout,
                                **lora_kwargs)
            new.load_weights(gate, up, down)
            if hasattr(new, "checkpoint_layout"):  # state_dict keys of the replaced module
                new.checkpoint_layout = _checkpoint_layout(ex, layout)
        else:
            new = EagerHFLoRAExperts(gate, up, down, r=r, alpha=alpha, dtype=dtype,
                                     use_rslora=use_rslora, lora_dropout=lora_dropout)
        new.train(ex.training)  # an eval-mode model keeps eval-mode experts (no dropout)
        del gate, up, down
        _release(ex)
        setattr(block, attr, new)
        if layout == "modulelist":
            _patch_legacy_block(block, qual)
    if backend == "ktsft":  # shared experts on the GPU while the CPU computes the routed ones
        overlap_shared_experts(model)
    lora_ids = {id(p) for m in model.modules() if isinstance(m, (LoRAExperts, EagerHFLoRAExperts))
                for p in m.parameters()}
    if freeze_other:
        for p in model.parameters():
            p.requires_grad_(id(p) in lora_ids)
    return model


# ---------------------------------------------------------------------------
# adapters
# ---------------------------------------------------------------------------
def _lora_modules(model):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (LoRAExperts, EagerHFLoRAExperts))]


def lora_state_dict(model) -> "OrderedDict[str, torch.Tensor]":
    """{"<module>.gate_lora_a": [E, r, H], ...}: the LoRA matrices of every
    ktsft (or eager) experts module, stacked over experts, detached (the
    ktsft ones are the parameters' own memory, not copies)."""
    sd = OrderedDict()
    for name, m in _lora_modules(model):
        for n in PARAM_NAMES:
            p = getattr(m, n)
            sd[f"{name}.{n}"] = (p.detach() if isinstance(p, torch.Tensor)
                                 else torch.stack([q.detach() for q in p]))
    return sd


@torch.no_grad()
def load_lora_state_dict(model, state_dict, strict=True, *, source=None) -> None:
    """Copy LoRA matrices (as lora_state_dict returns them) into the model,
    in place (the kernels keep reading the same memory).

    `state_dict` may also be the path of a file save_lora_experts wrote:
    that is load_lora_experts(model, path, strict), which first checks the
    file's r, lora_alpha and use_rslora against the model.  A tensor whose
    shape differs from the model's raises ValueError naming the key and both
    shapes (`source`: where the tensors came from, for the message)."""
    if isinstance(state_dict, (str, os.PathLike)):
        load_lora_experts(model, state_dict, strict=strict)
        return
    where = f"{source}: " if source else ""
    used = set()
    for name, m in _lora_modules(model):
        for n in PARAM_NAMES:
            key = f"{name}.{n}"
            if key not in state_dict:
                if strict:
                    raise KeyError(f"{where}missing LoRA tensor {key!r}")
                continue
            src = torch.as_tensor(state_dict[key]).float()
            p = getattr(m, n)
            want = tuple(p.shape) if isinstance(p, torch.Tensor) else (len(p), *p[0].shape)
            if tuple(src.shape) != want:
                raise ValueError(f"{where}LoRA tensor {key!r} has shape {tuple(src.shape)}, the "
                                 f"model's is {want} (r={m.r})")
            if isinstance(p, torch.Tensor):
                p.copy_(src)
            else:
                for e, q in enumerate(p):
                    q.copy_(src[e])
            used.add(key)
    extra = set(state_dict) - used
    if strict and extra:
        raise KeyError(f"{where}unexpected LoRA tensors: {sorted(extra)[:5]}")


KTSFT_LORA_FORMAT = "ktsft-lora-experts"


def _meta_bool(v: str) -> bool:
    s = str(v).strip().lower()
    if s in ("true", "1", "yes"):
        return True
    if s in ("false", "0", "no"):
        return False
    raise ValueError(f"not a boolean: {v!r}")


def load_lora_experts(model, path, strict=True) -> dict:
    """Load a file save_lora_experts wrote into `model`'s ktsft LoRA experts,
    in place, after checking the hyperparameters the file records against
    every LoRA experts module of the model: r, lora_alpha and use_rslora
    must be the model's (a different r would not fit, a different alpha or
    rsLoRA setting would load and silently compute another function).  A
    mismatch raises ValueError naming the file, the field and both values;
    so does a tensor of another shape, or a file of another format (a PEFT
    adapter directory: PeftModel.from_pretrained or ktsft's load_adapter).

    Returns the file's metadata (str -> str; lora_dropout, the training
    value, is returned there and not checked)."""
    from safetensors import safe_open

    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path}: a directory, not a file save_lora_experts wrote (a PEFT "
                         "adapter directory loads with PeftModel.from_pretrained, or "
                         "ktsft.adapters.load_adapter per layer)")
    mods = _lora_modules(model)
    if not mods:
        raise ValueError("the model has no ktsft LoRA experts (apply_lora_experts first)")
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata() or {})
        if meta.get("format") != KTSFT_LORA_FORMAT:
            raise ValueError(f"{path}: not a ktsft-format LoRA file (its metadata has format="
                             f"{meta.get('format')!r}; save_lora_experts writes "
                             f"{KTSFT_LORA_FORMAT!r})")
        fields = (("r", int, lambda m: m.r, lambda a, b: a == b),
                  ("lora_alpha", float, lambda m: m.alpha,
                   lambda a, b: math.isclose(a, b, rel_tol=1e-6, abs_tol=0.0)),
                  ("use_rslora", _meta_bool, lambda m: bool(m.use_rslora), lambda a, b: a == b))
        problems = []
        for field, parse, of_model, same in fields:
            if field not in meta:
                problems.append(f"{field} is missing from its metadata")
                continue
            try:
                got = parse(meta[field])
            except ValueError:
                problems.append(f"{field} is {meta[field]!r} in the file, not a {parse.__name__}")
                continue
            differ = [(n, of_model(m)) for n, m in mods if not same(got, of_model(m))]
            if differ:
                n0, want = differ[0]
                which = (f"module {n0}" if len(differ) == 1
                         else f"{len(differ)} of the model's {len(mods)} LoRA experts modules, "
                              f"e.g. {n0}")
                problems.append(f"{field} is {got} in the file but {want} in the model ({which})")
        if problems:
            raise ValueError(f"{path}: this LoRA file does not match the model: "
                             + "; ".join(problems)
                             + ". Build the model with the file's settings (apply_lora_experts("
                               "model, r=..., alpha=..., use_rslora=...)) to load it.")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    load_lora_state_dict(model, tensors, strict=strict, source=path)
    return meta


def save_lora_experts(model, path, metadata=None) -> str:
    """Write the LoRA matrices (lora_state_dict) to a .safetensors file with
    r, alpha, use_rslora and the layout in its metadata; load_lora_experts
    reads it back (checking those against the model).  The file is written
    next to `path` and renamed into place, with the mode open() would give
    it (0o666 less the umask, or the replaced file's).  Returns path."""
    from safetensors.torch import save_file

    from ..adapters import save_safetensors, write_file_atomically

    mods = _lora_modules(model)
    if not mods:
        raise ValueError("the model has no ktsft LoRA experts")
    m0 = mods[0][1]
    meta = {"format": KTSFT_LORA_FORMAT, "r": str(m0.r), "lora_alpha": str(m0.alpha),
            "use_rslora": str(m0.use_rslora).lower(), "lora_dropout": str(m0.lora_dropout),
            "shapes": "A [E, r, in], B [E, out, r]; gate/up: in=H, out=I; down: in=I, out=H"}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    tensors = {k: v.contiguous().clone() for k, v in lora_state_dict(model).items()}
    target = os.fspath(path)
    write_file_atomically(target, lambda tmp: save_safetensors(tensors, tmp, target, meta,
                                                               save_file))
    return str(path)

# ---- one PEFT adapter for the whole model ---------------------------------
_V5_PROJ_DEFAULT = ("gate_proj", "up_proj", "down_proj")


def _peft_root(model):
    """(the transformers model under any PeftModel wrapper, PEFT configs or None)."""
    root = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    cfgs = getattr(model, "peft_config", None) or getattr(root, "peft_config", None)
    return root, (cfgs if isinstance(cfgs, dict) and cfgs else None)


def _checkpoint_names(root, experts_path):
    """(experts module path, (gate, up, down) names) of the per-expert layout:
    the keys of the model's checkpoint -- for transformers-5 fused experts
    the source of its conversion mapping (Mixtral: block_sparse_moe + w1/w3/w2),
    for a 4.x ModuleList the module's own names."""
    model_type = getattr(getattr(root, "config", None), "model_type", None)
    mapping = None
    if model_type is not None and HFLoRAExperts._transformers_major() >= 5:
        try:
            from transformers.conversion_mapping import get_checkpoint_conversion_mapping

            mapping = get_checkpoint_conversion_mapping(model_type)
        except Exception:  # noqa: BLE001 - no mapping API: the module's names
            mapping = None
    names, path = None, experts_path
    for conv in mapping or []:
        src = list(getattr(conv, "source_patterns", []) or [])
        tgt = list(getattr(conv, "target_patterns", []) or [])
        if type(conv).__name__ == "WeightRenaming":
            for s, t in zip(src, tgt):  # literal renamings only (".block_sparse_moe." -> ".mlp.")
                if re.fullmatch(r"\.?[A-Za-z_][A-Za-z0-9_]*\.?", s) and \
                        re.fullmatch(r"\.?[A-Za-z_][A-Za-z0-9_]*\.?", t):
                    t_, s_ = "." + t.strip(".") + ".", "." + s.strip(".") + "."
                    path = ("." + path + ".").replace(t_, s_)[1:-1]
            continue
        leaf = [re.search(r"experts\.\*\.([A-Za-z0-9_]+)\.weight$", p) for p in src]
        if tgt and tgt[0].endswith("gate_up_proj") and len(leaf) == 2 and all(leaf):
            names = (leaf[0].group(1), leaf[1].group(1), names[2] if names else None)
        elif tgt and tgt[0].endswith("down_proj") and len(leaf) == 1 and leaf[0]:
            names = (names[0], names[1], leaf[0].group(1)) if names else (None, None,
                                                                          leaf[0].group(1))
    if names and all(names):
        return path, names
    m = dict(_lora_modules(root)).get(experts_path)
    lay = m._layout(experts_path + ".") if isinstance(m, HFLoRAExperts) else {}
    if lay.get("kind") == "modulelist":
        return experts_path, tuple(lay["names"])
    if "block_sparse_moe" in experts_path:
        return experts_path, ("w1", "w3", "w2")
    return experts_path, _V5_PROJ_DEFAULT


def _peft_converts(model_type):
    """Whether this PEFT converts per-expert adapters into transformers-5 fused
    experts of `model_type` (its own tables); None if it cannot be told."""
    try:
        from peft.utils import transformers_weight_conversion as twc

        base = twc._MODEL_TO_CONVERSION_PATTERN.get(model_type)
        return bool(base and twc._MOE_TARGET_MODULE_MAPPING.get(base)
                    and twc._MOE_FUSED_TARGETS.get(base))
    except Exception:  # noqa: BLE001 - no PEFT, or other internals
        return None


def _np(t):
    from .._arrays import as_numpy

    return as_numpy(t.detach().cpu().contiguous(), "tensor")


def _other_peft_lora(model, root, cfgs, adapter_name, skip):
    """PEFT LoRA on the rest of the model (attention, ...): (config, tensors
    {key without base_model.model.: numpy}, modules {name: (r, scaling,
    B keys)}) or (None, {}, {})."""
    if cfgs is None:
        return None, {}, {}
    if adapter_name not in cfgs:
        raise ValueError(f"the model has PEFT adapters {sorted(cfgs)}, not {adapter_name!r}")
    cfg = cfgs[adapter_name]
    if str(getattr(cfg, "peft_type", "LORA")).split(".")[-1] != "LORA":
        raise ValueError(f"PEFT adapter {adapter_name!r} is {cfg.peft_type}, not LoRA")
    for k in ("use_dora", "lora_bias"):
        if getattr(cfg, k, False):
            raise ValueError(f"PEFT adapter {adapter_name!r} has {k}=True: one adapter config "
                             "cannot hold it and the plain expert LoRA")
    if getattr(cfg, "bias", "none") != "none":
        raise ValueError(f"PEFT adapter {adapter_name!r} trains biases (bias={cfg.bias!r}); "
                         "export with bias='none'")
    if getattr(cfg, "target_parameters", None):
        raise ValueError(f"PEFT adapter {adapter_name!r} targets parameters "
                         f"{list(cfg.target_parameters)[:3]}: the experts are ktsft's")
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
    tensors = {}
    for k, v in sd.items():
        k = k[len("base_model.model."):] if k.startswith("base_model.model.") else k
        if any(k.startswith(s + ".") for s in skip):
            continue  # ktsft's own experts (their stacked parameters contain "lora_")
        tensors[k] = _np(v)
    mods = {}
    for name, mod in root.named_modules():
        if isinstance(mod, LoraLayer) and adapter_name in getattr(mod, "r", {}):
            emb = adapter_name in getattr(mod, "lora_embedding_B", {})
            mods[name] = (int(mod.r[adapter_name]), float(mod.scaling[adapter_name]),
                          f"{name}.lora_embedding_B" if emb else f"{name}.lora_B.weight")
    return cfg, tensors, mods


@torch.no_grad()
def export_adapter(model, path, *, layout="per_expert", adapter_name="default", peft_check=True,
                   base_model_name_or_path=None, dtype=None) -> dict:
    """Write ONE PEFT adapter directory for a model patched by
    apply_lora_experts: the ktsft expert LoRA and, if the model carries PEFT
    LoRA elsewhere (attention, ...: ``get_peft_model`` before or after
    apply_lora_experts), that LoRA too.  Returns the config written.

    layout="per_expert" (default): the experts as PEFT saves LoRA on
    ``nn.Linear`` experts, the layout PEFT, vLLM and SGLang read for MoE
    models, under the checkpoint's names::

        base_model.model.model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.lora_{A,B}.weight

    (Mixtral: ``block_sparse_moe.experts.{e}.{w1,w3,w2}``).  PEFT applies it
    to 4.x ModuleList experts as it is and converts it when loading into
    transformers-5 fused experts (Qwen3-MoE, OLMoE, Mixtral, DeepSeek-V3,
    ...).  For a transformers-5 model whose type PEFT does not convert
    (Qwen2-MoE in PEFT 0.21: PEFT would put the LoRA on the shared expert's
    gate_proj/up_proj/down_proj and drop the experts' tensors, silently)
    this raises ValueError unless ``peft_check=False`` (an adapter only for
    vLLM / SGLang); use layout="fused" for PEFT.

    layout="fused": PEFT's ``target_parameters`` layout on the fused
    ``experts.gate_up_proj`` / ``down_proj`` (export_peft_fused): what
    transformers-5 PEFT loads without conversion, for every fused model.

    The config every reader accepts: lora_dropout 0.0 (training only;
    PEFT's ParamWrapper refuses more; the values trained with are in the
    safetensors metadata), rsLoRA written as plain LoRA of the same
    scaling (lora_alpha = alpha * sqrt(r)), the experts' r and alpha as the
    config's, and one scaling, lora_alpha / r, for every module (vLLM and
    SGLang apply one): other LoRA of another rank gets rank_pattern and
    alpha_pattern entries keeping alpha / rank at that value, and of
    another scaling its B is multiplied by the ratio.  Modules the expert names would also match (a shared
    expert's or a dense layer's gate_proj) are listed in exclude_modules.
    dtype: of the written tensors (default float32; other PEFT LoRA keeps
    its own)."""
    import numpy as np

    from .. import adapters as A

    if layout not in ("per_expert", "fused"):
        raise ValueError(f"layout must be 'per_expert' or 'fused', got {layout!r}")
    root, cfgs = _peft_root(model)
    mods = _lora_modules(root)
    if not mods:
        raise ValueError(f"{type(root).__name__}: no ktsft LoRA experts (apply_lora_experts first)")
    hyper = {(m.r, m.alpha, m.use_rslora, float(m.lora_dropout)) for _, m in mods}
    if len(hyper) > 1:
        raise ValueError(f"the experts modules differ in (r, alpha, use_rslora, lora_dropout): "
                         f"{sorted(hyper)}; one adapter config holds one")
    r, alpha, rslora, dropout = hyper.pop()
    np_dtype = np.float32 if dtype is None else _np(torch.zeros(1, dtype=dtype)).dtype
    sd = lora_state_dict(root)
    layers, paths = {}, {}
    for i, (name, m) in enumerate(mods):
        L = m.wrapper.layer_idx if isinstance(m, LoRAExperts) else _layer_index(name, i)
        if L in layers:
            raise ValueError(f"two experts modules have layer index {L} ({paths[L]}, {name})")
        layers[L] = {n: sd[f"{name}.{n}"].numpy() for n in PARAM_NAMES}
        paths[L] = name
    arrs = A._dims_of(layers, r)
    skip = list(paths.values())
    other_cfg, other, other_mods = _other_peft_lora(model, root, cfgs, adapter_name, skip)

    # the experts
    model_type = getattr(getattr(root, "config", None), "model_type", None)
    hyper_cfg, meta = A._portable_hyper(r, alpha, rslora, dropout)
    config = A._base_config(base_model_name_or_path if base_model_name_or_path is not None else
                            getattr(getattr(root, "config", None), "_name_or_path", None) or None)
    config.update(hyper_cfg)
    meta["ktsft.layout"] = layout
    target_modules, exclude = [], []
    if layout == "fused":
        tensors = A._fused_tensors(arrs, paths.__getitem__, np_dtype)
        config["rank_pattern"] = {re.escape("gate_up_proj"): 2 * r}
        config["alpha_pattern"] = {re.escape("gate_up_proj"): 2 * config["lora_alpha"]}
        config["target_parameters"] = [f"{paths[L]}.{n}" for L in arrs
                                       for n in ("gate_up_proj", "down_proj")]
        written = {L: paths[L] for L in arrs}
    else:
        written, names = {}, None
        for L in arrs:
            written[L], nm = _checkpoint_names(root, paths[L])
            if names not in (None, nm):
                raise ValueError(f"experts of layer {L} are named {nm}, others {names}")
            names = nm
        fused = [L for L in arrs if dict(mods)[paths[L]]._layout(paths[L] + ".")["kind"] == "fused"
                 ] if all(isinstance(m, HFLoRAExperts) for _, m in mods) else []
        if peft_check and fused and model_type is not None and \
                HFLoRAExperts._transformers_major() >= 5 and _peft_converts(model_type) is False:
            clash = [n for n, mm in root.named_modules() if isinstance(mm, torch.nn.Linear)
                     and n.rsplit(".", 1)[-1] in names][:1]
            import peft

            raise ValueError(
                f"{type(root).__name__} ({model_type}): PEFT {peft.__version__} does not convert "
                "per-expert adapters into transformers-5 fused experts of this model type, so it "
                "would load this one as a no-op" + (f" (target_modules {list(names)} would match "
                                                    f"{clash[0]} instead)" if clash else "")
                + ". For PEFT / transformers use export_adapter(model, path, layout='fused'); "
                "for vLLM or SGLang, which read the per-expert layout, pass peft_check=False")
        tensors = A._per_expert_tensors(arrs, written.__getitem__, names, np_dtype)
        target_modules = list(names)
        under = tuple(written.values()) + tuple(paths.values())
        exclude = sorted(n for n, mm in root.named_modules()
                         if isinstance(mm, torch.nn.Linear) and n.rsplit(".", 1)[-1] in names
                         and not any(n.startswith(u + ".") for u in under))
    config["layers_to_transform"] = None if other_cfg is not None else sorted(arrs)
    config["layers_pattern"] = None if other_cfg is not None else "layers"

    # other PEFT LoRA: one config for all, scalings folded into B
    if other_cfg is not None:
        alpha_g = config["lora_alpha"]
        leaf = sorted({n.rsplit(".", 1)[-1] for n in other_mods})
        every = {n for n, mm in root.named_modules() if n.rsplit(".", 1)[-1] in leaf
                 and not any(n.startswith(p + ".") for p in skip)}
        wrapped = set(other_mods)
        # PEFT's own layers are named "<name>" with a base_layer child
        every = {n for n in every if not n.endswith(".base_layer")}
        target_modules += leaf if every <= wrapped else sorted(wrapped)
        rank_pattern = dict(config.get("rank_pattern") or {})
        alpha_pattern = dict(config.get("alpha_pattern") or {})
        scaled = 0
        for name, (r_m, s_m, bkey) in other_mods.items():
            # every module gets the config's scaling alpha_g / r (vLLM and SGLang apply that
            # one to all): another rank goes in rank_pattern with alpha_pattern keeping
            # alpha / rank at alpha_g / r; the module's own scaling is folded into its B
            if r_m != r:
                rank_pattern[re.escape(name)] = r_m
                alpha_pattern[re.escape(name)] = alpha_g * r_m / r
            factor = s_m / (alpha_g / r)
            if not math.isclose(factor, 1.0, rel_tol=1e-12):
                if bkey not in other:
                    raise ValueError(f"{name}: no {bkey} in PEFT's state dict to rescale")
                other[bkey] = (other[bkey].astype(np.float64) * factor).astype(other[bkey].dtype)
                scaled += 1
        if rank_pattern:
            config["rank_pattern"] = rank_pattern
            config["alpha_pattern"] = alpha_pattern
        if getattr(other_cfg, "modules_to_save", None):
            config["modules_to_save"] = list(other_cfg.modules_to_save)
        meta["ktsft.peft_lora_dropout"] = repr(float(getattr(other_cfg, "lora_dropout", 0.0)))
        meta["ktsft.peft_rescaled_modules"] = str(scaled)
        clash = set(tensors) & {f"base_model.model.{k}" for k in other}
        if clash:
            raise ValueError(f"PEFT's tensors and the experts' share keys: {sorted(clash)[:3]}")
        tensors.update({f"base_model.model.{k}": v for k, v in other.items()})
    config["target_modules"] = target_modules
    if exclude:
        config["exclude_modules"] = exclude
    A._write_adapter(path, tensors, config, meta)
    return config


# "ktsft" as a transformers experts implementation (ktsft/integrations/hf_experts.py)
from .hf_experts import configure, ktsft_experts_forward  # noqa: E402
from .hf_experts import register as _register  # noqa: E402

try:
    _register()
except ImportError:  # transformers < 5 has no ExpertsInterface: apply_lora_experts still works
    pass
