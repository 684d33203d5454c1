"""PyTorch integration: the routed experts of one MoE layer as an nn.Module
whose LoRA matrices are ordinary nn.Parameters, trained by any optimizer.

    experts = ktsft.torch.LoRAExperts(num_experts=E, top_k=k, hidden_size=H,
                                      intermediate_size=I, r=16, alpha=32)
    experts.load_weights(gate_proj, up_proj, down_proj)     # frozen base
    out = experts(hidden_states, topk_ids, topk_weights)     # autograd-aware

Gradients reach hidden_states, topk_weights (so the router trains) and the
six LoRA parameters.  The kernels read the parameters' memory in place: an
optimizer step is seen by the next forward without a copy.  Imported lazily
(``ktsft.torch``), so the numpy API never needs torch.
"""
from __future__ import annotations

import math
import time
import weakref

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from . import _grads, _overlap
from .adapters import AdapterIO
from . import profile as _profile
from .schema import LORA_GRAD_NAMES, LORA_NAMES, lora_shapes
from .wrapper import SFTMoEWrapper

PARAM_NAMES = LORA_NAMES  # the parameters' names (ktsft/schema.py)


def _kernel_dtype(t):
    return t if t.dtype in (torch.float32, torch.bfloat16) else t.float()  # e.g. float64


def _staging(module, T, dtype):
    """The pinned host buffers for at least T tokens of this layer's shape
    (a bounded pool of power-of-two buckets: KExpertsSFTBuffer.staging)."""
    from .buffers import KExpertsSFTBuffer

    return KExpertsSFTBuffer.staging(T, module.hidden_size, module.intermediate_size,
                                     module.num_experts, module.top_k, module.r,
                                     "bf16" if dtype == torch.bfloat16 else "fp32")


def _sync(device, prof):
    """Wait for the stream's queued work; with a profiler, the wait for GPU
    work queued before the copies is split off as gpu_wait."""
    stream = torch.cuda.current_stream(device)
    if prof is not None:
        with prof.timer("gpu_wait"):
            stream.synchronize()
    return stream


def _free_staging(buf):
    """Wait until the copies that read `buf`'s outputs last time are done
    (they run on the GPU's copy engine after the call that queued them
    returned)."""
    ev = getattr(buf, "copied", None)
    if ev is not None:
        ev.synchronize()
        buf.copied = None


def _copy_back(buf, src, device, dtype, into=None):
    """src (a pinned staging tensor) to the device without blocking (into
    `into`, where given); the event guards the buffer until the copy has
    read it."""
    with _profile.timer("h2d"):
        if into is None:
            out = src.to(device=device, dtype=dtype, non_blocking=True)
        else:
            out = into.copy_(src, non_blocking=True)
            device = out.device
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(device))
        buf.copied = ev
    return out


def _run_forward(module, hidden, ids, weights, cache, dropout):
    """forward_sft on CPU tensors: returns (out, handle).  Device tensors
    are copied in and out through pinned KExpertsSFTBuffer staging buffers
    (the result goes back to the device without blocking).  dropout: (p, seed)."""
    x = _kernel_dtype(hidden.detach())
    w = weights.detach()
    p, seed = dropout
    drop = dict(lora_dropout=p, dropout_seed=seed if p > 0 else None)
    prof = _profile.active()
    if x.device.type == "cpu":
        with _profile.timer("kernel_fwd"):
            out, handle = module.wrapper.forward_sft(
                x.contiguous(), ids.contiguous(), w.contiguous(), save_for_backward=cache,
                return_handle=True, **drop)
        return out.to(dtype=hidden.dtype), handle
    buf = _staging(module, x.shape[0], x.dtype)
    with buf.lock:  # the forward copies what it keeps: the buffers are free again after it
        t = _stage_inputs(buf, x, ids, w, prof)
        with _profile.timer("kernel_fwd"):
            _, handle = module.wrapper.forward_sft(
                t["input_cpu"], t["expert_ids_cpu"], t["weights_cpu"], save_for_backward=cache,
                return_handle=True, out=t["output_cpu"], **drop)
        return _copy_back(buf, t["output_cpu"], hidden.device, hidden.dtype), handle


def _stage_inputs(buf, x, ids, w, prof):
    """The forward's inputs, on the device, into `buf`'s pinned host buffers
    (the caller holds buf.lock): its views for x's tokens."""
    t = buf.view(x.shape[0])
    _free_staging(buf)
    stream = _sync(x.device, prof)
    with _profile.timer("d2h"):
        t["input_cpu"].copy_(x, non_blocking=True)
        t["expert_ids_cpu"].copy_(ids, non_blocking=True)
        t["weights_cpu"].copy_(w, non_blocking=True)
        stream.synchronize()
    return t


def _start_forward(module, hidden, ids, weights, cache, dropout, hold=None):
    """_run_forward with the native call on the worker thread (the shared
    experts overlap, ktsft/_overlap.py): the inputs are copied to the host
    now, and a placeholder for the result is returned at once as
    ``pending.out`` (hidden's dtype: the callers defer bf16 and fp32 only);
    the block joins it (fills the placeholder) before anything reads it.
    hold: a context exited when the native call is done (the PEFT path's
    LoRA staging)."""
    x = _kernel_dtype(hidden.detach())
    w = weights.detach()
    p, seed = dropout
    drop = dict(lora_dropout=p, dropout_seed=seed if p > 0 else None)
    prof = _profile.active()
    wrapper = module.wrapper
    if x.device.type == "cpu":  # the tests' path (_overlap.FORCE_CPU)
        args = (x.contiguous(), ids.contiguous(), w.contiguous())
        buf = t = None
        out = torch.empty(x.shape, dtype=x.dtype)
    else:
        buf = _staging(module, x.shape[0], x.dtype)
        buf.lock.acquire()  # released by finish(): the worker reads and writes them until then
        try:
            t = _stage_inputs(buf, x, ids, w, prof)
        except BaseException:
            buf.lock.release()
            raise
        args = (t["input_cpu"], t["expert_ids_cpu"], t["weights_cpu"])
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    span = {}

    def native():
        t0 = time.perf_counter()
        try:
            with _profile.timer("kernel_fwd"):
                kw = {} if t is None else dict(out=t["output_cpu"])
                return wrapper.forward_sft(*args, save_for_backward=cache, return_handle=True,
                                           **drop, **kw)
        finally:
            span["native"] = (t0, time.perf_counter())

    try:
        fut = _overlap.submit(native)
    except BaseException:
        if buf is not None:
            buf.lock.release()
        raise

    def finish(t_submit):
        try:
            t_join = time.perf_counter()
            with _profile.timer("join_wait"):
                res, handle = fut.result()
            if prof is not None:  # the native call's time the caller spent elsewhere
                a, b = span["native"]
                prof.add("overlap", max(0.0, min(b, t_join) - a))
            # into the placeholder's memory, outside autograd: `out` is the
            # Function's output by now, and a recorded copy_ would replace its
            # history (its gradient would stop at the copy).  Through .data,
            # whose version counter is its own: a version bump of `out` would
            # make autograd replay the views taken of it meanwhile as
            # as_strided, whose backward copies the gradient
            with torch.no_grad():
                if buf is None:
                    out.data.copy_(res)
                else:
                    _copy_back(buf, t["output_cpu"], None, None, into=out.data)
        finally:
            if buf is not None:
                buf.lock.release()
            if hold is not None:
                hold.close()
        return handle

    return _overlap.Pending(out, finish)


def _run_backward(module, grad_out, handle, grads_out, accumulate=False, dtype=None, ready=None):
    """backward on CPU tensors: returns (grad_input in `dtype` on
    grad_out's device, grads); device tensors go through the staging
    buffers as in _run_forward.  ready: the overlapped block whose output's
    gradient event lets the copy skip the GPU work queued after it."""
    g = _kernel_dtype(grad_out.detach())
    dtype = grad_out.dtype if dtype is None else dtype
    kw = dict(handle=handle, grads_out=grads_out, accumulate=accumulate)
    prof = _profile.active()
    if g.device.type == "cpu":
        with _profile.timer("kernel_bwd"):
            dx, grads = module.wrapper.backward(g.contiguous(), **kw)
        return dx.to(dtype=dtype), grads
    buf = _staging(module, g.shape[0], g.dtype)
    with buf.lock:
        t = buf.view(g.shape[0])
        _free_staging(buf)
        ev = ready.ready_event(g) if ready is not None else None
        if ev is None:
            stream = _sync(g.device, prof)
            with _profile.timer("d2h"):
                t["grad_output_cpu"].copy_(g, non_blocking=True)
                stream.synchronize()
        else:  # the shared experts' backward, queued after ev, runs on meanwhile
            side = _overlap.copy_stream(g.device)
            side.wait_event(ev)
            with _profile.timer("d2h"), torch.cuda.stream(side):
                t["grad_output_cpu"].copy_(g, non_blocking=True)
                side.synchronize()
        with _profile.timer("kernel_bwd"):
            _, grads = module.wrapper.backward(t["grad_output_cpu"],
                                               grad_input_out=t["grad_input_cpu"], **kw)
        return _copy_back(buf, t["grad_input_cpu"], grad_out.device, dtype), grads


class _ExpertsFunction(torch.autograd.Function):
    """One forward_sft/backward pair.  The activation cache lives in the
    wrapper; ctx holds its handle, so each backward pairs with its own
    forward in any order, and a graph freed without backward releases it.
    ctx also keeps references to the inputs (no copies): in recompute mode,
    or for a second backward through a retained graph, the forward is run
    again from them, with the LoRA-dropout seed of the first run (kept on
    ctx), so the masks are the same.  The last argument is (p, seed)."""

    @staticmethod
    def forward(ctx, module, hidden, ids, weights, *params_and_dropout):
        dropout = params_and_dropout[-1]
        module._sync_lora()
        save = any(ctx.needs_input_grad[1:])
        cache = save and not module.recompute
        ctx.dropout = dropout
        ctx.meta = (hidden.dtype, weights.dtype, hidden.device)
        ctx.module = module
        if save:
            ctx.save_for_backward(hidden, ids, weights)
        blk = _overlap.current(hidden) if hidden.dtype in (torch.float32, torch.bfloat16) else None
        ctx.block = blk
        if blk is not None:  # shared experts overlap: the native call runs on the worker
            pending = _start_forward(module, hidden, ids, weights, cache, dropout)
            ctx.handle, ctx.release, ctx.pending = None, _Spent(), pending
            pending.then(lambda handle: _ExpertsFunction._bind(ctx, handle, cache))
            blk.defer(pending)
            return pending.out
        out, handle = _run_forward(module, hidden, ids, weights, cache, dropout)
        _ExpertsFunction._bind(ctx, handle, cache)
        return out

    @staticmethod
    def _bind(ctx, handle, cache):
        ctx.release = weakref.finalize(ctx, ctx.module.wrapper.release, handle) if cache \
            else _Spent()
        ctx.handle, ctx.pending = handle, None

    @staticmethod
    @once_differentiable  # second-order gradients raise instead of being silently zero
    def backward(ctx, grad_out):
        h_dtype, w_dtype, dev = ctx.meta
        module = ctx.module
        _overlap.joined(ctx)
        handle = ctx.handle
        if not ctx.release.alive:  # recompute mode, or the cache was spent
            hidden, ids, weights = ctx.saved_tensors
            module._sync_lora()
            _, handle = _run_forward(module, hidden, ids, weights, True, ctx.dropout)
        shapes = lora_shapes(module.num_experts, module.hidden_size, module.intermediate_size,
                             module.r)
        need = ctx.needs_input_grad
        params = module.lora_parameters()
        # the LoRA gradients go straight into the parameters' .grad where
        # autograd would only store or add them there (ktsft/_grads.py)
        outs, accumulate, install, returned = _grads.plan(
            module, LORA_GRAD_NAMES, params, [shapes[n] for n in LORA_GRAD_NAMES], need[4:10])
        dx, grads = _run_backward(module, grad_out, handle,
                                  {n: t.detach().numpy() for n, t in outs.items()}, accumulate,
                                  dtype=h_dtype, ready=ctx.block)
        ctx.block = None
        ctx.release.detach()
        ctx.release = _Spent()
        for i, buf in install.items():
            params[i].grad = buf
        with _profile.timer("h2d"):
            dw = torch.as_tensor(grads["grad_routing_weights"]).to(device=dev, dtype=w_dtype)
        pgrads = [returned.get(i) for i in range(len(LORA_GRAD_NAMES))]
        return (None, dx if need[1] else None, None, dw if need[3] else None, *pgrads, None)


class _Spent:
    """Stands in for a finalizer that has nothing (left) to release."""

    alive = False

    def detach(self):
        return None


def _np_to_torch(a):
    """A CPU torch tensor sharing `a`'s memory (bf16 as torch.bfloat16);
    non-contiguous views are copied first, so a pickle holds the view only."""
    from ._arrays import BF16

    a = np.ascontiguousarray(a)
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _torch_to_np(t):
    from ._arrays import as_numpy

    return as_numpy(t.detach().cpu(), "base weights")


class _SharedBase:
    """One layer's frozen base weights as its SFTMoEWrapper holds them
    ((gate, up, down) arrays in slot order, the logical -> slot map and the
    int8/int4 scales).

    ``copy.deepcopy`` returns this very object: a deep copy of a module
    shares the base weights by reference.  Nothing writes them (they are
    frozen; ``load_weights`` registers new arrays, it never writes the old
    ones), so sharing is safe, and a reference model copied for RLHF/DPO
    (TRL's ``create_reference_model``) or an EMA copy costs no second copy
    of the experts.  Pickling (``pickle``, ``torch.save``) writes the
    arrays as torch tensors: torch.save streams them as storages."""

    __slots__ = ("arrays", "slot", "scales")

    def __init__(self, arrays, slot, scales):
        self.arrays, self.slot, self.scales = tuple(arrays), slot, scales

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    def __reduce__(self):
        scales = None if self.scales is None else [_np_to_torch(s) for s in self.scales]
        return (_SharedBase._restore, ([_np_to_torch(a) for a in self.arrays],
                                        _np_to_torch(self.slot), scales))

    @staticmethod
    def _restore(arrays, slot, scales):
        return _SharedBase([_torch_to_np(a) for a in arrays], _torch_to_np(slot),
                           None if scales is None else [_torch_to_np(s) for s in scales])

    def install(self, wrapper) -> None:
        """Register these arrays with `wrapper`'s kernels, in place: the tail
        of SFTMoEWrapper.load_weights without its conversions and checks
        (the arrays passed them when first loaded)."""
        arrays, slot, scales = self.arrays, self.slot, self.scales
        views = [a.view(np.uint16) if wrapper.dtype == "bf16" else a for a in arrays]
        strides = None if scales is not None else tuple(
            a.strides[0] // a.itemsize if a.shape[0] > 1 else a[0].size for a in arrays)
        with wrapper._lock:
            wrapper._kernel.set_base_weights(*views, slot, scales=scales, expert_strides=strides)
            wrapper._base = (list(arrays), slot, scales)


def _check_call(x, ids, w, H: int, k: int, E: int,
                names=("hidden_states", "topk_ids", "topk_weights"), sentinel=False) -> None:
    """The module's arguments, named as the caller passed them (the wrapper
    checks again under its own names): tensors; hidden_states [..., H]
    floating point; topk_ids and topk_weights of hidden_states' leading
    shape and k; ids integers in [0, E); weights floating point, finite as
    float32 (the dtype the kernels read them in).  `names`: the caller's
    names of the three; sentinel: ids == E allowed (transformers' mark of a
    slot no local expert owns)."""
    nx, ni, nw = names
    for name, t in ((nx, x), (ni, ids), (nw, w)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if x.dim() < 1 or x.shape[-1] != H:
        raise ValueError(f"{nx}: expected shape [..., {H}] (hidden_size), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{nx}: expected a floating-point tensor, got {x.dtype}")
    want = (*x.shape[:-1], k)
    for name, t in ((ni, ids), (nw, w)):
        if tuple(t.shape) != want:
            raise ValueError(f"{name}: expected shape {want} ({nx}' leading shape, top_k), got "
                             f"{tuple(t.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{ni}: expected an integer tensor (the router's top-k indices), got "
                        f"{ids.dtype}")
    top = E + 1 if sentinel else E
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= top:
            raise ValueError(f"{ni}: expert id {lo if lo < 0 else hi} out of range [0, {E})"
                             + (f" (or {E}, the mark of no local expert)" if sentinel else ""))
    if not w.is_floating_point():
        raise TypeError(f"{nw}: expected a floating-point tensor, got {w.dtype}")
    if w.numel() and not bool(torch.isfinite(w.detach().float()).all()):
        raise ValueError(f"{nw}: contains a value that is not finite as float32 (NaN, inf, or "
                         "beyond float32's range)")


class LoRAExperts(AdapterIO, torch.nn.Module):
    """Routed experts of one MoE layer with LoRA on gate, up and down.

    Base weights are frozen and held by a ktsft SFTMoEWrapper (bf16 or fp32);
    the LoRA matrices are float32 nn.Parameters: ``gate_lora_a`` [E, r, H],
    ``gate_lora_b`` [E, I, r], ``up_lora_a``, ``up_lora_b``, ``down_lora_a``
    [E, r, I], ``down_lora_b`` [E, H, r].  Initialised as PEFT does (A
    Kaiming-uniform, B zero), so a fresh module computes the base experts.
    Scaling is alpha / r, or alpha / sqrt(r) with ``use_rslora``.
    ``max_cache_depth`` bounds the forwards awaiting their backward.
    ``recompute=True`` caches only references to the inputs and runs the
    forward again in backward: activation memory traded for compute.
    ``lora_dropout`` in [0, 1): PEFT's LoRA dropout on the input of each
    LoRA (gate, up: x; down: h), active in training mode only; each
    forward draws its mask seed from torch's default generator, so
    ``torch.manual_seed`` reproduces a run (and torch.utils.checkpoint,
    which restores the RNG state, recomputes with the same masks).
    ``threadpool_count``: NUMA pools of the layer's threads (SFTMoEWrapper).

    ``copy.deepcopy``, ``pickle`` and ``torch.save`` / ``torch.load``
    (``weights_only=False``) work: the copy has its own kernel state and
    its own LoRA parameters (copies of the values), and computes the same.
    A deep copy shares the frozen base weights with the original by
    reference (no second copy of the experts; nothing writes them); a
    pickle holds them.  Forwards awaiting their backward are not copied.
    """

    def __init__(self, num_experts, top_k, hidden_size, intermediate_size, r=16, alpha=32.0,
                 dtype="bf16", use_rslora=False, threads=None, max_cache_depth=8,
                 chunked_prefill_size=8192, layer_idx=0, isa=None, recompute=False,
                 lora_dropout=0.0, threadpool_count=1):
        super().__init__()
        self._requested = dict(threads=threads, isa=isa)  # re-resolved by a copy (pickle)
        self.recompute = bool(recompute)
        from . import validation as V

        # sizes as the numpy API takes them: integers (r=2.7 is refused, not truncated)
        self.num_experts = V.check_int(num_experts, "num_experts")
        self.top_k = V.check_int(top_k, "top_k")
        self.hidden_size = V.check_int(hidden_size, "hidden_size")
        self.intermediate_size = V.check_int(intermediate_size, "intermediate_size")
        self.r = V.check_int(r, "r")
        self.alpha, self.use_rslora = V.check_positive_float(alpha, "alpha"), bool(use_rslora)
        # the wrapper scales by lora_alpha / r; rsLoRA wants alpha / sqrt(r)
        wrapper_alpha = self.alpha * math.sqrt(self.r) if self.use_rslora else self.alpha
        self.wrapper = SFTMoEWrapper(layer_idx, self.num_experts, self.top_k, self.hidden_size,
                                     self.intermediate_size, cpuinfer_threads=threads,
                                     chunked_prefill_size=chunked_prefill_size, lora_rank=self.r,
                                     lora_alpha=wrapper_alpha, max_cache_depth=max_cache_depth,
                                     dtype=dtype, isa=isa, lora_dropout=lora_dropout,
                                     threadpool_count=threadpool_count)
        shapes = lora_shapes(self.num_experts, self.hidden_size, self.intermediate_size, self.r)
        for name, gname in zip(PARAM_NAMES, LORA_GRAD_NAMES):
            self.register_parameter(name, torch.nn.Parameter(torch.empty(shapes[gname])))
        self.reset_lora_parameters()

    @property
    def scaling(self) -> float:
        return self.wrapper.lora_scaling

    # ---- copy / pickle -----------------------------------------------------
    def __getstate__(self):
        state = super().__getstate__()
        w = state.pop("wrapper")
        # the gradient bookkeeping of ktsft/_grads.py (autograd nodes, the
        # persistent buffers) belongs to this module's parameters: a copy
        # makes its own
        state.pop("_ktsft_acc_nodes", None)
        state.pop("_ktsft_grad_bufs", None)
        req = state.get("_requested", {})
        state["_registered"] = None
        state["_ktsft_wrapper"] = {
            "args": dict(layer_idx=w.layer_idx, num_experts=w.num_experts,
                         num_experts_per_tok=w.num_experts_per_tok, hidden_size=w.hidden_size,
                         moe_intermediate_size=w.moe_intermediate_size,
                         cpuinfer_threads=req.get("threads"), threadpool_count=w.threadpool_count,
                         weight_path=w.weight_path, chunked_prefill_size=w.chunked_prefill_size,
                         lora_rank=w.lora_rank, lora_alpha=w.lora_alpha,
                         max_cache_depth=w.max_cache_depth, dtype=w.dtype, isa=req.get("isa"),
                         quant_group=w.quant_group, lora_dropout=w.lora_dropout),
            "rng": w._dropout_rng,
            "base": None if w._base is None else _SharedBase(*w._base),
        }
        return state

    def __setstate__(self, state):
        spec = state.pop("_ktsft_wrapper", None)
        super().__setstate__(state)
        if spec is None:  # pragma: no cover - a state without kernels (not written by us)
            return
        w = SFTMoEWrapper(**spec["args"])
        w._dropout_rng = spec["rng"]
        if spec["base"] is not None:
            spec["base"].install(w)
        self.wrapper = w
        self._registered = None
        self._sync_lora()

    @property
    def lora_dropout(self) -> float:
        return self.wrapper.lora_dropout

    @lora_dropout.setter
    def lora_dropout(self, p) -> None:
        from .validation import check_dropout

        self.wrapper.lora_dropout = check_dropout(p, "lora_dropout")

    def _dropout(self) -> tuple:
        """(p, seed) of the next forward: p = 0 in eval mode."""
        p = self.wrapper.lora_dropout
        if not self.training or p == 0.0:
            return (0.0, 0)
        return (p, int(torch.randint(1 << 62, (1,)).item()))

    def lora_parameters(self):
        return [getattr(self, n) for n in PARAM_NAMES]

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's default: A ~ kaiming_uniform(a=sqrt(5)) per expert, B = 0."""
        for name in PARAM_NAMES:
            p = getattr(self, name)
            if name.endswith("_a"):
                for e in range(self.num_experts):
                    torch.nn.init.kaiming_uniform_(p[e], a=math.sqrt(5))
            else:
                p.zero_()
        self._registered = None
        self._sync_lora()

    def load_weights(self, gate_proj, up_proj, down_proj, physical_to_logical_map=None):
        """Frozen base weights [E, I, H], [E, I, H], [E, H, I] (numpy or CPU
        torch; used in place when already in the storage dtype)."""
        self.wrapper.load_weights(physical_to_logical_map, gate_proj=gate_proj, up_proj=up_proj,
                                  down_proj=down_proj)

    def _sync_lora(self) -> None:
        """Register the parameters' memory with the kernels when it moved
        (first call, ``param.data = ...``, ``module.to(...)``)."""
        params = self.lora_parameters()
        for n, p in zip(PARAM_NAMES, params):
            if p.device.type != "cpu" or p.dtype != torch.float32:
                raise TypeError(f"{n}: LoRA parameters must stay float32 on the CPU, got {p.dtype} "
                                f"on {p.device}")
        ptrs = tuple(p.data_ptr() for p in params)
        if ptrs != self._registered:
            self.wrapper.init_lora_weights(*[p.detach() for p in params])
            self._registered = ptrs

    def forward(self, hidden_states, topk_ids, topk_weights):
        """hidden_states [..., H], topk_ids / topk_weights [..., k] -> [..., H]."""
        _check_call(hidden_states, topk_ids, topk_weights, self.hidden_size, self.top_k,
                    self.num_experts)
        if topk_ids.dtype not in (torch.int32, torch.int64):
            topk_ids = topk_ids.long()  # int8 / int16 / uint8 indices: the values as they are
        lead = hidden_states.shape[:-1]
        x = hidden_states.reshape(-1, self.hidden_size)
        ids = topk_ids.reshape(-1, self.top_k)
        w = topk_weights.reshape(-1, self.top_k)
        out = _ExpertsFunction.apply(self, x, ids, w, *self.lora_parameters(), self._dropout())
        return out.reshape(*lead, self.hidden_size)

    # ---- adapters (ktsft/adapters.py AdapterIO: save_adapter, export_peft_fused,
    # load_adapter, which copies into the parameters in place)
    def adapter_layer(self):
        mats = {n: p.detach() for n, p in zip(PARAM_NAMES, self.lora_parameters())}
        return (self.wrapper.layer_idx, mats, self.r, self.alpha, self.use_rslora,
                self.lora_dropout)

    def _adapter_expect(self):
        return self.wrapper.layer_idx, dict(num_experts=self.num_experts,
                                            hidden_size=self.hidden_size,
                                            intermediate_size=self.intermediate_size, r=self.r,
                                            scaling=self.scaling)

    @torch.no_grad()
    def _adapter_store(self, mats) -> None:
        for n, p in zip(PARAM_NAMES, self.lora_parameters()):
            p.copy_(torch.from_numpy(mats[n]))

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size}, r={self.r}, alpha={self.alpha}, "
                f"rslora={self.use_rslora}, dropout={self.lora_dropout}, dtype={self.wrapper.dtype}")
