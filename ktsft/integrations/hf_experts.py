"""ktsft as a transformers experts implementation ("ktsft").

    import ktsft.integrations.transformers            # registers "ktsft"
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="ktsft")
    # or: model.set_experts_implementation("ktsft")
    model = get_peft_model(model, LoraConfig(
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        target_modules=["q_proj", "v_proj"]))          # PEFT's own LoRA, trained by ktsft

transformers >= 5 dispatches every experts module decorated with
``@use_experts_implementation`` through ``ExpertsInterface``: the module's
``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``
becomes ``experts_forward(module, ...)``.  Registered as "ktsft", that call
runs on the ktsft kernels:

* **Base weights where transformers keeps them.**  ``gate_up_proj`` [E, 2I,
  H] is read in place (gate = rows [0, I), up = rows [I, 2I) of each expert,
  an expert stride of 2IH elements) and ``down_proj`` [E, H, I] likewise:
  one copy, which ``save_pretrained`` writes as usual.  The kernels' dtype
  follows the weights (bf16 -> bf16 kernels, fp32 -> fp32).  The native
  state lives in a side table keyed weakly by the module, not in it, so
  ``copy.deepcopy``, pickle and ``torch.save`` of the model see only torch
  tensors; a copy builds its own state on its first forward.  If the
  parameters are replaced (``param.data = ...``, a dtype change), the next
  call notices the new address and rebinds.

* **PEFT's LoRA without W + dW.**  PEFT's ``ParamWrapper`` (``LoraConfig(
  target_parameters=...)``) activates its LoRA as a parametrisation of the
  parameter: registering it evaluates W + s B A for all experts once, and
  reading ``module.gate_up_proj`` would again.  ``patch_peft`` (installed
  by ``register``) makes a ParamWrapper over an experts module that runs on
  ktsft publish its low-rank factors instead (PEFT's own
  ``get_delta_factors``: B as [E, out, r], A as [E, r, in], the scaling),
  differentiable views of PEFT's ``lora_B`` / ``lora_A`` weights; without
  the patch the same factors are read off PEFT's parametrisation, never
  evaluating it.  gate_up's single A serves gate and up (the kernels
  read the same memory twice); its B is split into the gate and up halves.
  A is read in place; B is copied each forward into persistent buffers
  because PEFT stores it rank-major ([out, r * E], column q * E + e), not
  the [E, out, r] the kernels read: (2I + H) r E floats per layer, about 2%
  of the bf16 weights it saves materialising.  Gradients go back through
  the same views, so PEFT's parameters get them (autograd does the
  transposition).  Adapters disabled (``disable_adapter()``) or merged:
  the base weights alone.

* **Autograd, checkpointing, autocast.**  One ``torch.autograd.Function``
  per call; the activation cache is ktsft's (the handle lives on ctx).
  Under saved-tensor hooks (non-reentrant ``torch.utils.checkpoint``,
  activation offloading) the forward keeps no private cache and backward
  recomputes from the inputs the hooks hand back, so checkpointing saves
  the host memory it promises.  ``torch.amp.custom_fwd`` / ``custom_bwd``
  keep backward in the forward's autocast state; the kernels compute in
  fp32 (bf16 base products) whatever autocast says.

Refused with a message naming the model: experts with biases, without a
gate, with a post-expert norm, a custom ``_apply_gate``, a non-SiLU
activation, transposed or interleaved gate_up layouts, expert weights not in
host memory, fp16/fp8 weights (use ``configure(model, dtype=...)``), and
trainable base weights (ktsft trains LoRA only).
"""
from __future__ import annotations

import contextlib
import math
import threading
import weakref

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import profile
from ..schema import LORA_GRAD_NAMES, lora_shapes
from ..wrapper import SFTMoEWrapper

NAME = "ktsft"
_DTYPES = {torch.bfloat16: "bf16", torch.float32: "fp32"}
# per experts module: its native state (weak: the module owns nothing native)
_STATE: "weakref.WeakKeyDictionary[torch.nn.Module, _Binding]" = weakref.WeakKeyDictionary()
# per experts module: options set by configure()
_OPTIONS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_CHECKED: dict = {}  # experts class -> None (supported) or the reason it is not


# ---------------------------------------------------------------------------
# what the kernels support
# ---------------------------------------------------------------------------
def is_silu(act) -> bool:
    """Whether an activation module/function computes SiLU."""
    if act is None or isinstance(act, torch.nn.SiLU):
        return act is not None
    try:
        t = torch.linspace(-6, 6, 25)
        return bool(torch.allclose(act(t), F.silu(t), atol=1e-6))
    except Exception:  # noqa: BLE001
        return False


def unsupported_reason(module) -> str | None:
    """Why the kernels cannot run this experts module (None: they can)."""
    cls = type(module)
    if cls in _CHECKED:
        return _CHECKED[cls]
    reason = None
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # pragma: no cover - transformers < 5
        _default_apply_gate = None
    if getattr(module, "has_bias", False):
        reason = "its experts have biases"
    elif getattr(module, "has_gate", True) is False:
        reason = "its experts have no gate projection (ktsft computes down(silu(gate x) * up x))"
    elif getattr(module, "has_post_expert_norm", False):
        reason = "it applies a norm after each expert"
    elif getattr(module, "is_transposed", False):
        reason = "its expert weights are stored transposed ([E, H, 2I]); not supported yet"
    elif getattr(module, "is_concatenated", True) is False:
        reason = "its gate_up_proj interleaves gate and up rows; not supported yet"
    elif _default_apply_gate is not None and getattr(cls, "_apply_gate", _default_apply_gate) \
            is not _default_apply_gate:
        reason = f"it has its own gating function ({cls.__name__}._apply_gate)"
    elif not is_silu(getattr(module, "act_fn", None)):
        reason = f"its activation {getattr(module, 'act_fn', None)!r} is not SiLU"
    elif not all(isinstance(getattr(module, n, None), torch.Tensor) for n in ("gate_up_proj",
                                                                             "down_proj")):
        reason = "it has no gate_up_proj / down_proj tensors"
    _CHECKED[cls] = reason
    return reason


def _where(module) -> str:
    cfg = getattr(module, "config", None)
    mt = getattr(cfg, "model_type", None)
    return f"{type(module).__name__}" + (f" (model_type={mt!r})" if mt else "")


def mask_sentinel(top_k_index, top_k_weights, num_experts):
    """transformers marks slots owned by no local expert with id == E (expert
    parallelism).  They contribute nothing: point them at expert 0 with a
    weight of exactly 0 (the multiply also zeroes their weight gradient)."""
    if top_k_index.numel() and int(top_k_index.max()) >= num_experts:
        keep = top_k_index < num_experts
        top_k_index = torch.where(keep, top_k_index, torch.zeros_like(top_k_index))
        top_k_weights = top_k_weights * keep.to(top_k_weights.dtype)
    return top_k_index, top_k_weights


# ---------------------------------------------------------------------------
# the parameters as they are this call: base tensors and PEFT's factors
# ---------------------------------------------------------------------------
_ACTIVE = threading.local()  # .d: id(experts module) -> {param name: (B, A, scaling)}


def _active(module) -> dict:
    d = getattr(_ACTIVE, "d", None)
    if d is None:
        d = _ACTIVE.d = {}
    return d.setdefault(id(module), {})


def _param_and_lora(module, name):
    """(base tensor, (B [E, out, r], A [E, r, in], scaling) or None)."""
    from torch.nn.utils import parametrize

    factors = getattr(_ACTIVE, "d", {}).get(id(module), {}).get(name)
    if factors is not None:  # PEFT's ParamWrapper handed its factors over (patch_peft)
        return getattr(module, name), factors
    if not parametrize.is_parametrized(module, name):
        return getattr(module, name), None
    # PEFT activated its LoRA as a parametrisation (patch_peft not installed):
    # read its factors; never read module.<name>, which would compute W + dW
    plist = module.parametrizations[name]
    found = None
    for proxy in plist:
        lhs, rhs, s = (getattr(proxy, a, None) for a in ("lhs", "rhs", "scaling"))
        if isinstance(lhs, torch.Tensor) and isinstance(rhs, torch.Tensor) and found is None:
            found = (lhs, rhs, float(s), None)
            continue
        kind = type(proxy).__name__
        raise NotImplementedError(
            f"{_where(module)}.{name}: a parametrisation ktsft cannot read without "
            f"materialising W + dW ({kind}); ktsft supports one active PEFT LoRA adapter on "
            "bf16/fp32 expert weights (several active adapters, or fp8 weights, make PEFT add a "
            "dense delta)")
    return plist.original, found


def _runs_on_ktsft(module) -> bool:
    return getattr(getattr(module, "config", None), "_experts_implementation", None) == NAME


def _peft_factors(wrapper, adapter):
    """(B [E, out, r], A [E, r, in], scaling, B's parameter) of a PEFT
    ParamWrapper on a [E, out, in] parameter, as views of its fp32 lora_B /
    lora_A weights: PEFT keeps A expert-major ([E * r, in], row e * r + q)
    and B rank-major ([out, r * E], column q * E + e), the layout its own
    get_delta_factors reads.  Unlike get_delta_factors, no cast to the base
    weights' dtype: ktsft computes the LoRA in fp32 on the fp32 parameters."""
    A = wrapper.lora_A[adapter].weight
    B = wrapper.lora_B[adapter].weight
    E = wrapper.num_experts
    return (B.view(B.shape[0], -1, E).permute(2, 0, 1), A.view(E, -1, A.shape[-1]),
            float(wrapper.scaling[adapter]), B)


def patch_peft() -> bool:
    """Let PEFT's ParamWrapper hand its LoRA factors to the 'ktsft' experts
    instead of registering a parametrisation.  PEFT's
    ``register_parametrization`` evaluates W + dW once to check it (a
    transient dense copy of every expert, the peak memory of the forward);
    for an experts module running on ktsft, with one active adapter on a
    [E, out, in] gate_up_proj / down_proj, the patched context only
    publishes ``get_delta_factors(adapter)`` for the duration of the call.
    Everything else goes to PEFT's own code.  Idempotent; False without PEFT."""
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:
        return False
    if getattr(ParamWrapper._activate_lora, "_ktsft", False):
        return True
    original = ParamWrapper._activate_lora

    @contextlib.contextmanager
    def _activate_lora(self, active_adapters):
        base = self.get_base_layer()
        adapters = [a for a in (active_adapters or []) if a in self.lora_A]
        if (len(adapters) == 1 and _runs_on_ktsft(base) and getattr(self, "num_experts", 1) > 1
                and self.parameter_name in ("gate_up_proj", "down_proj")
                and not getattr(base, "is_transposed", False)):
            slot = _active(base)
            slot[self.parameter_name] = _peft_factors(self, adapters[0])
            try:
                yield
            finally:
                slot.pop(self.parameter_name, None)
                if not slot:
                    _ACTIVE.d.pop(id(base), None)
            return
        with original(self, active_adapters):
            yield

    _activate_lora._ktsft = True
    ParamWrapper._activate_lora = _activate_lora
    return True


class _Binding:
    """The native side of one experts module: its ktsft wrappers (one per
    LoRA rank and scaling seen; each reads the module's weights in place)
    and the bound addresses."""

    def __init__(self, module):
        self.module = weakref.ref(module)
        self.wrappers = {}
        self.key = None
        self.num_experts = self.hidden_size = self.intermediate_size = self.top_k = None
        self.dtype = None
        self.registered = {}  # id(wrapper) -> addresses of the LoRA arrays it was given

    # -- the base weights -------------------------------------------------
    def bind(self, module, gu, dn):
        key = (gu.data_ptr(), dn.data_ptr(), gu.dtype, dn.dtype, tuple(gu.shape),
               tuple(dn.shape), tuple(gu.stride()), tuple(dn.stride()))
        if key == self.key:
            return
        where = _where(module)
        for n, t in (("gate_up_proj", gu), ("down_proj", dn)):
            if t.device.type != "cpu":
                raise ValueError(
                    f"{where}.{n} is on {t.device}: the 'ktsft' experts implementation reads the "
                    "routed-expert weights in host memory.  Keep `mlp.experts` on the CPU (e.g. "
                    "ktsft.integrations.checkpoint.load_moe_checkpoint, or a device_map that maps "
                    "the experts to 'cpu') and put the rest of the model on the GPU")
            if t.dtype not in _DTYPES:
                raise TypeError(
                    f"{where}.{n} is {t.dtype}: ktsft's kernels read bf16 or fp32 expert weights; "
                    "convert them once with ktsft.integrations.transformers.configure(model, "
                    "dtype='bf16')")
        if gu.dtype != dn.dtype:
            raise TypeError(f"{where}: gate_up_proj is {gu.dtype} but down_proj is {dn.dtype}")
        if gu.dim() != 3 or dn.dim() != 3 or gu.shape[1] % 2:
            raise ValueError(f"{where}: gate_up_proj {tuple(gu.shape)} and down_proj "
                             f"{tuple(dn.shape)} are not [E, 2I, H] and [E, H, I]")
        E, I2, H = gu.shape
        I = I2 // 2
        if tuple(dn.shape) != (E, H, I):
            raise ValueError(f"{where}: down_proj is {tuple(dn.shape)}, expected [E, H, I] = "
                             f"{(E, H, I)} from gate_up_proj {tuple(gu.shape)}")
        top_k = getattr(module, "top_k", None) or getattr(getattr(module, "config", None),
                                                          "num_experts_per_tok", None)
        if top_k is None:
            raise ValueError(f"{where}: cannot find top_k (module.top_k or "
                             "config.num_experts_per_tok)")
        dims = (E, H, I, int(top_k), _DTYPES[gu.dtype])
        if dims != (self.num_experts, self.hidden_size, self.intermediate_size, self.top_k,
                    self.dtype):
            self.wrappers.clear()
            self.registered.clear()
        self.num_experts, self.hidden_size, self.intermediate_size, self.top_k, self.dtype = dims
        self._views = (gu.detach()[:, :I], gu.detach()[:, I:], dn.detach())
        for w in self.wrappers.values():
            w.load_weights(gate_proj=self._views[0], up_proj=self._views[1],
                           down_proj=self._views[2])
        self.key = key

    def wrapper(self, r, scaling):
        """The layer's wrapper for LoRA rank r and this scaling."""
        w = self.wrappers.get((r, scaling))
        if w is None:
            module = self.module()
            opts = _OPTIONS.get(module, {})
            w = SFTMoEWrapper(_layer_index(module), self.num_experts, self.top_k,
                              self.hidden_size, self.intermediate_size,
                              cpuinfer_threads=opts.get("threads"),
                              chunked_prefill_size=opts.get("max_tokens", 16384),
                              lora_rank=r, lora_alpha=scaling * r,
                              max_cache_depth=opts.get("max_cache_depth", 4), dtype=self.dtype,
                              isa=opts.get("isa"),
                              threadpool_count=opts.get("threadpool_count", 1))
            w.load_weights(gate_proj=self._views[0], up_proj=self._views[1],
                           down_proj=self._views[2])
            self.wrappers[(r, scaling)] = w
        return w

    def staging(self, r):
        return _Staging.shared(self.num_experts, self.hidden_size, self.intermediate_size, r)


class _Staging:
    """PEFT's LoRA in ktsft's layout, for every layer of one shape: the B
    buffers (PEFT keeps B rank-major, so it is copied), A copies where PEFT's
    A is not fp32, and the zeros that stand for a projection without LoRA.
    Shared by the layers (weakly held, like the kernels' workspace): one set
    is (2I + H) r E floats, 29 MB at the Qwen3-30B-A3B shape, 1.4 GB if each
    of 48 layers kept its own.  A layer stages its LoRA under ``lock`` just
    before each kernel call, forward and backward (B is unchanged between
    them), so another layer's forward in between cannot leave it stale."""

    _shared: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
    _shared_lock = threading.Lock()

    def __init__(self, E, H, I, r):
        self.num_experts, self.hidden_size, self.intermediate_size, self.r = E, H, I, r
        self.lock = threading.RLock()
        self.bufs = {}
        self.zeros = None

    @classmethod
    def shared(cls, E, H, I, r):
        key = (int(E), int(H), int(I), int(r))
        with cls._shared_lock:
            st = cls._shared.get(key)
            if st is None:
                st = cls._shared[key] = cls(*key)
            return st

    def _zeros(self, r):
        n = self.num_experts * r * max(self.hidden_size, self.intermediate_size)
        if self.zeros is None or self.zeros.numel() < n:
            self.zeros = torch.zeros(n)
        return self.zeros

    def _buf(self, name, shape):
        b = self.bufs.get(name)
        if b is None or tuple(b.shape) != tuple(shape):
            b = self.bufs[name] = torch.empty(shape)
        return b

    def lora_arrays(self, gu_lora, dn_lora, ratio):
        """The six [E, ...] fp32 arrays of ktsft's LoRA layout for this call.
        A is PEFT's memory when it is fp32 and contiguous; B is copied (PEFT
        keeps it rank-major) into persistent buffers.  ratio: down's scaling
        / the wrapper's."""
        E, H, I, r = self.num_experts, self.hidden_size, self.intermediate_size, self.r
        shapes = lora_shapes(E, H, I, r)
        z = self._zeros(r)

        def zero(name):
            return z[: math.prod(shapes[name])].view(shapes[name])

        def a_of(t, name):
            t = t.detach()
            if t.dtype == torch.float32 and t.is_contiguous():
                return t
            return self._buf(name, shapes[name]).copy_(t)

        def b_of(factors, names, rows, scale=1.0):
            # copied every call: a version-counter cache would miss updates,
            # since torch's fused AdamW steps do not bump the counter
            B = factors[0].detach()
            bufs = [self._buf(n, shapes[n]) for n in names]
            for buf, (lo, hi) in zip(bufs, rows):
                buf.copy_(B[:, lo:hi])
                if scale != 1.0:
                    buf.mul_(scale)
            return bufs

        with torch.no_grad():
            if gu_lora is None:
                ag, bg, au, bu = (zero("grad_gate_lora_a"), zero("grad_gate_lora_b"),
                                  zero("grad_up_lora_a"), zero("grad_up_lora_b"))
            else:
                ag = au = a_of(gu_lora[1], "grad_gate_lora_a")
                bg, bu = b_of(gu_lora, ("grad_gate_lora_b", "grad_up_lora_b"),
                              ((0, I), (I, 2 * I)))
            if dn_lora is None:
                ad, bd = zero("grad_down_lora_a"), zero("grad_down_lora_b")
            else:
                ad = a_of(dn_lora[1], "grad_down_lora_a")
                bd, = b_of(dn_lora, ("grad_down_lora_b",), ((0, H),), ratio)
        return ag, bg, au, bu, ad, bd


def _layer_index(module) -> int:
    return int(getattr(module, "layer_idx", None) or getattr(module, "_ktsft_layer_idx", 0) or 0)


# ---------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------
def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks (non-reentrant checkpointing, offloading)
    are installed: then the private ktsft cache would bypass them."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except Exception:  # noqa: BLE001 - private API; without it, keep the cache
        return False


class _Call:
    """One call's layer: what _run_forward/_run_backward need (ktsft.torch),
    and how to stage its LoRA for the kernels (``staged``, a context: the
    shared staging's lock, held while the kernels read it)."""

    def __init__(self, b, wrapper, r, staging, gu_lora, dn_lora, ratio):
        self.wrapper, self.binding, self.staging = wrapper, b, staging
        self.num_experts, self.top_k = b.num_experts, b.top_k
        self.hidden_size, self.intermediate_size, self.r = b.hidden_size, b.intermediate_size, r
        self.lora = (gu_lora, dn_lora, ratio)

    @contextlib.contextmanager
    def staged(self):
        with self.staging.lock:
            with profile.timer("staging"):
                arrays = self.staging.lora_arrays(*self.lora)
                ptrs = tuple(a.data_ptr() for a in arrays)
                reg = self.binding.registered
                if reg.get(id(self.wrapper)) != ptrs:  # new memory: validated whole
                    self.wrapper.init_lora_weights(*arrays)
                    reg[id(self.wrapper)] = ptrs
                else:  # same memory, new values: the kernels read it in place
                    self.wrapper.update_lora_weights()
            yield


class _ExpertsFn(torch.autograd.Function):
    """One forward_sft/backward pair over PEFT's factors.

    Inputs: (binding, call, r, ratio, hidden [T, H], ids [T, k], weights [T, k],
    B_gu [E, 2I, r] | None, A_gu [E, r, H] | None, B_d [E, H, r] | None,
    A_d [E, r, I] | None); gradients flow to hidden, weights and the four
    factors (views of PEFT's lora_B / lora_A weights)."""

    @staticmethod
    def forward(ctx, b, call, r, ratio, hidden, ids, weights, b_gu, a_gu, b_d, a_d):
        from .. import _overlap
        from ..torch import _run_forward, _start_forward

        save = any(ctx.needs_input_grad[4:])
        cache = save and not _saved_tensor_hooks_active()
        ctx.b, ctx.call, ctx.r, ctx.ratio = b, call, r, ratio
        ctx.meta = (hidden.dtype, weights.dtype, hidden.device)
        ctx.has = (b_gu is not None, b_d is not None)
        ctx.lora_dtypes = tuple(t.dtype if t is not None else None for t in (b_gu, a_gu, b_d, a_d))
        ctx.shapes = tuple(tuple(t.shape) if t is not None else None for t in (b_gu, b_d))
        if save:
            ctx.save_for_backward(hidden, ids, weights)
        blk = _overlap.current(hidden)  # hidden is bf16 or fp32 here
        ctx.block = blk
        if blk is not None:  # shared experts overlap: the native call runs on the worker
            hold = contextlib.ExitStack()
            hold.enter_context(call.staged())  # the staged LoRA is read until the join
            try:
                pending = _start_forward(call, hidden, ids, weights, cache, (0.0, 0), hold)
            except BaseException:
                hold.close()
                raise
            ctx.handle = ctx.release = None
            ctx.pending = pending
            pending.then(lambda handle: _ExpertsFn._bind(ctx, handle, cache))
            blk.defer(pending)
            return pending.out
        with call.staged():
            out, handle = _run_forward(call, hidden, ids, weights, cache, (0.0, 0))
        _ExpertsFn._bind(ctx, handle, cache)
        return out.to(device=hidden.device, dtype=hidden.dtype)

    @staticmethod
    def _bind(ctx, handle, cache):
        ctx.handle, ctx.pending = handle, None
        ctx.release = weakref.finalize(ctx, ctx.call.wrapper.release, handle) if cache else None

    @staticmethod
    @once_differentiable  # second-order gradients raise instead of being silently zero
    def backward(ctx, grad_out):
        from .. import _overlap
        from ..torch import _run_backward, _run_forward

        h_dtype, w_dtype, dev = ctx.meta
        call, b = ctx.call, ctx.b
        _overlap.joined(ctx)
        handle = ctx.handle
        E, H, I, r = b.num_experts, b.hidden_size, b.intermediate_size, ctx.r
        shapes = lora_shapes(E, H, I, r)
        need, dt = ctx.needs_input_grad, ctx.lora_dtypes
        g_bgu = g_agu = g_bd = g_ad = None
        with call.staged():  # the staging is shared: stage this layer's LoRA again
            # A's gradients are handed to autograd as they are: fresh memory.
            # The others are transposed or summed into fresh tensors below, so
            # the kernels write them into the shared staging's scratch.
            outs = {n: torch.empty(shapes[n]) if n in ("grad_gate_lora_a", "grad_down_lora_a")
                    else call.staging._buf("scratch_" + n, shapes[n]) for n in LORA_GRAD_NAMES}
            if ctx.release is None or not ctx.release.alive:  # recompute: no cache was kept
                hidden, ids, weights = ctx.saved_tensors
                _, handle = _run_forward(call, hidden, ids, weights, True, (0.0, 0))
            dx, grads = _run_backward(call, grad_out, handle,
                                      {n: t.numpy() for n, t in outs.items()}, ready=ctx.block)
            ctx.block = None
            if ctx.has[0]:
                if need[7]:
                    g_bgu = _rank_major(ctx.shapes[0], dt[0], (outs["grad_gate_lora_b"], 0, I),
                                        (outs["grad_up_lora_b"], I, 2 * I))
                if need[8]:
                    g_agu = outs["grad_gate_lora_a"].add_(outs["grad_up_lora_a"]).to(dt[1])
            if ctx.has[1]:
                if need[9]:
                    g_bd = _rank_major(ctx.shapes[1], dt[2], (outs["grad_down_lora_b"], 0, H),
                                       scale=ctx.ratio)
                if need[10]:
                    g_ad = outs["grad_down_lora_a"].to(dt[3])
        if ctx.release is not None:
            ctx.release.detach()
            ctx.release = None
        dx = dx.to(device=dev, dtype=h_dtype) if need[4] else None
        dw = (torch.as_tensor(grads["grad_routing_weights"]).to(device=dev, dtype=w_dtype)
              if need[6] else None)
        return (None, None, None, None, dx, None, dw, g_bgu, g_agu, g_bd, g_ad)


def _rank_major(shape, dtype, *parts, scale=1.0):
    """The gradient of a B factor [E, out, r] as a view of a fresh
    [out, r, E] tensor: PEFT's lora_B weight is [out, r * E] (column q * E +
    e), so autograd's permute-backward hands AccumulateGrad a contiguous
    tensor it can keep, and the transposition is paid once, here."""
    E, out, r = shape
    g = torch.empty((out, r, E), dtype=dtype).permute(2, 0, 1)
    for src, lo, hi in parts:
        g[:, lo:hi].copy_(src)
    if scale != 1.0:
        g.mul_(scale)
    return g


def _amp_wrapped(device_type):
    """_ExpertsFn.apply under torch.amp.custom_fwd/custom_bwd for this
    device type (the decorators take the device type when applied)."""
    fn = _AMP.get(device_type)
    if fn is None:
        class _Amp(_ExpertsFn):
            forward = staticmethod(torch.amp.custom_fwd(device_type=device_type)(
                _ExpertsFn.forward))
            backward = staticmethod(torch.amp.custom_bwd(device_type=device_type)(
                _ExpertsFn.backward))
        _Amp.__name__ = f"KtsftExperts_{device_type}"
        fn = _AMP[device_type] = _Amp.apply
    return fn


_AMP: dict = {}


# ---------------------------------------------------------------------------
# the registered function
# ---------------------------------------------------------------------------
def ktsft_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' experts call on ktsft: [T, H], [T, k], [T, k] -> [T, H]."""
    reason = unsupported_reason(self)
    if reason is not None:
        raise NotImplementedError(f"experts_implementation='ktsft' cannot run {_where(self)}: "
                                  f"{reason}.  Use another experts implementation for this model")
    gu, gu_lora = _param_and_lora(self, "gate_up_proj")
    dn, dn_lora = _param_and_lora(self, "down_proj")
    if torch.is_grad_enabled() and (gu.requires_grad or dn.requires_grad):
        raise RuntimeError(
            f"{_where(self)}: the expert weights require grad, but ktsft trains LoRA only (the "
            "base experts stay frozen).  Freeze them (PEFT's get_peft_model does), or run under "
            "torch.no_grad() for inference")
    b = _STATE.get(self)
    if b is None:
        b = _STATE[self] = _Binding(self)
    b.bind(self, gu, dn)
    where = _where(self)
    if gu_lora is not None and tuple(gu_lora[1].shape[:1]) != (b.num_experts,):
        raise ValueError(f"{where}: PEFT's gate_up_proj LoRA has {gu_lora[1].shape[0]} experts, "
                         f"the weights {b.num_experts}")
    ranks = {t[1].shape[1] for t in (gu_lora, dn_lora) if t is not None}
    if len(ranks) > 1:
        raise NotImplementedError(f"{where}: gate_up_proj and down_proj LoRA have ranks "
                                  f"{sorted(ranks)}; ktsft needs one rank per layer")
    if ranks:
        r = ranks.pop()
        scaling = (gu_lora or dn_lora)[2]
        ratio = dn_lora[2] / scaling if dn_lora is not None else 1.0
    else:  # no LoRA (none attached, disabled or merged): a rank-1 zero LoRA
        r, scaling, ratio = 1, 1.0, 1.0
    wrapper = b.wrapper(int(r), float(scaling))
    st = b.staging(int(r))
    ids, w = mask_sentinel(top_k_index, top_k_weights, b.num_experts)
    hidden = hidden_states if hidden_states.dtype in (torch.float32, torch.bfloat16) \
        else hidden_states.float()
    w = w if w.dtype == torch.float32 else w.float()
    ids = ids.to(torch.int32)
    call = _Call(b, wrapper, int(r), st, gu_lora, dn_lora, float(ratio))
    fac = [None, None, None, None]
    if gu_lora is not None:
        fac[0:2] = gu_lora[0], gu_lora[1]
    if dn_lora is not None:
        fac[2:4] = dn_lora[0], dn_lora[1]
    out = _amp_wrapped(hidden.device.type)(b, call, int(r), float(ratio), hidden, ids, w, *fac)
    return out.to(hidden_states.dtype)


def configure(model, *, threads=None, dtype=None, max_cache_depth=None, max_tokens=None,
              isa=None, threadpool_count=None) -> None:
    """Options of the 'ktsft' experts of `model` (or of one experts module).

    threads: OpenMP threads of each layer (default: OMP_NUM_THREADS, else
    the usable cores; torch's and numpy's thread counts are never touched).
    dtype: "bf16" or "fp32": convert the expert weights once, in place of
    the originals (still one copy; save_pretrained then writes that dtype).
    max_cache_depth: forwards awaiting their backward per layer (default 4).
    max_tokens: tokens per call (default 16384).  isa: force a kernel build.
    threadpool_count: NUMA pools of each layer's threads (default 1; e.g.
    2 on a 2-socket server: each pool pinned to a socket's cores, its
    experts' weight pages moved to that socket's memory).
    Takes effect at the next forward (existing native state is rebuilt).
    Blocks with shared experts get the overlapped forward
    (``ktsft.integrations.shared_experts.overlap_shared_experts``)."""
    mods = [m for m in model.modules() if isinstance(getattr(m, "gate_up_proj", None),
                                                     torch.Tensor)]
    if not mods:
        raise ValueError(f"{type(model).__name__}: no experts module with gate_up_proj found")
    want = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}
    if dtype not in want:
        raise ValueError(f"dtype must be 'bf16', 'fp32' or None, got {dtype!r}")
    opts = {k: v for k, v in dict(threads=threads, max_cache_depth=max_cache_depth,
                                  max_tokens=max_tokens, isa=isa,
                                  threadpool_count=threadpool_count).items() if v is not None}
    from .shared_experts import overlap_shared_experts

    if model is not mods[0]:
        overlap_shared_experts(model)
    for m in mods:
        _OPTIONS[m] = {**_OPTIONS.get(m, {}), **opts}
        _STATE.pop(m, None)
        if want[dtype] is not None:
            from torch.nn.utils import parametrize

            for n in ("gate_up_proj", "down_proj"):
                holder = (m.parametrizations[n] if parametrize.is_parametrized(m, n) else m)
                attr = "original" if holder is not m else n
                p = getattr(holder, attr)
                if p.dtype != want[dtype]:
                    with torch.no_grad():
                        p.data = p.data.to(want[dtype])


def register() -> None:
    """Register "ktsft" in transformers' ExpertsInterface (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(NAME, ktsft_experts_forward)
    patch_peft()
