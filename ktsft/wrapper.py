"""The wrapper API: configuration, state and the cache stack.  Nothing
numeric happens here; see ktsft/_kernels for that."""
from __future__ import annotations

import itertools
import os
import threading
import weakref
from typing import NamedTuple, Optional

import numpy as np

from . import validation as V
from ._arrays import BF16, as_numpy, is_torch_tensor, to_like, wrap_like
from ._dispatch import resolve_isa
from ._numa import Pools
from ._threads import MAX_THREADS, default_threads, effective_threads  # noqa: F401
from .adapters import AdapterIO
from .compat import BaseSFTMoEWrapper, check_compat_args  # noqa: F401 - re-exported
from ._kernels.moe_sft import MoEKernel, cast_checked
from .buffers import CacheEntry, Workspace
from .schema import LORA_GRAD_NAMES, lora_shapes
from .quantize import quantize_int4, quantize_int8

from .schema import LORA_NAMES as LORA_ARG_NAMES


class StoredWeights(NamedTuple):
    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray
    slot: np.ndarray
    scales: Optional[tuple]


_HANDLES = itertools.count(1)  # forward handles, unique across wrappers
INT32_MAX = (1 << 31) - 1  # the native code indexes experts and (token, slot) pairs in int32

_WRAPPERS: "weakref.WeakSet" = weakref.WeakSet()  # for the fork handler below


def _after_fork_in_child() -> None:
    # A thread of the parent may have held a lock at the fork: in the child
    # that thread does not exist, so the lock would never be released and
    # the next call would hang.  Every lock the calls take is made anew.
    for w in list(_WRAPPERS):
        w.__dict__["_lock"] = threading.Lock()
    # (the workspaces' locks: ktsft/_kernels/cache.pxi's own handler)
    from .buffers import KExpertsSFTBuffer

    KExpertsSFTBuffer._staging_lock = threading.Lock()
    for b in list(KExpertsSFTBuffer._staging.values()) + list(
            KExpertsSFTBuffer.capture_buffers.values()):
        b.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _check_stored(a, name, dtype) -> None:
    """Values finite once converted to the storage dtype (or, quantized,
    their scales): a finite float64 1e300, or a float32 beyond bf16's range,
    would otherwise be stored as inf."""
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: holds a value that is not finite once converted to this "
                         f"layer's dtype={dtype!r} storage (beyond its range: float32 up to "
                         "3.4028e38, bfloat16 up to 3.3895e38)")


INT4_GROUPS = (128, 64, 32)  # the group sizes the int4 kernels are built for, largest first


def _int4_group(group, dtype: str, H: int, I: int) -> int:
    """quant_group as given (checked), or None: for int4 the largest of
    INT4_GROUPS dividing both input sizes (hidden_size for gate/up,
    moe_intermediate_size for down), e.g. 32 for I=160, 64 for gpt-oss'
    2880; other dtypes keep 128 (recorded, unused)."""
    if group is None:
        if dtype != "int4":
            return 128
        fits = [g for g in INT4_GROUPS if H % g == 0 and I % g == 0]
        if not fits:
            raise ValueError(f"dtype='int4': no quant_group in {INT4_GROUPS} divides both "
                             f"hidden_size={H} and moe_intermediate_size={I} (each row's inputs "
                             "are quantized in whole groups); use dtype='int8' for this layer")
        return fits[0]
    g = V.check_int(group, "quant_group")
    if dtype == "int4" and (g not in INT4_GROUPS or H % g or I % g):
        raise ValueError(f"quant_group={group}: int4 needs one of {INT4_GROUPS} dividing "
                         f"hidden_size={H} and moe_intermediate_size={I}"
                         + (f" (None picks one: {_int4_group(None, dtype, H, I)})"
                            if any(H % c == 0 and I % c == 0 for c in INT4_GROUPS) else ""))
    return g


def _hashable(x) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def _check_no_alias(out_grads: dict, lora_src) -> None:
    """grads_out arrays are written by the kernels while the LoRA is read:
    none may overlap another, or the registered LoRA."""
    names = list(out_grads)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if np.shares_memory(out_grads[a], out_grads[b]):
                raise ValueError(f"grads_out[{a!r}] and grads_out[{b!r}] overlap in memory: each "
                                 "gradient needs its own array")
    for n in names:
        for m, src in zip(LORA_ARG_NAMES, lora_src or ()):
            if np.shares_memory(out_grads[n], as_numpy(src, m)):
                raise ValueError(f"grads_out[{n!r}] overlaps the registered LoRA matrix {m}: "
                                 "the kernels read it while writing the gradient")


def _out_array(out, name, shape):
    """The caller's output buffer `out` (CPU, C-contiguous, float32 or
    bfloat16, of `shape`) as numpy, or None when none was given."""
    if out is None:
        return None
    return V.array(out, name, shape, contiguous=True, writable=True)


def _result_target(out_a, like, scratch):
    """Where the kernels write a [T, H] float32 result: the caller's fp32
    buffer; else a fresh array, returned as it is, for a float32 caller;
    else `scratch` (the workspace's y32), cast to the caller's form after."""
    if out_a is not None:
        return out_a if out_a.dtype == np.float32 else scratch
    return np.empty(scratch.shape, np.float32) if _is_f32(like) else scratch


def _deliver(y, out_a, out, like, threads, isa):
    """The kernels' float32 result `y` in the caller's form: written into
    its buffer `out` (validated as `out_a`), or a new array like `like`."""
    if out_a is None:
        return _cast_like(y, like, threads, isa)
    if out_a is not y:
        cast_checked(y, out_a, threads, isa, False)
    return out


def _is_f32(x) -> bool:
    """Whether the caller's array is float32 (its result is then returned
    as the kernels' own fp32 array, no conversion)."""
    if isinstance(x, np.ndarray):
        return x.dtype == np.float32
    return str(getattr(x, "dtype", "")) == "torch.float32"


def _cast_like(y, like, threads, isa):
    """y (float32 numpy) in the array type and dtype of `like`: a bf16
    result is rounded by the native cast (multi-threaded), others as
    _arrays.to_like."""
    if is_torch_tensor(like) and like.device.type == "cpu":
        from ._arrays import torch_module

        torch = torch_module()
        if like.dtype == torch.bfloat16:
            t = torch.empty(y.shape, dtype=torch.bfloat16)
            cast_checked(y, t.view(torch.int16).numpy(), threads, isa, False)
            return t
    elif isinstance(like, np.ndarray) and like.dtype == BF16:
        a = np.empty(y.shape, BF16)
        cast_checked(y, a.view(np.uint16), threads, isa, False)
        return a
    return to_like(y, like)


def _nonfinite(name, bad, shape, a=None):
    """The error for cast_checked's first bad element of `a` (flat index)."""
    idx = tuple(int(i) for i in np.unravel_index(bad, shape))
    v = None if a is None else float(np.asarray(a).reshape(-1)[bad])
    if v is not None and np.isfinite(v):  # finite, but inf once rounded to bf16
        return ValueError(f"{name}: the value {v:.6g} at index {idx} overflows bfloat16, the "
                          "dtype this layer (dtype='bf16') computes in (|v| must stay below "
                          "3.3961e38)")
    return ValueError(f"{name}: contains a non-finite value at index {idx}")


def _in_place(a: np.ndarray, store: np.dtype) -> bool:
    """Whether the kernels can read `a` [E, rows, cols] where it is: the
    storage dtype, each expert's plane C-contiguous, experts at least a
    plane apart (any further stride is fine: e.g. the gate and up halves of
    a fused [E, 2I, H] gate_up_proj, read without a copy)."""
    if a.dtype != store or a.ndim != 3:
        return False
    E, R, C = a.shape
    isz = a.itemsize
    plane = (C == 1 or a.strides[2] == isz) and (R == 1 or a.strides[1] == C * isz)
    return plane and (E == 1 or (a.strides[0] >= R * C * isz and a.strides[0] % isz == 0))


# Attributes the native layer is built from: fixed once set (a new size in
# Python would disagree with the buffers and shapes the kernels hold)
_FIXED = frozenset({"num_experts", "num_experts_per_tok", "hidden_size",
                    "moe_intermediate_size", "num_gpu_experts", "threadpool_count", "lora_rank",
                    "lora_alpha", "lora_scaling", "dtype", "isa", "quant_group"})


def _check_threads(self, n):
    if n is None:
        return min(default_threads(), MAX_THREADS)
    return V.check_int(n, "cpuinfer_threads", maximum=MAX_THREADS)


def _check_prefill(self, n):
    n = V.check_int(n, "chunked_prefill_size")
    k = self.__dict__.get("num_experts_per_tok", 1)
    if n * k > INT32_MAX:
        raise ValueError(f"chunked_prefill_size={n} x num_experts_per_tok={k} (token, slot) pairs "
                         "exceed 2^31 - 1, the native index range; split batches into smaller "
                         "chunks")
    return n


def _check_path(self, p):
    if p is not None and not isinstance(p, (str, os.PathLike)):
        raise TypeError(f"weight_path must be a path or None, got {type(p).__name__}")
    return p


# Tunables: validated whenever they are set, as in the constructor
_TUNABLE = {
    "layer_idx": lambda self, i: V.check_int(i, "layer_idx", minimum=0),  # a label (adapter keys)
    "cpuinfer_threads": _check_threads,
    "chunked_prefill_size": _check_prefill,
    "max_cache_depth": lambda self, n: V.check_int(n, "max_cache_depth"),
    "lora_dropout": lambda self, p: V.check_dropout(p, "lora_dropout"),
    "weight_path": _check_path,
}


class SFTMoEWrapper(AdapterIO, BaseSFTMoEWrapper):
    """CPU MoE-expert LoRA fine-tuning on the ktsft kernels.

    dtype="bf16": base weights stored in bf16, activations rounded to bf16
    where the base GEMMs read them, fp32 accumulation and fp32 LoRA.
    dtype="fp32": everything fp32.  dtype="int8" / "int4": base weights
    quantized at load (int8: a scale per output row; int4: a scale per
    ``quant_group`` inputs, 32/64/128), dequantized in registers, fp32
    activations.  ``isa`` forces a kernel build (default: the best this CPU
    runs, or $KTSFT_ISA).

    ``lora_dropout`` in [0, 1): PEFT's LoRA dropout, applied per element to
    the input of each LoRA (gate and up read x, down reads h) in
    forward_sft, with the same masks in backward; the base path never sees
    it.  Masks come from a counter-based hash of a 64-bit seed per
    forward_sft call (``dropout_seed=``; by default drawn from this
    wrapper's numpy Generator, seeded by the constructor's
    ``dropout_seed``, None = fresh OS entropy).

    The sizes, the LoRA rank and alpha (``lora_scaling = lora_alpha /
    lora_rank``), the dtype and the ISA are fixed at construction (assigning
    one raises AttributeError: the native layer was built with them);
    ``cpuinfer_threads``, ``lora_dropout``, ``max_cache_depth``,
    ``chunked_prefill_size``, ``weight_path`` and ``layer_idx`` (a label:
    the layer's adapter keys) may be changed and are validated as the
    constructor validates them.  kt-kernel's interface
    (``BaseSFTMoEWrapper``, ktsft/compat.py) is what this implements.
    """

    def __init__(self, layer_idx, num_experts, num_experts_per_tok, hidden_size,
                 moe_intermediate_size, num_gpu_experts=0, cpuinfer_threads=None,
                 threadpool_count=1, weight_path=None, chunked_prefill_size=8192, lora_rank=16,
                 lora_alpha=32.0, max_cache_depth=1, dtype="bf16", *, isa=None, quant_group=None,
                 lora_dropout=0.0, dropout_seed=None):
        self._configure(layer_idx, num_experts, num_experts_per_tok, hidden_size,
                        moe_intermediate_size, num_gpu_experts, cpuinfer_threads,
                        threadpool_count, weight_path, chunked_prefill_size, lora_rank,
                        lora_alpha, max_cache_depth)
        if dtype not in ("fp32", "bf16", "int8", "int4"):
            raise ValueError(f"dtype must be 'fp32', 'bf16', 'int8' or 'int4', got {dtype!r}")
        self.quant_group = _int4_group(quant_group, dtype, hidden_size, moe_intermediate_size)
        self.dtype = dtype
        self.lora_dropout = lora_dropout
        if dropout_seed is not None:
            V.check_seed(dropout_seed, "dropout_seed")
        self._dropout_rng = np.random.default_rng(dropout_seed)
        self.last_dropout_seed = None
        self.isa = resolve_isa(isa)
        E, H, I, r = self.num_experts, hidden_size, moe_intermediate_size, lora_rank
        wbytes = int(3 * E * H * I * {"bf16": 2, "fp32": 4, "int8": 1, "int4": 0.5}[dtype])
        V.check_memory(wbytes, f"base weights of {E} experts (H={H}, I={I}, {dtype})")
        V.check_memory(self.bytes_per_token() * self.chunked_prefill_size * max_cache_depth,
                       f"max_cache_depth={max_cache_depth} cache entries of "
                       f"chunked_prefill_size={self.chunked_prefill_size} tokens")
        self._kernel = MoEKernel(E, self.num_experts_per_tok, H, I, r, self.lora_scaling,
                                 dtype == "bf16", self.isa,
                                 dtype if dtype in ("int8", "int4") else "auto",
                                 self.quant_group if dtype == "int4" else 0)
        # NUMA pools (threadpool_count > 1): CPUs, slots and page placement
        self._pools = Pools(self.threadpool_count, E)
        if self.threadpool_count > 1:
            self._kernel.set_pools(*self._pools.native_args())
        self._ws = Workspace.shared(H, I, self.num_experts_per_tok, r, dtype == "bf16")
        # handle -> cached entry, oldest first: one dict, so that every
        # change is one operation (a signal between two could not leave a
        # handle without its entry)
        self._cached: dict[int, CacheEntry] = {}
        self._spare: list[CacheEntry] = []  # entries backward released, reused by forward
        self._lock = threading.Lock()
        _WRAPPERS.add(self)
        self._base = None
        self._lora_src = None
        self._lora = None
        self._grads = None

    def __setattr__(self, name, value):
        if name in _FIXED and name in self.__dict__:
            raise AttributeError(
                f"{type(self).__name__}.{name} is fixed when the layer is built (the native layer "
                f"holds {self.__dict__[name]!r}); build a new wrapper for another value")
        check = _TUNABLE.get(name)
        object.__setattr__(self, name, value if check is None else check(self, value))

    def _configure(self, layer_idx, num_experts, num_experts_per_tok, hidden_size,
                 moe_intermediate_size, num_gpu_experts=0, cpuinfer_threads=None,
                 threadpool_count=1, weight_path=None, chunked_prefill_size=8192,
                 lora_rank=16, lora_alpha=32.0, max_cache_depth=1):
        self.layer_idx = layer_idx
        self.num_experts = V.check_int(num_experts, "num_experts", maximum=INT32_MAX - 1)
        self.num_experts_per_tok = V.check_int(num_experts_per_tok, "num_experts_per_tok",
                                               maximum=self.num_experts)
        self.hidden_size = V.check_int(hidden_size, "hidden_size")
        self.moe_intermediate_size = V.check_int(moe_intermediate_size, "moe_intermediate_size")
        self.num_gpu_experts, self.threadpool_count = check_compat_args(num_gpu_experts,
                                                                        threadpool_count)
        self.cpuinfer_threads = cpuinfer_threads  # validated by the setter (_TUNABLE)
        self.weight_path = weight_path
        self.chunked_prefill_size = chunked_prefill_size
        self.lora_rank = V.check_int(lora_rank, "lora_rank")
        self.lora_alpha = V.check_positive_float(lora_alpha, "lora_alpha")
        self.lora_scaling = self.lora_alpha / self.lora_rank
        if not (1e-30 <= self.lora_scaling <= 1e30):
            # the kernels scale in fp32: beyond this the LoRA term is lost or overflows
            raise ValueError(f"lora_alpha={lora_alpha!r}: lora_alpha / lora_rank = "
                             f"{self.lora_scaling:g} is outside [1e-30, 1e30]")
        self.max_cache_depth = max_cache_depth

    def __copy__(self):
        raise TypeError("SFTMoEWrapper cannot be copied: a copy would share its native layer, "
                        "cache and locks; build another wrapper (ktsft.torch.LoRAExperts "
                        "supports copy.deepcopy)")

    def __deepcopy__(self, memo):
        self.__copy__()

    def __reduce_ex__(self, protocol):
        raise TypeError("SFTMoEWrapper cannot be pickled (it holds native state); "
                        "ktsft.torch.LoRAExperts can")

    # ---- sizes -------------------------------------------------------------
    def bytes_per_token(self) -> int:
        """Activation-cache bytes per token of one forward_sft(save_for_backward=True)."""
        return CacheEntry.bytes_per_token(self.hidden_size, self.moe_intermediate_size,
                                          self.num_experts_per_tok, self.lora_rank)

    @property
    def cache_depth(self) -> int:
        return len(self._cached)

    def stored_weights(self) -> "StoredWeights":
        """The base weights as the kernels read them: read-only views of the
        registered arrays (gate/up [E, I, H], down [E, H, I], physical
        slots; bf16 as ml_dtypes.bfloat16, int8/int4 with their scales),
        the slot of each logical expert, and the scales (None unless
        quantized).  None before load_weights."""
        if self._base is None:
            return None
        arrays, slot, scales = self._base

        def ro(a):
            v = a.view()
            v.flags.writeable = False
            return v
        return StoredWeights(*(ro(a) for a in arrays), ro(slot),
                             None if scales is None else tuple(ro(s) for s in scales))

    def phase_times(self) -> dict:
        """Seconds in each native phase of this layer's last forward_sft and
        backward: {"forward": {phase: s}, "backward": {phase: s}}."""
        with self._lock:
            return self._kernel.last_phase_times()

    def cache_entries(self) -> dict:
        """The cache entries this layer holds, as the kernels' typed
        CacheEntry objects (docs/cache.md): "cached" awaiting their backward
        (oldest first) and "spare" kept for reuse.  For inspection: the
        layer owns them."""
        with self._lock:
            return {"cached": tuple(self._cached.values()), "spare": tuple(self._spare)}

    @property
    def workspace(self):
        """The Workspace this layer shares with the layers of its shape."""
        return self._ws

    def numa_info(self) -> dict:
        """The layer's pools (``threadpool_count``): each pool's CPUs, the
        physical slots it owns, the node its weights belong on and how many
        of their pages are there now (None: the kernel does not say), and
        the tasks of the last forward / backward that ran outside their
        pool."""
        from ._numa import page_nodes

        P = self._pools
        pools = []
        for q in range(P.count):
            lo, hi = P.slots(q)
            info = dict(cpus=list(P.cpus[q]), slots=(lo, hi), node=P.node[q], pages=None,
                        pages_on_node=None)
            if self._base is not None and P.node[q] >= 0:
                got = [page_nodes(a[lo:hi]) for a in self._base[0]]
                if all(g is not None for g in got):
                    info["pages"] = int(sum(g.size for g in got))
                    info["pages_on_node"] = int(sum(np.count_nonzero(g == P.node[q])
                                                    for g in got))
            pools.append(info)
        return dict(threadpool_count=P.count, pools=pools,
                    stolen_tasks=self._kernel.last_stolen_tasks())

    def memory_info(self) -> dict:
        """Host memory this layer holds: cache entries awaiting backward and
        kept for reuse (count and bytes) and the workspace it shares with the
        layers of its shape (``workspace_id`` equal across those layers)."""
        with self._lock:
            return dict(cache_entries=len(self._cached), spare_entries=len(self._spare),
                        cache_bytes=sum(e.nbytes for e in [*self._cached.values(), *self._spare]),
                        workspace_bytes=sum(a.nbytes for a in self._ws.arrays.values()),
                        workspace_id=id(self._ws))

    # ---- weights -----------------------------------------------------------
    def load_weights(self, physical_to_logical_map_cpu=None, *, gate_proj=None, up_proj=None,
                     down_proj=None, key_prefix=None) -> None:
        """Register the frozen base weights.

        physical_to_logical_map_cpu[p] is the logical expert held by slot p;
        expert_ids are logical.  Arrays given here are in physical slot
        order; fp32 arrays in fp32 mode and bf16 arrays in bf16 mode are used
        in place (also strided views whose per-expert planes are contiguous,
        such as ``gate_up_proj[:, :I]`` of a fused [E, 2I, H] tensor), others
        are converted once.  Without arrays the weights are
        read from weight_path (ktsft/weights.py lists the formats; files are
        in logical order; key_prefix overrides the checkpoint's "model."),
        one expert at a time into this wrapper's own storage.
        """
        given = [a is not None for a in (gate_proj, up_proj, down_proj)]
        if any(given) and not all(given):
            raise ValueError("load_weights: pass all of gate_proj, up_proj and down_proj, or none "
                             "(then they are read from weight_path)")
        E, H, I = self.num_experts, self.hidden_size, self.moe_intermediate_size
        if physical_to_logical_map_cpu is None:
            p2l = np.arange(E)
        else:
            p2l = V.permutation(physical_to_logical_map_cpu, "physical_to_logical_map_cpu", E)
        slot = np.empty(E, np.int32)
        slot[p2l] = np.arange(E, dtype=np.int32)
        want = {"gate_proj": (E, I, H), "up_proj": (E, I, H), "down_proj": (E, H, I)}
        scales = None
        if all(given):
            accepted = (np.dtype(np.float32), BF16, np.dtype(np.float16), np.dtype(np.float64))
            src = []
            for name, a in (("gate_proj", gate_proj), ("up_proj", up_proj), ("down_proj", down_proj)):
                a = V.array(a, name, want[name], accepted)
                V.check_finite(a, name)
                src.append(a)
            if self.dtype in ("int8", "int4"):
                arrays, scales = self._fill(want, lambda p: tuple(a[p] for a in src), E)
            else:
                arrays = []
                for name, a in zip(("gate_proj", "up_proj", "down_proj"), src):
                    if not _in_place(a, self._store):
                        with np.errstate(over="ignore"):
                            a = np.ascontiguousarray(a, dtype=self._store)
                        _check_stored(a, name, self.dtype)
                    arrays.append(a)
                # arrays used in place or converted here: their pages to their pools' nodes
                self._pools.place(arrays)
        else:
            arrays, scales = self._read_weights(p2l, want, key_prefix)
        views = [a.view(np.uint16) if self.dtype == "bf16" else a for a in arrays]
        strides = tuple(a.strides[0] // a.itemsize if a.shape[0] > 1 else a[0].size
                        for a in arrays)
        with self._lock:  # registered first: a refusal leaves the old weights in place
            self._kernel.set_base_weights(*views, slot, scales=scales,
                                          expert_strides=None if scales is not None else strides)
            self._base = (arrays, slot, scales)

    @property
    def _store(self):
        return {"bf16": BF16, "fp32": np.dtype(np.float32), "int8": np.dtype(np.int8),
                "int4": np.dtype(np.uint8)}[self.dtype]

    def _fill(self, want, expert, n_slots, what="arrays"):
        """Fresh storage filled slot by slot from expert(p) -> (gate, up, down)
        float arrays; int8 mode quantizes each row symmetrically (scale =
        max|w| / 127).  Returns (arrays, scales or None)."""
        from .weights import NAMES

        G = self.quant_group
        shape = {n: (*want[n][:2], want[n][2] // 2) if self.dtype == "int4" else want[n]
                 for n in NAMES}
        V.check_memory(sum(int(np.prod(shape[n])) for n in NAMES) * self._store.itemsize,
                       f"base weights from {what}")
        arrays = [np.empty(shape[n], self._store) for n in NAMES]
        scales = None
        if self.dtype == "int8":
            scales = [np.empty(want[n][:2], np.float32) for n in NAMES]
        elif self.dtype == "int4":
            scales = [np.empty((*want[n][:2], want[n][2] // G), np.float32) for n in NAMES]
        for p in range(n_slots):
            # first touch from the slot's pool: its pages on that pool's node
            with self._pools.touching(p):
                for i, w in enumerate(expert(p)):
                    where = f"{what}: {NAMES[i]} of expert slot {p}"
                    with np.errstate(over="ignore"):
                        if self.dtype == "int8":
                            arrays[i][p], scales[i][p] = quantize_int8(w)
                        elif self.dtype == "int4":
                            arrays[i][p], scales[i][p] = quantize_int4(w, G)
                        else:
                            arrays[i][p] = w
                    _check_stored(arrays[i][p] if scales is None else scales[i][p], where,
                                  self.dtype)
        return arrays, scales

    def save_weights(self, path) -> None:
        """Write the stored base weights (bf16, fp32, or int8/int4 with their
        scales) to one safetensors file, experts in logical order.  A wrapper
        of the same dtype (and quant_group) loads it back as it is:
        ``SFTMoEWrapper(..., weight_path=path).load_weights()``."""
        from .weights import save_layer

        if self._base is None:
            raise RuntimeError("save_weights() before load_weights()")
        arrays, slot, scales = self._base
        save_layer(path, arrays, scales, self.dtype, self.quant_group, slot)

    def _read_weights(self, p2l, want, key_prefix):
        """Storage filled from weight_path, slot p <- file expert p2l[p]."""
        from .weights import check_expert, check_source_shapes, expert_source, ktsft_layer

        own = ktsft_layer(self.weight_path)
        if own is not None and own.dtype == self.dtype and (
                own.dtype != "int4" or own.group == self.quant_group):
            return self._read_stored(own, p2l, want)
        if own is not None and own.dtype in ("int8", "int4"):
            raise ValueError(f"weight_path {self.weight_path!r} holds {own.dtype} weights saved by "
                             f"ktsft (quant_group={own.group}); load them with dtype={own.dtype!r}"
                             + (f", quant_group={own.group}" if own.dtype == "int4" else "")
                             + f", not dtype={self.dtype!r}, quant_group={self.quant_group}")

        src = expert_source(self.weight_path, self.layer_idx, key_prefix)
        check_source_shapes(src, want, self.weight_path)

        def expert(p):
            e = int(p2l[p])
            return check_expert(src.expert(e), want, self.weight_path, e)

        return self._fill(want, expert, len(p2l), f"{self.weight_path!r}")

    def _read_stored(self, src, p2l, want):
        """A save_weights file of this dtype: copied slot by slot, as stored."""
        from .weights import NAMES

        E = len(p2l)
        where = f"weight_path {self.weight_path!r}"
        got = src.stored_layout()
        # every tensor's exact shape and dtype, as this layer stores it, before
        # anything is read: a crafted file cannot size what the kernels read
        stored_dtype = {"bf16": "BF16", "fp32": "F32", "int8": "I8", "int4": "U8"}[self.dtype]
        if self.dtype == "bf16" and any(got.get(n, (None, ""))[1] == "U16" for n in NAMES):
            stored_dtype = "U16"  # bf16 bits as save_layer writes them
        need = {}
        for n in NAMES:
            E_, rows, cols = want[n]
            need[n] = ((E, rows, cols // 2 if self.dtype == "int4" else cols), stored_dtype)
            if self.dtype == "int8":
                need[n + "_scale"] = ((E, rows), "F32")
            elif self.dtype == "int4":
                need[n + "_scale"] = ((E, rows, cols // self.quant_group), "F32")
        for n, (shape, dt) in need.items():
            if n not in got:
                raise ValueError(f"{where}: no tensor {n!r} (a ktsft {self.dtype} layer file "
                                 f"holds {sorted(need)})")
            if got[n] != (shape, dt):
                raise ValueError(f"{where}: {n} is {got[n][1]} of shape {got[n][0]}, this layer "
                                 f"needs {dt} of shape {shape}")
        arrays = [np.empty(need[n][0], self._store) for n in NAMES]
        scales = (None if self.dtype not in ("int8", "int4") else
                  [np.empty(need[n + "_scale"][0], np.float32) for n in NAMES])
        for p, e in enumerate(p2l):
            stored, sc = src.stored_expert(int(e))
            with self._pools.touching(p):  # first touch from the slot's pool
                for i, a in enumerate(stored):
                    if self.dtype in ("bf16", "fp32"):
                        V.check_finite(a, f"{where}: {NAMES[i]} of expert {int(e)}")
                    arrays[i][p] = a
                    if scales is not None:
                        V.check_finite(sc[i], f"{where}: {NAMES[i]}_scale of expert {int(e)}")
                        scales[i][p] = sc[i]
        return arrays, scales

    def init_lora_weights(self, gate_lora_a, gate_lora_b, up_lora_a, up_lora_b, down_lora_a,
                          down_lora_b) -> None:
        """Register the six LoRA matrices, read in place (zero-copy).

        They must be C-contiguous float32 (numpy or CPU torch); in bf16 mode
        bfloat16 is accepted too, and an fp32 working copy is refreshed by
        update_lora_weights().  Shapes: A_gate, A_up [E, r, H]; B_gate, B_up
        [E, I, r]; A_down [E, r, I]; B_down [E, H, r].
        """
        srcs = (gate_lora_a, gate_lora_b, up_lora_a, up_lora_b, down_lora_a, down_lora_b)
        arrays = self._check_lora(srcs, finite=True)
        with self._lock:
            self._lora_src = srcs
            self._commit_lora(arrays)
            if self._grads is None:
                E, H, I, r = self.num_experts, self.hidden_size, self.moe_intermediate_size, self.lora_rank
                self._grads = {n: np.zeros(s, np.float32) for n, s in lora_shapes(E, H, I, r).items()}

    def update_lora_weights(self) -> None:
        """Re-read the registered LoRA objects after an optimizer step.

        fp32 arrays are read in place anyway; this picks up replaced torch
        storage (``param.data = ...``) and refreshes bf16 working copies."""
        if self._lora_src is None:
            raise RuntimeError("update_lora_weights() before init_lora_weights()")
        arrays = self._check_lora(self._lora_src, finite=False)
        with self._lock:
            self._commit_lora(arrays)

    # ---- adapters (ktsft/adapters.py AdapterIO: save_adapter, export_peft_fused,
    # load_adapter; loading writes the registered LoRA arrays in place, so the
    # zero-copy registration and any optimizer holding them stay valid, and
    # registers fresh float32 arrays if none are)
    def adapter_layer(self):
        if self._lora is None:
            raise RuntimeError("no LoRA registered: call init_lora_weights() (or load_adapter) "
                               "first")
        return (self.layer_idx, dict(zip(LORA_ARG_NAMES, self._lora)), self.lora_rank,
                self.lora_alpha, False, self.lora_dropout)

    def _adapter_expect(self):
        return self.layer_idx, dict(num_experts=self.num_experts, hidden_size=self.hidden_size,
                                    intermediate_size=self.moe_intermediate_size,
                                    r=self.lora_rank, scaling=self.lora_scaling)

    def _adapter_store(self, mats) -> None:
        arrays = [mats[n] for n in LORA_ARG_NAMES]
        self._check_lora(arrays, finite=True)
        if self._lora_src is None:
            self.init_lora_weights(*arrays)
        else:
            dsts = [as_numpy(d, "lora") for d in self._lora_src]
            ro = [n for n, d in zip(LORA_ARG_NAMES, dsts) if not d.flags.writeable]
            if ro:  # refused before any is written: the LoRA stays as it was
                raise ValueError(f"load_adapter: the registered LoRA arrays {ro} are read-only; "
                                 "register writable arrays (init_lora_weights) to load into")
            for dst_np, src in zip(dsts, arrays):
                np.copyto(dst_np, src.astype(dst_np.dtype))
            self.update_lora_weights()

    def _check_lora(self, srcs, finite: bool):
        E, H, I, r = self.num_experts, self.hidden_size, self.moe_intermediate_size, self.lora_rank
        shapes = lora_shapes(E, H, I, r)
        dtypes = (np.dtype(np.float32), BF16) if self.dtype == "bf16" else (np.dtype(np.float32),)
        out = []
        for name, src, gname in zip(LORA_ARG_NAMES, srcs, LORA_GRAD_NAMES):
            if is_torch_tensor(src) and not src.is_contiguous():
                raise ValueError(f"{name}: must be a contiguous tensor (it is read in place)")
            a = V.array(src, name, shapes[gname], dtypes, contiguous=True, finite=finite)
            out.append(a)
        return out

    def _commit_lora(self, arrays):
        fp32 = [a if a.dtype == np.float32 else a.astype(np.float32) for a in arrays]
        self._lora = fp32
        self._kernel.set_lora(*fp32)

    # ---- training step -----------------------------------------------------
    def _ready(self, op: str):
        if self._base is None:
            raise RuntimeError(f"{op}: call load_weights() first")
        if self._lora is None:
            raise RuntimeError(f"{op}: call init_lora_weights() first")

    def forward_sft(self, hidden_states, expert_ids, weights, save_for_backward=True, *,
                    return_handle=False, lora_dropout=None, dropout_seed=None, out=None):
        """out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x_t), LoRA applied.

        Returns the same array type and dtype as hidden_states.  With
        save_for_backward, pushes one cache entry for backward();
        return_handle=True returns (out, handle) so that a later
        backward(..., handle=handle) pairs with this forward whatever the
        order of backwards (None when nothing was cached).

        LoRA dropout: ``lora_dropout`` overrides the wrapper's probability
        for this call (0.0 = evaluation, no dropout); ``dropout_seed`` (an
        integer in [0, 2**64)) fixes the masks, else a seed is drawn from
        the wrapper's Generator.  The seed used is kept with the cache entry
        (backward applies the same masks) and in ``last_dropout_seed``
        (None when no dropout ran): passing it again reproduces the call.

        out: a C-contiguous float32 or bfloat16 CPU array/tensor of shape
        (tokens, hidden_size) to write the result into (then returned), e.g.
        a pinned staging buffer; the conversion runs multi-threaded."""
        self._ready("forward_sft")
        H, k = self.hidden_size, self.num_experts_per_tok
        x = as_numpy(hidden_states, "hidden_states")
        if x.ndim != 2 or x.shape[1] != H:
            raise ValueError(f"hidden_states: expected shape (tokens, {H}), got {tuple(x.shape)}")
        T = x.shape[0]
        if T > self.chunked_prefill_size:
            raise ValueError(f"hidden_states: {T} tokens exceed chunked_prefill_size="
                             f"{self.chunked_prefill_size}; split the batch or raise the limit")
        x = V.array(x, "hidden_states", (T, H))  # finite: checked natively below
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        out_a = _out_array(out, "out", (T, H))
        ids = V.expert_ids(expert_ids, "expert_ids", T, k, self.num_experts)
        rw = V.routing_weights(weights, "weights", T, k)
        if not isinstance(save_for_backward, (bool, np.bool_)):
            raise TypeError(f"save_for_backward must be a bool, got {type(save_for_backward).__name__}")
        p = self.lora_dropout if lora_dropout is None else V.check_dropout(lora_dropout,
                                                                           "lora_dropout")
        seed = None if dropout_seed is None else V.check_seed(dropout_seed, "dropout_seed")
        with self._lock:
            if save_for_backward and len(self._cached) >= self.max_cache_depth:
                raise RuntimeError(
                    f"forward_sft: the activation cache is full (max_cache_depth={self.max_cache_depth}); "
                    "run backward() first, raise max_cache_depth, or pass save_for_backward=False")
            threads = effective_threads(self.cpuinfer_threads)
            if p > 0.0 and seed is None:
                seed = int(self._dropout_rng.integers(0, 1 << 64, dtype=np.uint64))
            if p == 0.0:
                seed = None
            entry = self._take_entry(T)
            try:
                # x into the cache (fp32), the finite check in the same parallel pass
                bf16_in = self.dtype == "bf16" and x.itemsize == 4  # rounded to bf16 below
                bad = cast_checked(x, entry["x"], threads, self.isa, True, bf16_in)
                if bad >= 0:
                    raise _nonfinite("hidden_states", bad, (T, H), x)
                entry.dropout = (p, 0 if seed is None else seed)
                with self._ws.lock:  # shared by the layers of this shape
                    ws = self._ws.view(T)
                    y = _result_target(out_a, hidden_states, ws["y32"])
                    # bf16 input in bf16 mode: the base GEMMs read it as it is
                    # (rounding its fp32 widening back would give the same bits)
                    given = (self.dtype == "bf16" and x.itemsize == 2 and x.flags.c_contiguous)
                    x_act = (x.view(np.uint16) if given else
                             ws["x_act"] if self.dtype == "bf16" else entry["x"])
                    self._kernel.forward(entry["x"], x_act, ids, rw, entry, self._ws, y, threads,
                                         *entry.dropout, not given)
                    result = _deliver(y, out_a, out, hidden_states, threads, self.isa)
            except BaseException:
                self._spare.append(entry)  # the cache is as it was
                raise
            self.last_dropout_seed = seed
            handle = None
            if save_for_backward:
                handle = next(_HANDLES)  # unique in the process: another layer's is refused
                self._cached[handle] = entry
            else:
                self._spare.append(entry)
        return (result, handle) if return_handle else result

    def _take_entry(self, T: int) -> CacheEntry:
        """A released entry large enough for T tokens, else a new one.  At
        most max_cache_depth entries exist: reuse avoids re-faulting tens of
        MB of fresh pages every step."""
        fits = [e for e in self._spare if e.capacity >= T]
        if fits:
            entry = min(fits, key=lambda e: e.capacity)
            self._spare.remove(entry)
            return entry.resize(T)
        if len(self._spare) + len(self._cached) >= self.max_cache_depth and self._spare:
            self._spare.pop(0)  # too small for T: let it go
        return CacheEntry(T, self.num_experts, self.hidden_size, self.moe_intermediate_size,
                          self.num_experts_per_tok, self.lora_rank)

    def backward(self, grad_output, *, handle=None, grads_out=None, accumulate=False,
                 grad_input_out=None):
        """Gradients of a cached forward: the most recent one (LIFO), or the
        one forward_sft(..., return_handle=True) named.

        Returns (grad_input, grads): grad_input has grad_output's array type
        and dtype; grads holds the six LoRA gradients (float32) and
        ``grad_routing_weights`` [T, k] float32.  The LoRA gradients are
        written into ``grads_out`` (a dict of C-contiguous float32 arrays of
        the LoRA shapes) when given, else into this wrapper's buffers, which
        its next backward overwrites.  accumulate=True adds them to what
        those arrays hold instead (gradient accumulation in place: each
        gradient is summed first, then added, so the result is bitwise the
        sum of separately computed gradients).  grad_input_out: a buffer for
        grad_input, as forward_sft's ``out``."""
        self._ready("backward")
        with self._lock:
            if not self._cached:
                raise RuntimeError("backward: no cached forward; call forward_sft(..., "
                                   "save_for_backward=True) first")
            if handle is None:
                handle = next(reversed(self._cached))
            elif not _hashable(handle) or handle not in self._cached:
                raise RuntimeError(f"backward: handle={handle!r} names no cached forward (it was "
                                   "already used by a backward, released, or never cached)")
            entry = self._cached[handle]
            if not entry.written:  # a backward whose kernels ran was interrupted (a signal)
                del self._cached[handle]
                self._spare.append(entry)
                raise RuntimeError("backward: this cached forward was already consumed by a "
                                   "backward that was interrupted after its kernels ran (e.g. "
                                   "by KeyboardInterrupt); run the forward again")
            T, H = entry.T, self.hidden_size
            g = V.array(grad_output, "grad_output", (T, H))  # finite: checked natively
            dx_out = _out_array(grad_input_out, "grad_input_out", (T, H))
            out_grads = self._grads
            if grads_out is not None:
                shapes = lora_shapes(self.num_experts, H, self.moe_intermediate_size, self.lora_rank)
                if not isinstance(grads_out, dict) or set(grads_out) != set(LORA_GRAD_NAMES):
                    raise ValueError(f"grads_out: expected a dict with keys {LORA_GRAD_NAMES}")
                out_grads = {n: V.array(grads_out[n], f"grads_out[{n!r}]", shapes[n],
                                        (np.dtype(np.float32),), contiguous=True, writable=True)
                             for n in LORA_GRAD_NAMES}
                _check_no_alias(out_grads, self._lora_src)
            threads = effective_threads(self.cpuinfer_threads)
            grad_w = np.empty((T, self.num_experts_per_tok), np.float32)
            with self._ws.lock:
                ws = self._ws.view(T)
                bf16_in = self.dtype == "bf16" and g.itemsize == 4  # rounded to bf16 natively
                if g.dtype == np.float32 and g.flags.c_contiguous:
                    do32 = g
                    bad = cast_checked(g, None, threads, self.isa, True, bf16_in)
                else:
                    do32 = ws["do32"]
                    bad = cast_checked(np.ascontiguousarray(g), do32, threads, self.isa, True,
                                       bf16_in)
                if bad >= 0:  # before anything changed: the cache entry stays
                    raise _nonfinite("grad_output", bad, (T, H), g)
                dx = _result_target(dx_out, grad_output, ws["y32"])
                # The kernel checks and allocates everything before it
                # writes anything: when it raises (e.g. out of memory), the
                # entry is intact and stays cached, so the step can be retried
                self._kernel.backward(entry, do32,
                                      ws["do_act"] if self.dtype == "bf16" else do32,
                                      self._ws, out_grads, grad_w, dx, threads,
                                      *entry.dropout, bool(accumulate))
                del self._cached[handle]  # consumed: G/U hold dG/dU now
                self._spare.append(entry)
                grad_input = _deliver(dx, dx_out, grad_input_out, grad_output, threads,
                                      self.isa)
        grads = {n: wrap_like(out_grads[n], grad_output) if grads_out is None else grads_out[n]
                 for n in LORA_GRAD_NAMES}
        grads["grad_routing_weights"] = wrap_like(grad_w, grad_output)
        return grad_input, grads

    def release(self, handle) -> bool:
        """Drop the cached forward `handle` without running its backward
        (e.g. its graph was freed).  Returns whether it was still cached."""
        with self._lock:
            entry = self._cached.pop(handle, None) if _hashable(handle) else None
            if entry is None:
                return False
            self._spare.append(entry)
            return True

    def clear_cache(self) -> None:
        """Drop every cached forward (e.g. after an aborted step) and free
        the cache memory kept for reuse."""
        with self._lock:
            self._cached.clear()
            self._spare.clear()
