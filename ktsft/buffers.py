"""Host buffers: the reference-style staging buffer, the activation-cache
entry (what backward needs, nothing more) and the per-wrapper workspace."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import ClassVar, Dict

import numpy as np

from ._arrays import BF16, torch_module

from .schema import LORA_GRAD_NAMES, lora_shapes  # noqa: F401 - re-exported (the schema's home)


def _importable_torch():
    torch = torch_module()
    if torch is None:
        try:
            import torch
        except ImportError:
            return None
    return torch


def _host_array(shape, dtype):
    """numpy array; backed by (pinned, when a GPU is present) torch memory
    when torch is importable, so device copies need no extra staging."""
    torch = _importable_torch()
    if torch is None:
        return np.empty(shape, dtype=dtype), None
    tdt = {np.dtype(np.float32): torch.float32, np.dtype(np.int64): torch.int64,
           BF16: torch.bfloat16}[np.dtype(dtype)]
    pin = bool(torch.cuda.is_available())
    t = torch.empty(shape, dtype=tdt, pin_memory=pin)
    if tdt == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16), t
    return t.numpy(), t


class KExpertsSFTBuffer:
    """Staging buffers for one (qlen, layer shape, dtype): inputs, outputs,
    gradients and the six LoRA-gradient arrays.

    Arrays are numpy (``buf.input_cpu`` ...); when torch is installed they
    share memory with torch tensors (``buf.tensors[name]``), pinned when a
    CUDA device exists.  ``get_buffer`` reuses one buffer per key.  The
    token buffers are made at once, the [E, ...] LoRA-gradient buffers on
    first use (a staging buffer per batch size should not cost a set of
    LoRA gradients).  ``lock`` serializes users of a shared buffer.
    """

    capture_buffers: ClassVar[Dict[tuple, "KExpertsSFTBuffer"]] = {}

    def __init__(self, qlen: int, hidden_size: int, moe_intermediate_size: int,
                 num_experts: int, num_experts_per_tok: int, lora_rank: int, dtype="bf16"):
        from .validation import check_int

        self.qlen = check_int(qlen, "qlen", minimum=0)
        self.hidden_size = check_int(hidden_size, "hidden_size")
        self.moe_intermediate_size = check_int(moe_intermediate_size, "moe_intermediate_size")
        self.num_experts = check_int(num_experts, "num_experts")
        self.num_experts_per_tok = check_int(num_experts_per_tok, "num_experts_per_tok")
        self.lora_rank = check_int(lora_rank, "lora_rank")
        self.dtype = _act_dtype(dtype)
        T, H, k = self.qlen, self.hidden_size, self.num_experts_per_tok
        specs = {
            "input_cpu": ((T, H), self.dtype), "output_cpu": ((T, H), self.dtype),
            "grad_output_cpu": ((T, H), self.dtype), "grad_input_cpu": ((T, H), self.dtype),
            "expert_ids_cpu": ((T, k), np.int64), "weights_cpu": ((T, k), np.float32),
        }
        from .validation import check_memory

        check_memory(sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in specs.values()),
                     f"KExpertsSFTBuffer of qlen={T} tokens (hidden_size={H}, "
                     f"num_experts_per_tok={k})")
        self.lock = threading.Lock()
        self.tensors = {}
        for name, (shape, dt) in specs.items():
            self._make(name, shape, dt)

    def _make(self, name, shape, dt):
        arr, t = _host_array(shape, dt)
        setattr(self, name, arr)
        if t is not None:
            self.tensors[name] = t
        return arr

    def __getattr__(self, name):
        # only reached for attributes not made yet: the LoRA-gradient buffers
        if name in LORA_GRAD_NAMES:
            shapes = lora_shapes(self.num_experts, self.hidden_size, self.moe_intermediate_size,
                                 self.lora_rank)
            return self._make(name, shapes[name], np.float32)
        raise AttributeError(name)

    @classmethod
    def get_buffer(cls, qlen, hidden_size, moe_intermediate_size, num_experts,
                   num_experts_per_tok, lora_rank, dtype="bf16") -> "KExpertsSFTBuffer":
        key = (qlen, hidden_size, moe_intermediate_size, num_experts, num_experts_per_tok,
               lora_rank, str(_act_dtype(dtype)))
        buf = cls.capture_buffers.get(key)
        if buf is None:
            buf = cls(qlen, hidden_size, moe_intermediate_size, num_experts,
                      num_experts_per_tok, lora_rank, dtype)
            cls.capture_buffers[key] = buf
        return buf

    @classmethod
    def clear_cache(cls) -> None:
        cls.capture_buffers.clear()
        with cls._staging_lock:
            cls._staging.clear()

    # ---- the experts modules' device staging: bucketed and bounded ----------
    #: token counts are rounded up to a power of two (at least STAGING_MIN), and
    #: at most STAGING_KEEP buckets are kept (least recently used first out), so
    #: training on sequences of many lengths holds a bounded amount of pinned
    #: memory and pins none per step once its buckets exist
    STAGING_MIN = 64
    STAGING_KEEP = 4
    _staging: ClassVar["OrderedDict"] = OrderedDict()
    _staging_lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def staging(cls, qlen, hidden_size, moe_intermediate_size, num_experts,
                num_experts_per_tok, lora_rank, dtype="bf16") -> "KExpertsSFTBuffer":
        """A shared buffer of at least `qlen` tokens (``view(qlen)`` trims
        its token buffers), from a bounded pool of power-of-two buckets."""
        cap = max(cls.STAGING_MIN, 1 << max(int(qlen) - 1, 0).bit_length())
        key = (cap, hidden_size, moe_intermediate_size, num_experts, num_experts_per_tok,
               lora_rank, str(_act_dtype(dtype)))
        with cls._staging_lock:
            buf = cls._staging.get(key)
            if buf is not None:
                cls._staging.move_to_end(key)
                return buf
            buf = cls(cap, hidden_size, moe_intermediate_size, num_experts,
                      num_experts_per_tok, lora_rank, dtype)
            cls._staging[key] = buf
            # evict the least recently used buckets no call is using
            for old in list(cls._staging):
                if len(cls._staging) <= cls.STAGING_KEEP:
                    break
                ob = cls._staging[old]
                if old != key and not ob.lock.locked():
                    del cls._staging[old]
            return buf

    _TOKEN_BUFFERS = ("input_cpu", "output_cpu", "grad_output_cpu", "grad_input_cpu",
                      "expert_ids_cpu", "weights_cpu")

    def view(self, qlen: int) -> dict:
        """The token buffers' torch tensors trimmed to `qlen` rows (views:
        rows stay contiguous)."""
        if qlen > self.qlen:
            raise ValueError(f"view({qlen}): this buffer holds {self.qlen} tokens")
        return {n: self.tensors[n][:qlen] for n in self._TOKEN_BUFFERS}

    def get_lora_grads(self, as_torch: bool = False) -> dict:
        """The six LoRA-gradient arrays (torch tensors with as_torch=True)."""
        if as_torch:
            if not self.tensors:
                raise RuntimeError("get_lora_grads(as_torch=True): torch is not installed")
            for n in LORA_GRAD_NAMES:
                getattr(self, n)
            return {n: self.tensors[n] for n in LORA_GRAD_NAMES}
        return {n: getattr(self, n) for n in LORA_GRAD_NAMES}


def _act_dtype(dtype):
    torch = torch_module()
    if dtype in ("bf16", "bfloat16", BF16) or (torch is not None and dtype == torch.bfloat16):
        return BF16
    if dtype in ("fp32", "float32", np.float32, np.dtype(np.float32)) or (
            torch is not None and dtype == torch.float32):
        return np.dtype(np.float32)
    raise ValueError(f"dtype must be 'fp32' or 'bf16', got {dtype!r}")


# The cache entry and the workspace are the kernels' own typed memory
# (ktsft/_kernels/cache.pxi, declared in moe_sft.pxd): re-exported here,
# where the rest of the package has always found them.
from ._kernels.moe_sft import CacheEntry, Workspace  # noqa: E402,F401
