"""Expert parallelism: each rank of a torch.distributed process group holds
a contiguous slice of one MoE layer's routed experts (base weights and
LoRA) and computes the (token, expert) pairs routed to them.

Forward, on every rank (all collectives are all_to_all_single on the
group on CPU tensors: gloo, or MPI):
  1. counts: rows and pairs for each destination (plus an error flag);
  2. rows: each token's hidden state, once per owner rank it needs;
  3. pairs: (row, local expert, routing weight) for each (token, expert);
  4. the owner runs its local LoRAExperts (top_k = 1 over the pairs) and
     sums the weighted pair outputs per row;
  5. rows of weighted results go back and are summed per token.
Backward reverses 5 (output gradients out), runs the local backward
(input-, routing-weight- and LoRA-gradients), and reverses 2 and 3.  LoRA
gradients never leave their owner.  The local compute is one nested
autograd graph inside a single autograd.Function, so every rank issues the
same collectives in the same order whatever the autograd engine schedules.
"""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from ..adapters import AdapterIO
from ..torch import PARAM_NAMES, LoRAExperts, _check_call
from ..wrapper import INT32_MAX
from .comm import STATS, agree, all_to_all, check_all, exchange_counts
from .partition import ExpertPartition
from .routing import plan_recv, plan_send


class _ExpertParallelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, module, x, ids, w, *params):
        group, world = module.group, module.world_size
        plan, err = None, None
        try:
            module._check_inputs(x, ids, w)
            plan = plan_send(ids.to(torch.int64), w.detach(), module._owner, module._first, world)
            counts = torch.tensor([plan.send_rows, plan.send_pairs], dtype=torch.int64).T
        except Exception as e:  # joined below: every rank raises, none waits
            err = e
            counts = torch.zeros(world, 2, dtype=torch.int64)
        got = exchange_counts(counts, err, group, "ExpertParallelLoRAExperts forward")
        recv_rows, recv_pairs = got[:, 0].tolist(), got[:, 1].tolist()

        act = x.dtype
        x_recv = all_to_all(x.detach()[plan.send_tok], plan.send_rows, recv_rows, group)
        meta = all_to_all(plan.meta, plan.send_pairs, recv_pairs, group)
        recv = plan_recv(meta, recv_rows, recv_pairs)

        need = any(ctx.needs_input_grad)
        xr = wr = out_recv = leaves = None
        t0 = time.perf_counter()
        try:
            with torch.set_grad_enabled(need):
                # fp32 on the owner: the pair outputs are summed before rounding to act
                xr = x_recv.float().detach().requires_grad_(need)
                wr = recv.weight.detach().requires_grad_(need)
                # The inner graph ends at aliases of the parameters (same memory, which
                # the kernels read): its autograd.grad must not fire hooks registered
                # on the parameters themselves; they see the gradient this Function returns.
                leaves = [p.detach().requires_grad_(need) for p in params]
                y = functional_call(module.local, dict(zip(PARAM_NAMES, leaves)),
                                    (xr[recv.row], recv.local_id[:, None], wr[:, None]))
                out_recv = torch.zeros(xr.shape, dtype=torch.float32).index_add(0, recv.row, y)
        except Exception as e:
            err = e
        STATS.local_seconds += time.perf_counter() - t0
        check_all(err, group, "ExpertParallelLoRAExperts forward (local experts)")
        out_rows = all_to_all(out_recv.detach().to(act), recv_rows, plan.send_rows, group)
        out = torch.zeros(x.shape, dtype=torch.float32).index_add_(0, plan.send_tok, out_rows.float())
        if need:
            ctx.module = module
            ctx.state = (plan, recv, xr, wr, out_recv, leaves)
            ctx.meta = (x.shape, act, w.shape, w.dtype)
        return out.to(act)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        module = ctx.module
        if ctx.state is None:
            raise RuntimeError("ExpertParallelLoRAExperts: backward ran twice through one forward; "
                               "its activations are freed after the first backward (run the "
                               "forward again, e.g. with torch.utils.checkpoint)")
        plan, recv, xr, wr, out_recv, leaves = ctx.state
        ctx.state = None
        x_shape, act, w_shape, w_dtype = ctx.meta
        group = module.group
        g_recv = all_to_all(grad_out.detach()[plan.send_tok].to(act), plan.send_rows,
                            recv.recv_rows, group)
        grads, err = None, None
        t0 = time.perf_counter()
        try:
            grads = torch.autograd.grad(out_recv, [xr, wr, *leaves], g_recv.float(),
                                        allow_unused=True)
            grads = [torch.zeros_like(t) if g is None else g
                     for g, t in zip(grads, [xr, wr, *leaves])]
        except Exception as e:
            err = e
        STATS.local_seconds += time.perf_counter() - t0
        check_all(err, group, "ExpertParallelLoRAExperts backward (local experts)")
        gx_recv, gw_recv, *pgrads = grads
        gx_rows = all_to_all(gx_recv.to(act), recv.recv_rows, plan.send_rows, group)
        gw_pairs = all_to_all(gw_recv.float(), recv.recv_pairs, plan.send_pairs, group)
        gx = torch.zeros(x_shape, dtype=torch.float32).index_add_(0, plan.send_tok, gx_rows.float())
        gw = torch.zeros(math.prod(w_shape), dtype=torch.float32)
        gw[plan.pair_order] = gw_pairs
        need = ctx.needs_input_grad
        return (None, gx.to(act) if need[1] else None, None,
                gw.reshape(w_shape).to(w_dtype) if need[3] else None,
                *[g if n else None for g, n in zip(pgrads, need[4:])])


class ExpertParallelLoRAExperts(AdapterIO, torch.nn.Module):
    """One MoE layer's routed experts sharded over a process group.

    Same call as ``ktsft.torch.LoRAExperts``: ``forward(hidden_states
    [..., H], topk_ids [..., k] global expert ids, topk_weights [..., k])``
    returns [..., H] for this rank's tokens, with gradients to
    hidden_states, topk_weights and this rank's LoRA parameters.  Every
    rank of ``group`` must call forward and backward the same number of
    times in the same order (as with any collective); a rank may pass zero
    tokens.  Rank i owns experts ``expert_range`` = [lo, hi) (uneven
    ``expert_counts`` allowed) in a local ``LoRAExperts`` (``.local``) of
    hi - lo experts whose LoRA parameters are ``gate_lora_a`` [hi - lo, r,
    H], ... .  Inputs may live on any device; communication is on CPU
    tensors in the activation dtype.  ``chunked_prefill_size`` bounds the
    tokens one rank passes per call; an owner accepts up to world_size *
    chunked_prefill_size * top_k (token, expert) pairs, and its activation
    cache grows with the pairs it really receives (chunked_prefill_size *
    top_k per forward when routing is balanced).  ``lora_dropout`` is
    applied by the owner to the pairs it computes: reproducible for a given
    world size and seed, but its masks differ from a single-process run's.
    """

    def __init__(self, num_experts, top_k, hidden_size, intermediate_size, r=16, alpha=32.0,
                 dtype="bf16", use_rslora=False, threads=None, max_cache_depth=8,
                 chunked_prefill_size=8192, layer_idx=0, isa=None, recompute=False,
                 lora_dropout=0.0, expert_counts=None, group=None):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ExpertParallelLoRAExperts needs torch.distributed initialised "
                               "(torch.distributed.init_process_group, e.g. under torchrun)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # Collective, before anything else: ranks built with other sizes
        # would exchange tensors of other shapes, and gloo aborts the
        # process on that; a rank whose arguments (or memory) are refused
        # would leave the others waiting in their first collective
        settings = dict(num_experts=num_experts, top_k=top_k, hidden_size=hidden_size,
                        intermediate_size=intermediate_size, r=r, alpha=alpha, dtype=dtype,
                        use_rslora=use_rslora, chunked_prefill_size=chunked_prefill_size,
                        layer_idx=layer_idx, recompute=recompute, lora_dropout=lora_dropout,
                        expert_counts=None if expert_counts is None else list(expert_counts))

        def build():
            partition = ExpertPartition(num_experts, self.world_size, expert_counts)
            if not 1 <= int(top_k) <= partition.num_experts:
                raise ValueError(f"top_k={top_k}: need 1 <= top_k <= "
                                 f"num_experts={partition.num_experts}")
            if int(chunked_prefill_size) < 1:
                raise ValueError(f"chunked_prefill_size must be >= 1, got {chunked_prefill_size!r}")
            pairs = int(chunked_prefill_size) * int(top_k)
            if pairs * self.world_size > INT32_MAX:
                raise ValueError(f"chunked_prefill_size={chunked_prefill_size} x top_k={top_k} x "
                                 f"world_size={self.world_size} pairs exceed 2^31 - 1, the "
                                 "kernels' index range; pass fewer tokens per call")
            lo, hi = partition.range_of(self.rank)
            # Sized (and memory-checked) for balanced routing, chunked_prefill_size * top_k
            # pairs, as a single-process layer is; one rank may still receive every rank's
            # pairs in a skewed step, so the accepted maximum is world_size times that.
            local = LoRAExperts(hi - lo, 1, hidden_size, intermediate_size, r=r, alpha=alpha,
                                dtype=dtype, use_rslora=use_rslora, threads=threads,
                                max_cache_depth=max_cache_depth, chunked_prefill_size=pairs,
                                layer_idx=layer_idx, isa=isa, recompute=recompute,
                                lora_dropout=lora_dropout)
            local.wrapper.chunked_prefill_size = pairs * self.world_size
            return partition, local

        # The global RNG is left where a LoRAExperts of all experts would
        # leave it: reset_lora_parameters replays that init for our slice.
        rng = torch.get_rng_state()
        try:
            self.partition, self.local = agree(settings, build, group, "ExpertParallelLoRAExperts")
        finally:
            torch.set_rng_state(rng)
        self.num_experts, self.top_k = self.partition.num_experts, int(top_k)
        self.chunked_prefill_size = int(chunked_prefill_size)
        self.expert_range = self.partition.range_of(self.rank)
        self.reset_lora_parameters()
        self._owner = self.partition.owner_table()
        self._first = torch.tensor(self.partition.offsets[:-1], dtype=torch.int64)

    # ---- attributes shared with LoRAExperts --------------------------------
    hidden_size = property(lambda self: self.local.hidden_size)
    intermediate_size = property(lambda self: self.local.intermediate_size)
    r = property(lambda self: self.local.r)
    alpha = property(lambda self: self.local.alpha)
    use_rslora = property(lambda self: self.local.use_rslora)
    scaling = property(lambda self: self.local.scaling)
    layer_idx = property(lambda self: self.local.wrapper.layer_idx)
    num_local_experts = property(lambda self: self.local.num_experts)
    # the local slice's LoRA parameters under LoRAExperts' names: gate_lora_a [hi - lo, r, H], ...
    gate_lora_a = property(lambda self: self.local.gate_lora_a)
    gate_lora_b = property(lambda self: self.local.gate_lora_b)
    up_lora_a = property(lambda self: self.local.up_lora_a)
    up_lora_b = property(lambda self: self.local.up_lora_b)
    down_lora_a = property(lambda self: self.local.down_lora_a)
    down_lora_b = property(lambda self: self.local.down_lora_b)

    @property
    def lora_dropout(self) -> float:
        return self.local.lora_dropout

    @lora_dropout.setter
    def lora_dropout(self, p) -> None:
        self.local.lora_dropout = p

    @property
    def recompute(self) -> bool:
        return self.local.recompute

    @recompute.setter
    def recompute(self, value) -> None:
        self.local.recompute = bool(value)

    def lora_parameters(self):
        return self.local.lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT init of this rank's slice, drawn exactly as a single-process
        LoRAExperts of all experts draws it: the same seed on every rank
        gives every rank its slice of the same full adapter."""
        lo, hi = self.expert_range
        for name in PARAM_NAMES:
            p = getattr(self.local, name)
            if not name.endswith("_a"):
                p.zero_()
                continue
            tmp = torch.empty(p.shape[1:])
            for e in range(self.num_experts):  # draws for other ranks' experts keep the stream aligned
                torch.nn.init.kaiming_uniform_(tmp, a=math.sqrt(5))
                if lo <= e < hi:
                    p[e - lo].copy_(tmp)

    # ---- weights -------------------------------------------------------------
    def load_weights(self, gate_proj, up_proj, down_proj) -> None:
        """Frozen base weights: either the whole layer ([E, I, H], [E, I, H],
        [E, H, I]; this rank keeps its slice) or just this rank's experts
        ([hi - lo, ...])."""
        lo, hi = self.expert_range
        arrays = []
        for name, a in (("gate_proj", gate_proj), ("up_proj", up_proj), ("down_proj", down_proj)):
            n = a.shape[0] if hasattr(a, "shape") and len(a.shape) == 3 else None
            if n == self.num_experts:
                a = a[lo:hi]
            elif n != hi - lo:
                raise ValueError(f"{name}: expected {self.num_experts} experts (the layer) or "
                                 f"{hi - lo} (this rank's experts {lo}..{hi - 1}) on the first of 3 "
                                 f"dims, got shape {tuple(getattr(a, 'shape', ()))}")
            arrays.append(a)
        self.local.load_weights(*arrays)

    def load_checkpoint(self, weight_path, key_prefix=None) -> None:
        """Read only this rank's experts of layer ``layer_idx`` from a
        checkpoint (the formats of ktsft/weights.py: a Hugging Face
        checkpoint, sharded or not, fp8 included; stacked .npy/.safetensors;
        a bf16/fp32 ``save_weights`` file), one expert at a time."""
        from .loading import read_expert_shard

        lo, hi = self.expert_range
        self.local.load_weights(*read_expert_shard(
            weight_path, self.layer_idx, lo, hi, self.num_experts, self.hidden_size,
            self.intermediate_size, self.local.wrapper.dtype, key_prefix))

    # ---- adapters ------------------------------------------------------------
    def save_adapter(self, path, **kw) -> None:
        """This rank's LoRA as a shard adapter directory: PEFT per-expert
        keys with global expert ids; ``merge_adapter_shards`` joins the
        shards of all ranks into one adapter."""
        from .shards import save_adapter_shard

        save_adapter_shard(path, [self], **kw)

    def export_peft_fused(self, path, **kw) -> None:
        raise NotImplementedError("an expert-parallel layer holds a shard of the experts: "
                                  "save_adapter writes it, merge_adapter_shards joins the ranks'")

    # load_adapter (AdapterIO): this rank's experts from a PEFT adapter (a full
    # one, e.g. merged, or this rank's shard), into the parameters in place
    def _adapter_expect(self):
        lo, hi = self.expert_range
        return self.layer_idx, dict(num_experts=self.num_experts, hidden_size=self.hidden_size,
                                    intermediate_size=self.intermediate_size, r=self.r,
                                    scaling=self.scaling, experts=range(lo, hi))

    @torch.no_grad()
    def _adapter_store(self, mats) -> None:
        for n, p in zip(PARAM_NAMES, self.lora_parameters()):
            p.copy_(torch.from_numpy(mats[n]))

    # ---- compute ---------------------------------------------------------------
    def _check_inputs(self, x, ids, w) -> None:
        """Raised before any payload moves; exchange_counts makes every rank
        raise.  The module's argument checks (ktsft.torch._check_call), then
        what this layer adds: the token limit, and finite hidden states (the
        local experts check only the rows they receive)."""
        _check_call(x, ids, w, self.hidden_size, self.top_k, self.num_experts)
        T = x.shape[0]
        if T > self.chunked_prefill_size:
            raise ValueError(f"hidden_states: {T} tokens exceed chunked_prefill_size="
                             f"{self.chunked_prefill_size}; split the batch or raise the limit")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("hidden_states: contains a value that is not finite")

    def forward(self, hidden_states, topk_ids, topk_weights):
        """hidden_states [..., H], topk_ids / topk_weights [..., k] -> [..., H]."""
        H, k = self.hidden_size, self.top_k
        dev = hidden_states.device if isinstance(hidden_states, torch.Tensor) else None
        lead = hidden_states.shape[:-1] if isinstance(hidden_states, torch.Tensor) else ()
        x, ids, w = hidden_states, topk_ids, topk_weights
        # flattened to [T, H] / [T, k] only when the shapes agree ([..., H] and
        # [..., k] of the same leading shape): anything else reaches
        # _check_inputs as it is, which refuses it on every rank together
        want = (*lead, k)
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] == H and all(
                isinstance(t, torch.Tensor) and tuple(t.shape) == want for t in (ids, w)):
            x, ids, w = x.reshape(-1, H).cpu(), ids.reshape(-1, k).cpu(), w.reshape(-1, k).cpu()
        out = _ExpertParallelFunction.apply(self, x, ids, w, *self.lora_parameters())
        return out.reshape(*lead, H).to(dev)

    def extra_repr(self) -> str:
        lo, hi = self.expert_range
        return (f"rank={self.rank}/{self.world_size}, experts={lo}..{hi - 1} of {self.num_experts}, "
                f"top_k={self.top_k}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size}, r={self.r}, alpha={self.alpha}, "
                f"dtype={self.local.wrapper.dtype}")
