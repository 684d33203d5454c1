"""Load a transformers MoE checkpoint with its routed experts in CPU memory,
read one expert at a time.

    from ktsft.integrations.checkpoint import load_moe_checkpoint
    model = load_moe_checkpoint("path/to/Qwen3-30B-A3B", dtype=torch.bfloat16, device="cuda")

transformers >= 5 keeps a layer's routed experts as one fused module with two
parameters, ``gate_up_proj`` [E, 2I, H] (gate rows first) and ``down_proj``
[E, H, I].  ktsft's experts implementation reads those two parameters in place
from host memory, so for training they must be ordinary CPU tensors in bf16 or
fp32, while the rest of the model may sit on a GPU.

A plain ``from_pretrained`` cannot give that cheaply: with a GPU device map it
puts the experts on the GPU (or, mapped to "cpu", wraps them in accelerate's
offload hooks), and while it converts the hub's per-expert tensors into the
fused layout it holds every expert of a layer twice (the list of per-expert
tensors, then their stacked copy), on top of the mapped file pages it read.

``load_moe_checkpoint`` splits the work:

1. Before anything is read it builds the model on the meta device, finds the
   fused experts modules, and checks every expert tensor they need in the
   checkpoint (present, shapes against the config, dtypes, fp8 block scales).
   Bad input raises here, naming the file and the key.
2. transformers loads everything else (``from_pretrained``, to ``device``):
   the experts modules are built without their two parameters, so
   transformers neither reads the expert tensors (they are unexpected keys,
   which it skips without materialising them and which are left out of its
   loading report), nor allocates, initialises or places them.  With no
   experts in the model, a single-device ``device`` needs no accelerate
   dispatch at all.
3. Then each experts module gets its ``gate_up_proj`` / ``down_proj``: one
   ``torch.empty`` [E, 2I, H] / [E, H, I] in ``experts_dtype`` on the CPU,
   filled expert by expert from the files (ktsft.weights' readers; fp8 e4m3
   weights with 128x128 ``weight_scale_inv`` blocks are dequantized expert by
   expert), registered as frozen ``nn.Parameter``s without a copy.

Peak host memory is the expert storage plus what transformers holds for the
rest plus about one expert of temporaries (tests/test_hf_checkpoint.py
measures it in a fresh process).  The expert files are read with safetensors'
``pread`` backend where available: the default memory map would keep every
page read so far resident (and counted in the process's RSS) until the file
is closed.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re

import torch

from ..weights import INDEX, _checkpoint_files, _Checkpoint, check_source_shapes

__all__ = ["load_moe_checkpoint", "fused_expert_modules"]

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
           "float32": torch.float32, torch.bfloat16: torch.bfloat16, torch.float32: torch.float32}

# kwargs of from_pretrained that this call owns or cannot honour, and why
_REFUSED = {
    "device_map": "pass the placement of the non-expert part as device= (a device or a device map)",
    "torch_dtype": "use dtype=",
    "state_dict": "the weights come from `path`",
    "gguf_file": "only safetensors checkpoints are read",
    "variant": "variant files (model.<variant>.safetensors) are not read",
    "use_safetensors": "only safetensors checkpoints are read",
    "tp_plan": "tensor parallelism would shard the CPU experts",
    "tp_size": "tensor parallelism would shard the CPU experts",
    "distributed_config": "tensor parallelism would shard the CPU experts",
    "device_mesh": "tensor parallelism would shard the CPU experts",
}

# kwargs that from_pretrained consumes itself (they must not reach the config
# this module loads to build its meta skeleton); the rest are config overrides
# or model kwargs, as in from_pretrained
_LOADER_ONLY = {
    "proxies", "tqdm_class", "output_loading_info", "max_memory", "offload_folder",
    "offload_buffers", "quantization_config", "adapter_kwargs", "adapter_name",
    "generation_config", "allow_all_kernels", "use_kernels", "kernel_config", "key_mapping",
    "mirror", "_fast_init", "low_cpu_mem_usage", "from_tf", "from_flax", "offload_state_dict",
    "ignore_mismatched_sizes", "weights_only", "disable_mmap", "fusion_config", "config",
    "_from_pipeline", "_from_auto",
}

_EXPERTS_PATH = re.compile(r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.mlp\.experts$")
_FLOAT_DTYPES = {"BF16", "F16", "F32"}
_FP8_DTYPES = {"F8_E4M3", "F8_E4M3FN"}


def _dtype(d, what):
    if d in _DTYPES:
        return _DTYPES[d]
    if isinstance(d, str) and hasattr(torch, d) and isinstance(getattr(torch, d), torch.dtype):
        return getattr(torch, d)
    if isinstance(d, torch.dtype) or d == "auto":
        return d
    raise ValueError(f"{what}={d!r}: expected a torch dtype, 'bf16', 'fp32' or 'auto'")


def fused_expert_modules(model) -> dict:
    """{module name: module} of the fused routed-experts modules of a
    transformers >= 5 model: modules with their own 3-D ``gate_up_proj`` and
    ``down_proj`` parameters."""
    found = {}
    for name, m in model.named_modules():
        p = m._parameters
        if p.get("gate_up_proj") is not None and p.get("down_proj") is not None \
                and p["gate_up_proj"].dim() == 3:
            found[name] = m
    return found


class _PreadCheckpoint(_Checkpoint):
    """ktsft.weights' checkpoint reader, opening files with safetensors' pread
    backend: each expert is read into a fresh buffer and nothing of the file
    stays mapped.  With the default mmap backend every page touched stays in
    the process's resident set until the handle closes, which for a layer
    spread over a few shards adds up to that layer's experts again."""

    def _reader(self, key):
        path = self.files[key]
        if path not in self.handles:
            from safetensors import safe_open

            try:
                self.handles[path] = (safe_open(path, framework="pt", backend="pread"), "pt")
            except TypeError:  # safetensors without the backend argument
                self.handles[path] = (safe_open(path, framework="pt"), "pt")
        return self.handles[path]


class _Plan:
    """One experts module: where its weights are in the checkpoint."""

    def __init__(self, name, cls, layer, prefix, E, I, H):
        self.name, self.cls, self.layer, self.prefix = name, cls, layer, prefix
        self.E, self.I, self.H = E, I, H

    def source(self, files):
        return _PreadCheckpoint(files, self.layer, self.prefix)


def _prefix_candidates(prefix, base_prefix, key_prefix):
    if key_prefix is not None:
        return [key_prefix]
    out = [prefix]
    bp = base_prefix + "." if base_prefix else ""
    if bp and prefix.startswith(bp):
        out.append(prefix[len(bp):])  # checkpoint of the base model (no "model.")
    elif bp:
        out.append(bp + prefix)
    return out


def _check_experts(src, plan, path):
    """Every expert tensor of one layer: present, right shape, readable dtype,
    fp8 with matching 128x128 block scales.  Metadata only (no data read)."""
    E, I, H = plan.E, plan.I, plan.H
    where = f"layer {plan.layer} ({plan.name}): "
    if src.kind == "fused":
        for key in (src.gate_up, src.down):
            if key not in src.files:
                raise KeyError(f"{path!r}: {where}missing {key!r} (the index names "
                               f"{src.gate_up!r} but not both fused tensors)")
            dt = src._slice(key).get_dtype()
            if dt not in _FLOAT_DTYPES:
                raise ValueError(f"{src.files[key]!r}: {where}{key!r} has dtype {dt}; fused expert "
                                 f"tensors are read as bf16, fp16 or fp32 only")
    else:
        shapes = {src.parts[0]: (I, H), src.parts[1]: (I, H), src.parts[2]: (H, I)}
        missing, problems = [], []
        for e in range(E):
            for p, want in shapes.items():
                key = src.pattern.format(e=e, p=p)
                if key not in src.files:
                    missing.append(key)
                    continue
                sl = src._slice(key)
                got, dt = tuple(sl.get_shape()), sl.get_dtype()
                if got != want:
                    problems.append(f"{key!r} in {src.files[key]!r} has shape {got}, the config "
                                    f"needs {want}")
                if dt in _FP8_DTYPES:
                    skey = key + "_scale_inv"
                    if skey not in src.files:
                        problems.append(f"{key!r} is {dt} but {skey!r} (its 128x128 block scales) "
                                        f"is not in the checkpoint")
                        continue
                    sshape = tuple(src._slice(skey).get_shape())
                    swant = (math.ceil(want[0] / 128), math.ceil(want[1] / 128))
                    if sshape != swant:
                        problems.append(f"{skey!r} in {src.files[skey]!r} has shape {sshape}, "
                                        f"128x128 blocks of {want} need {swant}")
                elif dt not in _FLOAT_DTYPES:
                    problems.append(f"{key!r} in {src.files[key]!r} has dtype {dt}; expert weights "
                                    f"are read as bf16, fp16, fp32 or fp8 e4m3 with block scales")
            if len(problems) >= 3:  # enough to see the pattern
                break
        if missing:
            index = os.path.join(path, INDEX)
            listing = index if os.path.isfile(index) else os.path.join(path, "model.safetensors")
            raise KeyError(f"{path!r}: {where}missing expert tensor {missing[0]!r}"
                           + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                           + f": not in {os.path.basename(listing)} (the config has num_experts={E})")
        if problems:
            raise ValueError(f"{path!r}: {where}" + "; ".join(problems))
        extra = src.pattern.format(e=E, p=src.parts[0])
        if extra in src.files:
            raise ValueError(f"{path!r}: {where}the checkpoint has more experts than the config's "
                             f"{E} ({extra!r} exists)")
    check_source_shapes(src, {"gate_proj": (E, I, H), "up_proj": (E, I, H), "down_proj": (E, H, I)},
                        path, where=where)


def _plan_experts(skeleton, files, path, key_prefix):
    """Find the experts modules of the meta model and check the checkpoint
    holds all their weights; returns the _Plan of each."""
    mods = fused_expert_modules(skeleton)
    if not mods:
        raise ValueError(f"{type(skeleton).__name__} has no fused experts module (parameters "
                         f"gate_up_proj [E, 2I, H] and down_proj [E, H, I]): load_moe_checkpoint "
                         f"needs a transformers >= 5 MoE model")
    plans = []
    for name, m in mods.items():
        extra = sorted(set(m._parameters) - {"gate_up_proj", "down_proj"})
        if extra or getattr(m, "has_bias", False) or getattr(m, "is_transposed", False) \
                or not getattr(m, "is_concatenated", True) or not getattr(m, "has_gate", True):
            raise ValueError(f"{name} ({type(m).__name__}): unsupported experts layout (extra "
                             f"parameters {extra}, has_bias={getattr(m, 'has_bias', None)}, "
                             f"is_transposed={getattr(m, 'is_transposed', None)}, is_concatenated="
                             f"{getattr(m, 'is_concatenated', None)}); load_moe_checkpoint reads "
                             f"gate_up_proj [E, 2I, H] (gate rows first) and down_proj [E, H, I]")
        E, I2, H = m.gate_up_proj.shape
        if tuple(m.down_proj.shape) != (E, H, I2 // 2) or I2 % 2:
            raise ValueError(f"{name}: gate_up_proj {tuple(m.gate_up_proj.shape)} and down_proj "
                             f"{tuple(m.down_proj.shape)} are not [E, 2I, H] and [E, H, I]")
        mt = _EXPERTS_PATH.match(name)
        if mt is None:
            raise ValueError(f"{name}: experts module outside a '...layers.<L>.mlp.experts' path; "
                             f"its checkpoint keys cannot be found")
        layer = int(mt["layer"])
        err = None
        for prefix in _prefix_candidates(mt["prefix"], skeleton.base_model_prefix, key_prefix):
            plan = _Plan(name, type(m).__name__, layer, prefix, E, I2 // 2, H)
            try:
                src = plan.source(files)
            except KeyError as e:
                err = err or e
                continue
            _check_experts(src, plan, path)
            src.handles.clear()
            plans.append(plan)
            break
        else:
            raise KeyError(f"{path!r}: {err.args[0] if err.args else err}") from None
    return plans


def _fp8_exclusion(config, user_qc, names, skeleton):
    """The quantization_config to pass to from_pretrained.

    For an fp8 (DeepSeek-style) checkpoint, or an FP8 config given for
    on-the-fly quantization, transformers' FP8 quantizer would swap the experts
    modules for FP8Experts; ktsft dequantizes the experts itself, so they are
    added to modules_to_not_convert.  FineGrainedFP8Config takes that list as a
    loading attribute, i.e. from the argument over the checkpoint's config.
    No list means transformers' default skips (lm_head, tied and last
    modules), which a non-empty list would drop: they are added too."""
    from transformers import FineGrainedFP8Config

    qc = getattr(config, "quantization_config", None)
    qd = {}
    if qc is not None:
        qd = qc if isinstance(qc, dict) else qc.to_dict()
        method = str(qd.get("quant_method", ""))
        if method != "fp8":
            raise ValueError(f"checkpoint quantized with quant_method={method!r}; load_moe_checkpoint "
                             f"reads bf16/fp16/fp32 experts and fp8 e4m3 with 128x128 block scales "
                             f"(quant_method 'fp8') only")
        block = qd.get("weight_block_size") or [128, 128]
        if list(block) != [128, 128]:
            raise ValueError(f"fp8 checkpoint with weight_block_size={block}; ktsft dequantizes "
                             f"128x128 blocks only")
        if user_qc is None:
            user_qc = FineGrainedFP8Config(**{k: v for k, v in qd.items() if k != "quant_method"})
    if not isinstance(user_qc, FineGrainedFP8Config):
        return user_qc  # None, or another method (transformers checks it; _fill checks the experts)
    user_qc = copy.deepcopy(user_qc)
    skip = user_qc.modules_to_not_convert or qd.get("modules_to_not_convert")
    if skip is None:
        from transformers.quantizers.base import get_keys_to_not_convert

        skip = get_keys_to_not_convert(skeleton)
    skip = list(skip)
    user_qc.modules_to_not_convert = skip + [n for n in names if n not in skip]
    return user_qc


def _loader_class(cls, strip, ignore):
    """A subclass of the model class whose instances are built without the
    experts' two parameters (so from_pretrained neither reads, allocates,
    initialises nor places them) and which leaves the experts' checkpoint keys
    out of the loading report.  It keeps the class's name and module so that
    transformers looks up the same weight conversions and treats it as library
    code; the loaded model gets its own class back."""

    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        for name in strip:
            m = self.get_submodule(name)
            for p in ("gate_up_proj", "down_proj"):
                del m._parameters[p]
            m._is_hf_initialized = True  # _init_weights would touch the missing parameters
        keys = set(getattr(self, "_keys_to_ignore_on_load_unexpected", None) or ())
        self._keys_to_ignore_on_load_unexpected = keys | {ignore}

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def _resolve_class(model_class, config):
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is not None:  # an Auto class
        try:
            return mapping[type(config)]
        except KeyError:
            raise ValueError(f"{model_class.__name__} has no model for {type(config).__name__} "
                             f"(model_type={config.model_type!r}); pass model_class=") from None
    return model_class


def _device_map(device):
    """device= for the non-expert part -> from_pretrained's device_map."""
    if device is None:
        return None
    if isinstance(device, dict):
        return dict(device)
    if isinstance(device, str) and device in ("auto", "balanced", "balanced_low_0", "sequential"):
        return device
    dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return None if dev.type == "cpu" else {"": dev}


def _fill(model, plans, files, dtype):
    """Give each experts module its CPU storage, filled one expert at a time."""
    for plan in plans:
        m = model.get_submodule(plan.name)
        if type(m).__name__ != plan.cls or "gate_up_proj" in m._parameters:
            raise ValueError(f"{plan.name}: from_pretrained replaced the experts module by "
                             f"{type(m).__name__} (a quantization_config that converts experts?); "
                             f"ktsft fills {plan.cls} with bf16/fp32 experts")
        E, I, H = plan.E, plan.I, plan.H
        gate_up = torch.empty((E, 2 * I, H), dtype=dtype)
        down = torch.empty((E, H, I), dtype=dtype)
        src = plan.source(files)
        try:
            with torch.no_grad():
                for e in range(E):
                    g, u, d = src.expert(e)  # float32 arrays, fp8 already dequantized
                    gate_up[e, :I].copy_(torch.from_numpy(g))
                    gate_up[e, I:].copy_(torch.from_numpy(u))
                    down[e].copy_(torch.from_numpy(d))
                    del g, u, d
        finally:
            src.handles.clear()  # close this layer's files before the next layer
        for pname, t in (("gate_up_proj", gate_up), ("down_proj", down)):
            p = torch.nn.Parameter(t, requires_grad=False)  # frozen base weights, no copy
            p._is_hf_initialized = True
            m.register_parameter(pname, p)


def _ensure_ktsft_registered():
    try:
        import ktsft.integrations.transformers  # noqa: F401  (registers "ktsft" when available)
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError as e:
        raise ImportError(f"experts_implementation='ktsft' needs ktsft.integrations.transformers "
                          f"and transformers >= 5 ({e}); pass experts_implementation='eager' or "
                          f"None to load without it") from e
    if "ktsft" not in ALL_EXPERTS_FUNCTIONS:
        raise ImportError("experts_implementation='ktsft' is not registered with transformers "
                          "(ktsft.integrations.hf_experts, imported by "
                          "ktsft.integrations.transformers, provides it); pass "
                          "experts_implementation='eager' or None to load without it")


def load_moe_checkpoint(path, *, dtype=torch.bfloat16, device="cpu", experts_dtype=None,
                        experts_implementation="ktsft", model_class=None, key_prefix=None,
                        **from_pretrained_kwargs):
    """Load a local transformers MoE checkpoint with the routed experts in CPU memory.

    path: a directory with ``config.json`` and ``model.safetensors``, or
        safetensors shards with ``model.safetensors.index.json``.  Expert
        layouts: ``...layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.weight``
        (what transformers 5's ``save_pretrained`` writes for Qwen2/3-MoE,
        OLMoE, DeepSeek-V3, and the hub layout), Mixtral's
        ``block_sparse_moe.experts.{e}.{w1,w3,w2}.weight``, and fused
        ``mlp.experts.gate_up_proj`` / ``down_proj``; bf16, fp16, fp32, and
        fp8 e4m3 with ``weight_scale_inv`` per 128x128 block (DeepSeek-V3),
        dequantized expert by expert.
    dtype: dtype of the non-expert part (passed to from_pretrained; "auto" too).
    device: where the non-expert part goes: "cpu" (default), "cuda", a
        torch.device or index, or a device map (dict, "auto", ...) for
        from_pretrained.  The experts are never in it.
    experts_dtype: storage of ``gate_up_proj`` / ``down_proj``, torch.bfloat16
        or torch.float32 (ktsft reads them in place); default ``dtype``.
    experts_implementation: set on the model (``from_pretrained(...,
        experts_implementation=)``); "ktsft" imports ktsft.integrations.transformers
        first, which registers it.  None keeps transformers' default.
    model_class: the model class or an Auto class (default AutoModelForCausalLM).
    key_prefix: the checkpoint's prefix before ``layers.{L}.`` when it is not
        the model's module path (default: the module path, e.g. ``model.``).
    **from_pretrained_kwargs: passed on (attn_implementation, revision, config
        overrides, quantization_config, ...).

    Returns the model in eval mode, its class unchanged.  Each experts module
    holds ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] as contiguous
    CPU ``nn.Parameter``s with requires_grad=False and no accelerate hook.

    Raises (before any weight is read) FileNotFoundError for a missing
    directory, config.json, index or shard; KeyError for a missing expert
    tensor; ValueError for shapes that do not match the config, unsupported
    dtypes, layouts or arguments; ImportError when "ktsft" is asked for and is
    not registered.
    """
    from transformers import AutoConfig

    for k, why in _REFUSED.items():
        if k in from_pretrained_kwargs:
            raise TypeError(f"load_moe_checkpoint: {k}= is not supported ({why})")
    kwargs = dict(from_pretrained_kwargs)
    path = os.fspath(path)
    subfolder = kwargs.pop("subfolder", "")
    if subfolder:
        path = os.path.join(path, subfolder)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_moe_checkpoint: {path!r} is not a directory (a local "
                                f"checkpoint is needed: config.json and safetensors files; for a "
                                f"hub model download it first, e.g. huggingface_hub.snapshot_download)")
    if not os.path.isfile(os.path.join(path, "config.json")) and kwargs.get("config") is None:
        raise FileNotFoundError(f"load_moe_checkpoint: {path!r} has no config.json")
    dtype = _dtype(dtype, "dtype")
    edt = _dtype(dtype if experts_dtype is None else experts_dtype, "experts_dtype")
    if edt not in (torch.bfloat16, torch.float32):
        src = "dtype" if experts_dtype is None else "experts_dtype"
        raise ValueError(f"experts_dtype={edt!r} (from {src}): "
                         f"the experts are stored as torch.bfloat16 or torch.float32, which ktsft "
                         f"reads in place; pass experts_dtype= explicitly")
    if experts_implementation == "ktsft":
        _ensure_ktsft_registered()
    device_map = _device_map(device)

    # The files: index (or single file) -> key -> shard; every shard must exist.
    if not os.path.isfile(os.path.join(path, INDEX)) and \
            not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(f"{path!r}: no {INDEX} and no "
                                f"model.safetensors (found {sorted(os.listdir(path))[:20]})")
    files = _checkpoint_files(path)  # the index checked (weights.read_index)

    # The config as from_pretrained will see it (with the same overrides).
    config = kwargs.get("config")
    if config is None or isinstance(config, (str, os.PathLike)):
        ckw = {k: v for k, v in kwargs.items() if k not in _LOADER_ONLY}
        config, _ = AutoConfig.from_pretrained(path if config is None else config,
                                               return_unused_kwargs=True, **ckw)
    else:
        config = copy.deepcopy(config)
    cls = _resolve_class(model_class, config)

    # Meta skeleton: which modules are experts, and their shapes (no memory).
    skel_config = copy.deepcopy(config)
    if hasattr(skel_config, "quantization_config"):
        skel_config.quantization_config = None
    with torch.device("meta"):
        skeleton = cls(skel_config)
    plans = _plan_experts(skeleton, files, path, key_prefix)
    names = [p.name for p in plans]
    qc = _fp8_exclusion(config, kwargs.pop("quantization_config", None), names, skeleton)
    del skeleton

    # The checkpoint keys (and their fused / renamed forms) that belong to the
    # experts this module fills: from_pretrained reports them as unexpected.
    layer_alt = "|".join(sorted({str(p.layer) for p in plans}))
    prefixes = "|".join(sorted({re.escape(p.prefix) for p in plans} | {re.escape(
        _EXPERTS_PATH.match(n)["prefix"]) for n in names}))
    ignore = rf"^(?:{prefixes})layers\.(?:{layer_alt})\.(?:mlp|block_sparse_moe)\.experts\."

    if qc is not None:
        kwargs["quantization_config"] = qc
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation

    loader = _loader_class(cls, names, ignore)
    model = loader.from_pretrained(path, dtype=dtype, device_map=device_map, **kwargs)
    if isinstance(model, tuple):  # output_loading_info=True
        model, info = model
    else:
        info = None
    model.__class__ = cls
    model._keys_to_ignore_on_load_unexpected.discard(ignore)

    _fill(model, plans, files, edt)

    # Experts stay plain CPU modules.  A device map with several devices makes
    # from_pretrained dispatch the rest with accelerate; the experts had no
    # parameters then, so accelerate hooked only modules with parameters of
    # their own (offloaded leaves) and the experts' ancestors with
    # non-offloading hooks (they move inputs, not weights).  Guard against a
    # hook on an experts module anyway (a map naming it), and against an
    # ancestor hook that would load and move its submodules' weights.
    for name in names:
        m = model.get_submodule(name)
        if hasattr(m, "_hf_hook"):
            from accelerate.hooks import remove_hook_from_module

            remove_hook_from_module(m)
        parts = name.split(".")
        for i in range(len(parts)):
            hook = getattr(model.get_submodule(".".join(parts[:i])), "_hf_hook", None)
            if any(getattr(h, "offload", False) and getattr(h, "place_submodules", False)
                   for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else [])):
                raise ValueError(f"device={device!r} offloads {'.'.join(parts[:i]) or 'the model'}, "
                                 f"which holds the experts {name}: accelerate's offload hook would "
                                 f"move them at every forward; map that module to a device")
    _record_placement(model, names, device_map)
    return (model, info) if info is not None else model


def _record_placement(model, names, device_map):
    """Write where the experts are into ``model.hf_device_map``, so that the
    stack reads the placement right: with the rest on a GPU, ``Trainer``
    (``_move_model_to_device``) and accelerate (``verify_device_map``: more
    than one entry) then leave the model where it is instead of calling
    ``model.to("cuda")``, which would move the experts to the GPU.  A model
    entirely on the CPU keeps no map (nothing to protect)."""
    if device_map is None:
        return
    dm = dict(getattr(model, "hf_device_map", None) or {})
    if not dm:
        if not isinstance(device_map, dict):
            return  # "auto" and friends always leave a map; nothing to merge into
        dm = dict(device_map)
    dm.update({n: "cpu" for n in names})
    model.hf_device_map = dm
